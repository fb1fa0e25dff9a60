"""The three methods share the loop and differ only in how iterations ≥ 1 move θ."""
import pytest
import torch

import zopro
from conftest import prompts, tiny_llama, with_adapters


def run_loop(tok, method, monkeypatch=None):
    model = with_adapters(tiny_llama(len(tok)))
    head = torch.nn.Linear(model.config.hidden_size, 1)
    torch.nn.init.normal_(head.weight, std=0.5, generator=torch.Generator().manual_seed(3))
    rm = zopro.RewardModel(zopro.REWARD, head)
    cfg = zopro.Config(method=method, iterations=2, steps_per_iteration=2, prompts_per_step=2, k=2, max_new_tokens=6,
                       refine_prompts=4, gen_batch=3, rm_batch=2, eps=1e-2, lr=1e-2, fo_lr=1e-2)
    p = prompts(tok, ["one", "two", "three", "four", "five"])
    steps = []
    state = zopro.train(model, tok, cfg, p, ["q"] * 5, rm, zopro.RewardModelJudge(model, rm), zopro.State(),
                        on_step=lambda st, m: steps.append(m))
    return steps, zopro.adapter_state(model, zopro.POLICY), state


@pytest.fixture(scope="module")
def runs(tok):
    return {m: run_loop(tok, m) for m in ("zopro", "mezo", "rloo")}


def test_methods_share_iteration_zero_and_the_rollouts_of_iteration_one(runs):
    z, g, r = (runs[m][0] for m in ("zopro", "mezo", "rloo"))
    keys = ("reward", "kl", "rlhf_reward", "response_len")
    # iteration 0 is first-order RLOO for every method; the first step of iteration 1 rolls out from the
    # same θ with the same seed, so its rollouts and rewards are identical; its update is where they part
    for t in range(3):
        assert all(z[t][k] == g[t][k] == r[t][k] for k in keys)
    th = {m: runs[m][1] for m in runs}
    for a, b in (("zopro", "mezo"), ("zopro", "rloo"), ("mezo", "rloo")):
        assert any(not torch.equal(th[a][k], th[b][k]) for k in th[a])


def test_zeroth_order_methods_estimate_and_rloo_backpropagates(runs):
    for m in ("zopro", "mezo"):
        assert all("projected_grad" in s and "grad_norm" not in s for s in runs[m][0][2:])
    assert all("grad_norm" in s and "projected_grad" not in s for s in runs["rloo"][0])
    assert all("grad_norm" in s for s in runs["zopro"][0][:2])           # iteration 0 is first-order
    assert [s["decay"] for s in runs["zopro"][0][2:]] == [0.999, 0.499]


def test_mezo_samples_unit_gaussian_and_zopro_the_targeted_direction(tok, monkeypatch):
    kinds = []
    real = zopro.Sampler.__init__

    def spy(self, kind, params, prev_update=None, reward_delta=None):
        kinds.append((kind, prev_update is not None, reward_delta is not None))
        real(self, kind, params, prev_update, reward_delta)

    monkeypatch.setattr(zopro.Sampler, "__init__", spy)
    run_loop(tok, "mezo")
    run_loop(tok, "zopro")
    assert kinds == [("gaussian", True, True), ("targeted", True, True)]


def test_prev_update_and_reward_delta_are_what_the_iterations_did(runs):
    steps, theta, state = runs["zopro"]
    # μ after the last iteration is that iteration's update, scaled to norm 1
    mu = state.prev_update
    assert sum(float(v.pow(2).sum()) for v in mu.values()) == pytest.approx(1.0, rel=1e-5)
    assert state.reward_delta is not None and any(v.abs().max() > 0 for v in state.reward_delta.values())
    assert state.reward_delta.keys() == theta.keys()


def test_a_config_built_by_hand_takes_its_methods_spsa_scale():
    # Gaussian z has norm ~√N, so zopro's lr 5 would throw a MeZO run far off (README, What we found);
    # the values are those of the README's hyperparameter table.
    assert (zopro.Config(method="mezo").eps, zopro.Config(method="mezo").lr) == (1e-3, 5e-5)
    assert (zopro.Config().eps, zopro.Config().lr) == (1e-2, 5.0)
    assert zopro.Config(method="mezo", lr=1e-6).lr == 1e-6        # an explicit value wins
    with pytest.raises(ValueError, match="unknown method"):
        zopro.Config(method="spsa")


def test_train_py_resolves_the_same_spsa_scale_as_the_library():
    import train
    for method in ("zopro", "mezo", "rloo"):
        s = train.resolve(train.build_parser().parse_args(["--task", "wmt", "--method", method]))
        cfg = zopro.Config(method=method)
        assert (s["eps"], s["lr"]) == (cfg.eps, cfg.lr)
    s = train.resolve(train.build_parser().parse_args(["--method", "mezo", "--lr", "3e-5"]))
    assert s["lr"] == 3e-5
