"""Rollouts, log-probs, rewards, KL, RLOO and the surrogate, each against an independent computation."""
import math

import pytest
import torch

import zopro
from conftest import prompts


def test_rloo_advantages_sum_to_zero_per_prompt_and_match_hand_values():
    R = torch.tensor([1.0, 3.0, 0.5, -0.5])
    assert torch.allclose(zopro.rloo_advantages(R, 2), torch.tensor([-2.0, 2.0, 1.0, -1.0]))  # A1 = R1 − R2 = −A2
    R = torch.tensor([1.0, 2.0, 6.0])
    A = zopro.rloo_advantages(R, 3)
    assert torch.allclose(A, torch.tensor([1 - 4.0, 2 - 3.5, 6 - 1.5]))
    A = zopro.rloo_advantages(torch.randn(5 * 4), 4).view(5, 4)
    assert torch.allclose(A.sum(1), torch.zeros(5), atol=1e-6)
    with pytest.raises(ValueError, match="k >= 2"):  # one sample has no leave-one-out baseline (0/0 = NaN)
        zopro.rloo_advantages(R, 1)


def test_kl_penalised_reward_uses_response_tokens_only():
    s = torch.tensor([1.0, 2.0])
    old = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, -1.0]])
    ref = torch.tensor([[-1.5, -2.0, -9.0], [-1.0, -1.0, -1.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    R, kl = zopro.kl_penalised_reward(s, old, ref, mask, 0.05)
    assert torch.allclose(kl, torch.tensor([0.5, 0.0]))
    assert torch.allclose(R, torch.tensor([1.0 - 0.025, 2.0]))


def test_surrogate_at_old_policy_is_minus_mean_advantage_and_clips():
    A = torch.tensor([1.0, -1.0, 2.0, -2.0])
    lp = torch.randn(4, 5)
    mask = torch.ones(4, 5)
    assert zopro.surrogate_loss(lp, lp, A, mask, 0.2).item() == pytest.approx(0.0, abs=1e-7)
    # ρ = e^{0.5} for every row: positive advantages are clipped at 1.2, negative ones are not
    lp_new = lp.clone()
    lp_new[:, 0] += 0.5
    rho = math.exp(0.5)
    expect = (-1 * 1.2 + 1 * rho - 2 * 1.2 + 2 * rho) / 4
    assert zopro.surrogate_loss(lp_new, lp, A, mask, 0.2).item() == pytest.approx(expect, rel=1e-6)
    # masked positions do not enter the sequence ratio
    lp_new = lp.clone()
    lp_new[:, 4] += 3.0
    mask[:, 4] = 0
    assert zopro.surrogate_loss(lp_new, lp, A, mask, 0.2).item() == pytest.approx(0.0, abs=1e-7)


def test_bradley_terry_matches_hand_computation():
    rc, rr = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.5])
    hand = -(math.log(1 / (1 + math.exp(-1.0))) + math.log(1 / (1 + math.exp(0.5)))) / 2
    assert zopro.bradley_terry_loss(rc, rr).item() == pytest.approx(hand, rel=1e-6)


def test_response_logprobs_match_a_full_forward(model, tok):
    seqs = zopro.pack([[1, 70, 71, 72], [1, 80]], [[90, 91, 2], [95]], tok.pad_token_id)
    with zopro.use_adapter(model, zopro.POLICY):
        lp = zopro.response_logprobs(model, seqs, temperature=0.7)
        for b, (prompt, resp) in enumerate([([1, 70, 71, 72], [90, 91, 2]), ([1, 80], [95])]):
            ids = torch.tensor([prompt + resp])
            full = (model(ids).logits[0].float() / 0.7).log_softmax(-1)   # unpadded, all positions
            expect = torch.stack([full[len(prompt) - 1 + t, y] for t, y in enumerate(resp)])
            assert torch.allclose(lp[b, :len(resp)], expect, atol=1e-5)


def test_reward_is_read_at_the_last_real_token(model, tok, rm):
    seqs = zopro.pack([[1, 70, 71, 72], [1, 80]], [[90, 91, 2], [95]], tok.pad_token_id)
    scores = zopro.reward_scores(model, rm, seqs)
    with zopro.use_adapter(model, zopro.REWARD):
        for b, ids in enumerate([[1, 70, 71, 72, 90, 91, 2], [1, 80, 95]]):
            h = model.model(torch.tensor([ids])).last_hidden_state[0, -1]
            assert scores[b].item() == pytest.approx(rm.head(h).item(), abs=1e-5)


def test_generation_stops_at_eos_and_masks_after_it(model, tok):
    p = prompts(tok, ["one", "two", "three", "four"])
    # Make EOS likely (+6 on its logit: ~1 in 6 per step at τ = 1.5) so that rows stop at different lengths.
    # A tiny random model would almost never sample it from ~260 tokens, and the EOS branch would go untested.
    bias = torch.zeros(len(tok))
    bias[tok.eos_token_id] = 6.0
    hook = model.lm_head.register_forward_hook(lambda mod, inp, out: out + bias)
    try:
        with zopro.use_adapter(model, zopro.POLICY):
            seqs, logp = zopro.generate(model, p, 30, 1.5, tok.eos_token_id, tok.pad_token_id,
                                        torch.Generator().manual_seed(0))
            ref = zopro.response_logprobs(model, seqs, 1.5)
    finally:
        hook.remove()
    resp, mask = seqs.ids[:, seqs.prompt_len:], seqs.response_mask
    T = resp.shape[1]
    lengths = []
    for b in range(len(seqs)):
        n = int(mask[b].sum())
        assert mask[b, :n].all() and not mask[b, n:].any()    # one contiguous response, then padding
        assert resp[b, n - 1] == tok.eos_token_id              # every row ended with its EOS, which is kept
        assert (resp[b, :n - 1] != tok.eos_token_id).all()     # ... and it is the first EOS
        assert (logp[b, n:] == 0).all()                        # nothing is counted after it
        lengths.append(n)
    assert T < 30 and min(lengths) < T                         # stopped early; shorter rows have masked tails
    # the sampled log-probs are those of a forward pass over the same rows
    assert torch.allclose(logp * mask, ref * mask, atol=1e-4)


def test_cat_sequences_pads_shorter_responses_and_keeps_every_row():
    # refinement generates in gen_batch calls; each call stops at its own longest response
    a = zopro.pack([[5, 6], [7]], [[1, 2, 3], [4]], pad_id=0)           # P = 2, T = 3
    b = zopro.pack([[8, 9]], [[1]], pad_id=0)                           # P = 2, T = 1
    c = zopro.cat_sequences([a, b], pad_id=0)
    assert c.prompt_len == 2 and c.ids.shape == (3, 5)
    assert c.ids.tolist() == [[5, 6, 1, 2, 3], [0, 7, 4, 0, 0], [8, 9, 1, 0, 0]]
    assert c.mask.tolist() == [[1, 1, 1, 1, 1], [0, 1, 1, 0, 0], [1, 1, 1, 0, 0]]


def test_sampling_is_seeded_and_leaves_global_rng_alone(model, tok):
    p = prompts(tok, ["a", "b"])
    before = torch.get_rng_state()
    with zopro.use_adapter(model, zopro.POLICY):
        s1, _ = zopro.generate(model, p, 8, 1.0, 2, 2, torch.Generator().manual_seed(4))
        s2, _ = zopro.generate(model, p, 8, 1.0, 2, 2, torch.Generator().manual_seed(4))
    assert torch.equal(s1.ids, s2.ids) and torch.equal(torch.get_rng_state(), before)


def test_kl_is_zero_when_the_policy_is_the_reference(model, tok, rm):
    cfg = zopro.Config(k=2, max_new_tokens=8)
    b = zopro.make_batch(model, prompts(tok, ["x", "y"]), rm, cfg, torch.Generator().manual_seed(0),
                         tok.eos_token_id, tok.pad_token_id)
    assert b.kl.abs().max() < 1e-4 and torch.allclose(b.rewards, b.scores, atol=1e-5)
    assert b.advantages.view(-1, 2).sum(1).abs().max() < 1e-5


def test_adapters_share_names_and_shapes_and_are_fp32_on_a_bf16_base(model):
    model.to(torch.bfloat16)
    pol, rew = zopro.adapter_params(model, zopro.POLICY), zopro.adapter_params(model, zopro.REWARD)
    assert list(pol) == list(rew) and all(pol[k].shape == rew[k].shape for k in pol)
    assert all(p.dtype == torch.float32 for p in pol.values())
    x = torch.randint(3, 200, (1, 6))
    with zopro.use_adapter(model, None):
        bare = model(x).logits
    layer = zopro.lora_layers(model)[0][1]
    assert bare.dtype == torch.bfloat16 and layer.active is None
    with zopro.use_adapter(model, zopro.REWARD):
        assert not torch.equal(model(x).logits, bare)


def test_new_adapter_is_a_no_op_and_loading_a_foreign_layout_is_refused(model):
    zopro.add_adapter(model, "fresh", seed=0)
    x = torch.randint(3, 200, (1, 6))
    with zopro.use_adapter(model, None):
        bare = model(x).logits
    with zopro.use_adapter(model, "fresh"):
        assert torch.equal(model(x).logits, bare)
    state = zopro.adapter_state(model, "fresh")
    state[next(iter(state))] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="LoRA layout"):
        zopro.load_adapter_state(model, "fresh", state)


def test_reward_model_judge_prefers_the_higher_score(model, rm):
    a = zopro.pack([[1, 70]] * 3, [[90, 2], [91, 2], [92, 2]], 2)
    b = zopro.pack([[1, 70]] * 3, [[93, 2], [94, 2], [95, 2]], 2)
    ra, rb = zopro.reward_scores(model, rm, a), zopro.reward_scores(model, rm, b)
    assert torch.equal(zopro.RewardModelJudge(model, rm)(None, None, None, a, b, 0), ra > rb)


def test_llm_judge_compares_label_probabilities(model, tok):
    judge = zopro.LLMJudge(model, tok)
    text = judge.QUESTION.format(q="q", a="first", b="second")
    ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True,
                                  return_dict=False)
    logits = model(torch.tensor([ids])).logits[0, -1]          # the bare base model: adapters are off
    expect = logits[tok.encode("A", add_special_tokens=False)[0]] > logits[tok.encode("B", add_special_tokens=False)[0]]
    assert judge.first_is_better("q", "first", "second") == bool(expect)


def test_llm_judge_undoes_its_random_order():
    class LongerIsBetter(zopro.LLMJudge):   # a judge whose preference we know, whatever the order shown
        def __init__(self):
            self.shown = []

        def first_is_better(self, q, first, second):
            self.shown.append(first)
            return len(first) > len(second)

    n = 40
    a = ["a" * (2 * (i % 5) + 1) for i in range(n)]  # odd and even lengths: no ties
    b = ["b" * (2 * (i % 3) + 2) for i in range(n)]
    seqs = zopro.pack([[1]], [[1]], 2)
    judge = LongerIsBetter()
    got = judge(["q"] * n, a, b, seqs, seqs, seed=3)
    assert got.tolist() == [len(x) > len(y) for x, y in zip(a, b)]
    flipped = sum(s.startswith("b") for s in judge.shown)
    assert 5 < flipped < n - 5                             # about half the pairs were shown flipped
    again = LongerIsBetter()
    again(["q"] * n, a, b, seqs, seqs, seed=3)
    assert again.shown == judge.shown                      # the flips are seeded
