"""SPSA: in-place perturbation and restore, the estimate on known losses, the update rule, and a step
on a tiny LM that changes exactly the policy adapter."""
import math

import torch

import zopro
from conftest import prompts


def test_perturb_restores_theta():
    for dtype, tol in ((torch.float64, 1e-15), (torch.float32, 1e-6)):
        params = {"w": torch.randn(64, 32, dtype=dtype), "b": torch.randn(64, dtype=dtype)}
        before = {k: v.clone() for k, v in params.items()}
        s = zopro.Sampler("gaussian", params)
        g, _, _ = zopro.spsa_grad(lambda: 0.0, params, s, seed=3, d=0.0, eps=1e-3)
        assert all((params[k] - before[k]).abs().max() <= tol for k in params)


def test_projected_gradient_is_exact_on_a_linear_loss():
    # L(θ) = a·θ  ->  g = (L(θ+εz) − L(θ−εz)) / 2ε = a·z, independent of ε
    params = {"w": torch.randn(20, 10, dtype=torch.float64)}
    a = torch.randn(20, 10, dtype=torch.float64)
    s = zopro.Sampler("gaussian", params)
    g, _, _ = zopro.spsa_grad(lambda: float((a * params["w"]).sum()), params, s, seed=11, d=0.0, eps=0.37)
    z = next(s.directions(params, 11, 0.0))[1].double()
    assert math.isclose(g, float((a * z).sum()), rel_tol=1e-9)


def test_projected_gradient_on_a_quadratic_is_exact_and_averages_to_the_gradient():
    # L = ½θᵀHθ: the central difference cancels even terms, so g = zᵀHθ exactly; E[g z] = ∇L = Hθ.
    torch.manual_seed(0)
    n = 8
    M = torch.randn(n, n, dtype=torch.float64)
    H = M @ M.T + n * torch.eye(n, dtype=torch.float64)
    params = {"w": torch.randn(n, dtype=torch.float64)}
    loss = lambda: float(0.5 * params["w"] @ H @ params["w"])  # noqa: E731
    s = zopro.Sampler("gaussian", params)
    est = torch.zeros(n, dtype=torch.float64)
    for seed in range(4000):
        g, _, _ = zopro.spsa_grad(loss, params, s, seed, 0.0, eps=1e-2)
        z = next(s.directions(params, seed, 0.0))[1].double()
        assert math.isclose(g, float(z @ H @ params["w"]), rel_tol=1e-8)
        est += g * z / 4000
    true = H @ params["w"]
    assert torch.nn.functional.cosine_similarity(est, true, dim=0) > 0.97


def test_update_rule_and_weight_decay_exclusions():
    # θ ← θ − lr·(g·z + λθ); λ skips biases and norms; ε plays no part in the step.
    params = {"x.lora_A": torch.randn(5, 3), "x.bias": torch.randn(5), "ln.norm.weight": torch.randn(5)}
    before = {k: v.clone() for k, v in params.items()}
    s = zopro.Sampler("gaussian", params)
    zs = {k: z.clone() for k, (_, z) in zip(params, s.directions(params, 7, 0.0))}
    zopro.spsa_update(params, s, [7], [2.5], 0.0, lr=0.1, weight_decay=0.5)
    assert torch.allclose(params["x.lora_A"], before["x.lora_A"] * (1 - 0.05) - 0.1 * 2.5 * zs["x.lora_A"], atol=1e-6)
    for k in ("x.bias", "ln.norm.weight"):
        assert torch.allclose(params[k], before[k] - 0.1 * 2.5 * zs[k], atol=1e-6)


def test_zo_step_changes_exactly_the_policy_adapter(model, tok, rm):
    cfg = zopro.Config(k=2, max_new_tokens=6, eps=1e-2, lr=1e-2)
    base = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    others = {n: zopro.adapter_state(model, n) for n in (zopro.REFERENCE, zopro.REWARD)}
    policy = zopro.adapter_params(model, zopro.POLICY)
    before = {k: v.detach().clone() for k, v in policy.items()}
    batch = zopro.make_batch(model, prompts(tok, ["hello", "good day"]), rm, cfg, torch.Generator().manual_seed(0),
                             tok.eos_token_id, tok.pad_token_id)
    out = zopro.zo_step(model, policy, zopro.Sampler("gaussian", policy), batch, cfg, step=0, d=0.0, lr=cfg.lr)
    assert out["loss_plus"] != out["loss_minus"] and not out["skipped"]
    assert all(not torch.equal(policy[k], before[k]) for k in policy)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in base.items())
    for n, st in others.items():
        assert all(torch.equal(v, zopro.adapter_state(model, n)[k]) for k, v in st.items())


def test_estimates_are_linear_in_epsilon_on_an_fp32_base(model, tok, rm):
    # In the linear regime g does not depend on ε: the central difference at ε and ε/10 agree, so fp32
    # resolves perturbations of ~1e-6 per weight (the original's bf16 adapter could not, PAPER.md B10).
    model.to(torch.bfloat16)
    policy = zopro.adapter_params(model, zopro.POLICY)
    assert all(p.dtype == torch.float32 for p in policy.values())   # casting the model leaves adapters fp32
    model.to(torch.float32)
    cfg = zopro.Config(k=2, max_new_tokens=4)
    batch = zopro.make_batch(model, prompts(tok, ["abc", "xyz"]), rm, cfg, torch.Generator().manual_seed(1),
                             tok.eos_token_id, tok.pad_token_id)
    sampler = zopro.Sampler("gaussian", policy)
    g = [zopro.spsa_grad(lambda: zopro.batch_loss(model, batch, cfg), policy, sampler, 5, 0.0, eps)[0]
         for eps in (1e-3, 1e-4)]
    assert abs(g[0]) > 1e-3 and abs(g[0] - g[1]) < 0.02 * abs(g[0])


def test_non_finite_estimate_skips_the_update(model, tok, rm):
    cfg = zopro.Config(k=2, max_new_tokens=4)
    policy = zopro.adapter_params(model, zopro.POLICY)
    batch = zopro.make_batch(model, prompts(tok, ["abc", "xyz"]), rm, cfg, torch.Generator().manual_seed(1),
                             tok.eos_token_id, tok.pad_token_id)
    batch.advantages[0] = float("nan")
    before = {k: v.detach().clone() for k, v in policy.items()}
    out = zopro.zo_step(model, policy, zopro.Sampler("gaussian", policy), batch, cfg, 0, 0.0, 1e-2)
    assert out["skipped"] and all(torch.allclose(before[k], policy[k], atol=1e-6) for k in policy)
