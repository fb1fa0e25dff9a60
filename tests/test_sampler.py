"""The targeted sampler (ZOPrO's direction), its decay schedule, its guards, and seeding."""
import math

import pytest
import torch

import zopro


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def unit(v):
    return v / v.norm()


def test_targeted_direction_is_orthogonal_to_reward_delta_at_decay_zero():
    mu, v_hat, g = rand(50, 20, seed=1), unit(rand(50, 20, seed=2)), rand(50, 20, seed=3)
    z = zopro.targeted_direction(g, mu, v_hat, 0.0, float(mu.norm()))
    assert abs(float((z * v_hat).sum())) < 1e-4 * float(z.norm())
    assert torch.allclose(z.norm(), mu.norm(), rtol=1e-5)  # the noise is rescaled to ‖μ‖


def test_targeted_direction_is_previous_update_at_decay_one():
    mu, v_hat, g = rand(30, 8, seed=1), unit(rand(30, 8, seed=2)), rand(30, 8, seed=3)
    assert torch.equal(zopro.targeted_direction(g, mu, v_hat, 1.0, float(mu.norm())), mu)


def test_projection_does_not_depend_on_the_scale_of_v():
    mu, v, g = rand(30, 8, seed=1), rand(30, 8, seed=2), rand(30, 8, seed=3)
    a = zopro.targeted_direction(g, mu, v, 0.3, 2.0)
    assert torch.allclose(a, zopro.targeted_direction(g, mu, 1e-4 * v, 0.3, 2.0), atol=1e-5)
    assert torch.allclose(a, zopro.targeted_direction(g, mu, unit(v), 0.3, 2.0), atol=1e-5)


def test_reward_component_is_decay_times_mu_component():
    # z·v̂ = d·(μ·v̂): only the noise part is orthogonal to the reward delta (PAPER.md §7.2)
    mu, v_hat, g = rand(400, seed=1), unit(rand(400, seed=2)), rand(400, seed=3)
    for d in (0.999, 0.5, 0.1):
        z = zopro.targeted_direction(g, mu, v_hat, d, float(mu.norm()))
        assert math.isclose(float(z @ v_hat), d * float(mu @ v_hat), rel_tol=1e-4, abs_tol=1e-5)


def test_noise_weight_at_start_of_iteration():
    # d0 = 0.999 leaves a noise weight √(1 − 0.999²) ≈ 0.0447; with μ ⟂ noise, ‖z‖ = ‖μ‖ exactly.
    mu = torch.tensor([1.0, 0.0, 0.0])
    g = torch.tensor([0.0, 3.0, 4.0])
    z = zopro.targeted_direction(g, mu, torch.zeros(3), 0.999, 1.0)
    assert torch.allclose(z, torch.tensor([0.999, 0.6 * 0.044710, 0.8 * 0.044710]), atol=1e-6)
    assert math.isclose(float(z.norm()), 1.0, rel_tol=1e-6)


def test_linear_decay_matches_hand_values_and_clamps():
    assert [round(zopro.decay(t, 10, "linear", 0.999, 0), 3) for t in range(10)] == \
        [0.999, 0.899, 0.799, 0.699, 0.599, 0.499, 0.399, 0.299, 0.199, 0.099]
    assert zopro.decay(1500, 1000, "linear", 0.999, 0) == 0.0  # the original went negative


def test_exp_decay_rate_is_relative_to_iteration_length():
    for T in (10, 1000):
        assert math.isclose(zopro.decay(T // 2, T, "exp", 0.999, 4.0), 0.999 * math.exp(-2.0))
    with pytest.raises(ValueError):
        zopro.decay(0, 10, "cosine", 0.999, 1.0)


def params_dict(seed=0):
    return {"a.lora_A": rand(4, 6, seed=seed), "a.lora_B": rand(6, 4, seed=seed + 1), "b.lora_A": rand(3, 5, seed=seed + 2)}


def test_zero_reward_delta_gives_no_nan_and_zero_mu_tensor_still_moves():
    params = params_dict()
    mu = {k: rand(*p.shape, seed=7) for k, p in params.items()}
    mu["b.lora_A"] = torch.zeros(3, 5)                       # this tensor did not move last iteration
    v = {k: torch.zeros_like(p) for k, p in params.items()}  # the reward model did not move at all
    s = zopro.Sampler("targeted", params, mu, v)
    zs = dict(zip(params, (z for _, z in s.directions(params, seed=5, d=0.5))))
    assert all(torch.isfinite(z).all() for z in zs.values())
    assert zs["b.lora_A"].norm() > 0
    # its stand-in scale is the per-element RMS of μ over all tensors
    rms = math.sqrt(sum(float(m.pow(2).sum()) for m in mu.values()) / sum(m.numel() for m in mu.values()))
    assert math.isclose(float(zs["b.lora_A"].norm()), math.sqrt(1 - 0.25) * rms * math.sqrt(15), rel_tol=1e-5)


def test_all_zero_previous_update_is_refused():
    params = params_dict()
    with pytest.raises(ValueError, match="zero everywhere"):
        zopro.Sampler("targeted", params, {k: torch.zeros_like(p) for k, p in params.items()}, params)


def test_missing_reward_delta_key_is_refused():
    params = params_dict()
    v = dict(params)
    v.pop("a.lora_B")
    with pytest.raises(ValueError, match="share names and shapes"):
        zopro.Sampler("targeted", params, params, v)


def test_same_seed_same_direction_and_global_rng_untouched():
    params = params_dict()
    s = zopro.Sampler("targeted", params, {k: rand(*p.shape, seed=9) for k, p in params.items()}, params)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    z1 = [z.clone() for _, z in s.directions(params, 42, 0.3)]
    z2 = [z.clone() for _, z in s.directions(params, 42, 0.3)]
    z3 = [z.clone() for _, z in s.directions(params, 43, 0.3)]
    assert torch.equal(torch.get_rng_state(), before)
    assert all(torch.equal(a, b) for a, b in zip(z1, z2))
    assert not torch.equal(z1[0], z3[0])


def test_gaussian_directions_are_unit_gaussian():
    params = {"w": torch.zeros(400, 250)}
    z = next(zopro.Sampler("gaussian", params).directions(params, 0, 0.0))[1]
    assert abs(z.mean().item()) < 0.01 and abs(z.std().item() - 1) < 0.01


def test_derive_seed_is_a_pure_function_of_its_parts():
    assert zopro.derive_seed(0, "direction", 5, 0) == zopro.derive_seed(0, "direction", 5, 0)
    seeds = {zopro.derive_seed(s, stream, t) for s in (0, 1) for stream in ("direction", "rollout") for t in range(50)}
    assert len(seeds) == 200
