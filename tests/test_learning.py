"""The objective points the right way: on a reward we control, first-order RLOO raises it, and SPSA
steps lower the surrogate loss on average."""
import pytest
import torch

import zopro
from conftest import prompts, tiny_llama, with_adapters


def low_token_share(model, rm, seqs):
    """A reward we control: the share of response tokens whose id is below 130 (about half the vocabulary)."""
    r, m = seqs.ids[:, seqs.prompt_len:], seqs.response_mask.float()
    return ((r < 130).float() * m).sum(-1) / m.sum(-1).clamp_min(1)


def test_first_order_rloo_raises_a_known_reward(tok, monkeypatch):
    monkeypatch.setattr(zopro, "reward_scores", low_token_share)
    model = tiny_llama(len(tok))
    with torch.no_grad():  # logits of the 0.02-scale init stay within ±0.6: no policy could favour half the vocab
        model.model.embed_tokens.weight.mul_(10)
    model = with_adapters(model)
    rm = zopro.RewardModel(zopro.REWARD, torch.nn.Linear(32, 1))
    cfg = zopro.Config(method="rloo", iterations=1, steps_per_iteration=40, prompts_per_step=4, k=4,
                       max_new_tokens=8, kl_coef=0.0, fo_lr=3e-2)
    rewards = []
    zopro.train(model, tok, cfg, prompts(tok, ["a", "b", "c", "d"]), ["q"] * 4, rm, None, zopro.State(),
                on_step=lambda st, m: rewards.append(m["reward"]))
    first, last = sum(rewards[:10]) / 10, sum(rewards[-10:]) / 10
    assert last > first + 0.2, (first, last)  # the noise of a 10-step mean is about 0.015


def test_spsa_steps_lower_the_surrogate_on_average(model, tok, rm):
    cfg = zopro.Config(k=4, max_new_tokens=6, eps=1e-3)
    policy = zopro.adapter_params(model, zopro.POLICY)
    batch = zopro.make_batch(model, prompts(tok, ["one", "two"]), rm, cfg, torch.Generator().manual_seed(0),
                             tok.eos_token_id, tok.pad_token_id)
    start = {k: v.detach().clone() for k, v in policy.items()}
    sampler = zopro.Sampler("gaussian", policy)
    before = zopro.batch_loss(model, batch, cfg)
    deltas = []
    for step in range(40):
        zopro.zo_step(model, policy, sampler, batch, cfg, step, 0.0, lr=1e-3)
        deltas.append(zopro.batch_loss(model, batch, cfg) - before)
        zopro.load_adapter_state(model, zopro.POLICY, start)
    # E[ΔL] = −lr·‖∇L‖² < 0: most single steps, and the mean, go down
    assert sum(deltas) / len(deltas) < 0 and sum(d < 0 for d in deltas) > 25


@pytest.mark.parametrize("part", [0, 2, 1])
def test_fit_in_slices_accumulates_the_gradient_of_the_whole_batch(part):
    # 5 rows in slices of 2, 2, 1 (weights 0.4, 0.4, 0.2) must give the gradient of the mean over all 5:
    # ∂/∂w mean_i (x_i·w − y_i)² = (2/n) Σ_i (x_i·w − y_i) x_i, computed here by hand
    X = torch.tensor([[0.1, 0.2], [0.0, -0.1], [0.3, 0.1], [-0.2, 0.1], [0.1, 0.1]])
    y = torch.tensor([0.1, -0.2, 0.0, 0.3, 0.1])
    w0 = torch.tensor([0.5, -0.5])
    w = torch.nn.Parameter(w0.clone())
    losses = zopro.fit([w], lambda idx: ((X[idx] @ w - y[idx]) ** 2).mean(), [torch.arange(5)], lr=1e-3, part=part)
    r = X @ w0 - y
    assert losses[0] == pytest.approx((r ** 2).mean().item(), rel=1e-6)
    assert torch.allclose(w.grad, 2 / 5 * (r[:, None] * X).sum(0), atol=1e-7)  # norm < 1: not clipped
    assert not torch.equal(w.detach(), w0)                                       # and the step was taken
