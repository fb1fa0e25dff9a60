"""ZOPrO: zeroth-order preference optimisation of LLMs.

Galatolo et al., "Visualising Policy-Reward Interplay to Inform Zeroth-Order Preference Optimisation of
Large Language Models", Findings of ACL 2025 (arXiv 2503.03460).

A policy π_θ (LoRA adapter θ on a frozen base LM) is tuned against a learned reward model r_φ (its own
LoRA φ on the same base, plus a scalar head) without back-propagating through the policy. The method:

  1. SFT. Fit the adapter "sft" on prompt ⊕ good response [sft_loss]. The policy θ starts as a copy;
     the frozen "sft" adapter is the reference policy π_ref.
  2. Reward model φ⁽⁰⁾: MSE on human scores or Bradley–Terry on preference pairs [reward_loss].
  3. A policy step on a batch of prompts [make_batch]:
       a. sample k responses per prompt at temperature τ, stopping at EOS [generate];
       b. s = r_φ(prompt ⊕ response), read at the last real token [reward_scores];
       c. R = s − β·KL(π_θ‖π_ref) per sequence, A = RLOO leave-one-out advantages [kl_penalised_reward,
          rloo_advantages];
       d. L(θ) = PPO-clipped surrogate on the sequence ratio ρ = π_θ(y)/π_old(y) [surrogate_loss].
     Iteration 0 is first-order: AdamW on L [rloo_step].
     Iterations ≥ 1 are zeroth-order (SPSA) [zo_step]:
       g = (L(θ+εz) − L(θ−εz)) / 2ε  [spsa_grad],   θ ← θ − lr·(g·z + λθ)  [spsa_update],
     with z from the targeted sampler [targeted_direction]: z = d·μ + √(1−d²)·n, where n is Gaussian noise
     with the reward-delta direction v̂ removed, rescaled to ‖μ‖ per tensor, and d decays over the
     iteration [decay]. `sampler="gaussian"` gives plain MeZO directions z ~ N(0, I).
  4. Between iterations [train]: μ := θ⁽ⁱ⁾ − θ⁽ⁱ⁻¹⁾, the policy's update over the iteration; the reward
     model is refined on judged pairs of the policy's own samples [refine_reward_model], optionally merged
     φ ← α·φ_prev + (1−α)·φ_new, and v := φ⁽ⁱ⁺¹⁾ − φ⁽ⁱ⁾.

Notation:  θ policy adapter | ε eps | z direction | μ prev_update | v reward_delta | d decay |
           g projected_grad | k samples per prompt | β kl_coef | τ temperature | c clip | α rm_alpha

Shapes: B sequences, P prompt length (prompts are left-padded), T response length (right-padded), V vocab.
Importing this module does nothing; it needs only torch and transformers, and does no file I/O.
"""
import contextlib
import hashlib
import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

POLICY, REFERENCE, REWARD = "policy", "sft", "reward"  # adapter names


# ε and lr of an SPSA step, per sampler: their directions live on different scales. zopro: z is a unit vector
# at d = 1, so ε is a length in parameter space and lr a step per unit of slope. mezo: z ~ N(0, I), ‖z‖ ≈ √N
# (N ≈ 2.4M adapter weights on the CPU preset), with MeZO's usual per-weight ε. Both lr values were set, on the
# wmt CPU preset, so that an iteration moves θ about as far as first-order iteration 0 did (‖μ‖ ≈ 0.5): mezo
# lr 5e-5 moved it 0.55; zopro lr 1 moved it only 0.08, hence 5 (README, "What we found"). rloo takes zopro's
# values; it never uses them.
SPSA_DEFAULTS = {"zopro": dict(eps=1e-2, lr=5.0), "mezo": dict(eps=1e-3, lr=5e-5), "rloo": dict(eps=1e-2, lr=5.0)}


@dataclass
class Config:
    method: str = "zopro"           # iterations ≥ 1: "zopro" (targeted SPSA), "mezo" (Gaussian SPSA), "rloo" (first-order)
    seed: int = 0
    iterations: int = 3             # policy iterations, iteration 0 included
    steps_per_iteration: int = 16   # T, policy updates per iteration
    prompts_per_step: int = 8       # B_p; a step sees B_p·k sequences
    k: int = 2                      # samples per prompt (RLOO group)
    micro_batch: int = 16           # sequences per forward pass; memory knob, not a hyperparameter
    gen_batch: int = 64             # rollouts per generate call in refinement; bounds its KV cache [rows, P+T]
    temperature: float = 0.7        # τ
    max_new_tokens: int = 53
    kl_coef: float = 0.05           # β
    clip: float = 0.2               # c
    # zeroth-order (iterations ≥ 1)
    eps: float | None = None        # ε; None: the method's SPSA_DEFAULTS (zopro 1e-2, mezo 1e-3)
    lr: float | None = None         # SPSA step; None: the method's SPSA_DEFAULTS (zopro 5, mezo 5e-5)
    lr_schedule: str = "constant"   # "constant" | "linear" (to 0 over the iteration)
    weight_decay: float = 0.0       # λ
    n_directions: int = 1           # SPSA estimates averaged per step
    decay: str = "linear"           # "linear": d_t = max(0, d0 − t/T) | "exp": d_t = d0·exp(−rate·t/T)
    decay_start: float = 0.999      # d0 < 1, or the first direction holds no noise at all
    decay_rate: float = 5.0
    prev_update_scale: str = "unit"  # "unit": μ scaled to norm 1 | "raw": μ as it is (the original code)
    # first-order (iteration 0, method "rloo")
    fo_lr: float = 1e-4
    # reward refinement between iterations
    refine_prompts: int = 32        # prompts sampled for judged pairs
    pair_keep: float = 0.6          # keep this share of pairs, least confident (smallest |r_a − r_b|) first
    rm_lr: float = 5e-5
    rm_epochs: int = 1
    rm_batch: int = 8
    rm_alpha: float = 0.0           # α: φ ← α·φ_prev + (1−α)·φ_new; 0 keeps the new weights

    def __post_init__(self):
        # Filled once, at construction: dataclasses.replace(cfg, method="mezo") keeps cfg's ε and lr; pass them too.
        if self.method not in SPSA_DEFAULTS:
            raise ValueError(f"unknown method {self.method!r}: use one of {', '.join(SPSA_DEFAULTS)}")
        for k, v in SPSA_DEFAULTS[self.method].items():  # Config(method="mezo") gets mezo's scale, not zopro's
            if getattr(self, k) is None:
                setattr(self, k, v)


# ----------------------------------------------------------------------------------------------------
# LoRA without peft: named adapters that share one frozen base

class LoRALinear(nn.Module):
    """A frozen nn.Linear plus named low-rank adapters: y = Wx + (α/r)·B(Ax) for the active adapter.

    The policy, the reference and the reward model are adapters on the same modules, so they cost one copy
    of the base and their tensors have identical names and shapes (the targeted sampler relies on it).
    Adapter weights are fp32 whatever the base dtype: ε·z is far below bf16 resolution (PAPER.md B10).
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float):
        super().__init__()
        self.base, self.r, self.scaling = base, r, alpha / r
        self.lora_A = nn.ParameterDict()  # adapter name -> [r, in]
        self.lora_B = nn.ParameterDict()  # adapter name -> [out, r]
        self.active = None

    def forward(self, x):
        y = self.base(x)
        if self.active is None:
            return y
        A, B = self.lora_A[self.active], self.lora_B[self.active]
        return y + ((x.to(A.dtype) @ A.T) @ B.T * self.scaling).to(y.dtype)

    def _apply(self, fn, recurse=True):
        """model.to(torch.bfloat16) casts the base but only moves the adapters: they stay fp32."""
        self.base._apply(fn)
        for p in [*self.lora_A.values(), *self.lora_B.values()]:
            p.data = p.data.to(fn(p.data[:0]).device)
        return self


def add_lora(model: nn.Module, targets: tuple[str, ...], r: int, alpha: float) -> None:
    """Wraps every nn.Linear whose name ends in one of `targets` (e.g. "q_proj") in a LoRALinear."""
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and child_name in targets:
                setattr(module, child_name, LoRALinear(child, r, alpha))
    if not lora_layers(model):
        raise ValueError(f"no linear layer named any of {targets} in {type(model).__name__}")


def lora_layers(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def add_adapter(model: nn.Module, name: str, seed: int, trainable: bool = True, like: str | None = None) -> None:
    """A new adapter: A ~ U(±1/√in), B = 0 (so it starts as a no-op), or a copy of adapter `like`."""
    gen = torch.Generator().manual_seed(seed)
    for _, layer in lora_layers(model):
        out_f, in_f = layer.base.weight.shape
        dev = layer.base.weight.device
        if like is not None:
            A, B = layer.lora_A[like].detach().clone(), layer.lora_B[like].detach().clone()
        else:
            A = (torch.rand(layer.r, in_f, generator=gen) * 2 - 1) / math.sqrt(in_f)
            B = torch.zeros(out_f, layer.r)
        layer.lora_A[name] = nn.Parameter(A.float().to(dev), requires_grad=trainable)
        layer.lora_B[name] = nn.Parameter(B.float().to(dev), requires_grad=trainable)


def adapter_params(model: nn.Module, name: str) -> dict[str, nn.Parameter]:
    """The adapter's tensors in one fixed order, keyed by module path (the same keys for every adapter)."""
    out = {}
    for path, layer in lora_layers(model):
        out[f"{path}.lora_A"], out[f"{path}.lora_B"] = layer.lora_A[name], layer.lora_B[name]
    return out


def adapter_state(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    return {k: p.detach().clone() for k, p in adapter_params(model, name).items()}


def load_adapter_state(model: nn.Module, name: str, state: dict[str, torch.Tensor]) -> None:
    params = adapter_params(model, name)
    if params.keys() != state.keys() or any(params[k].shape != state[k].shape for k in params):
        raise ValueError(f"adapter '{name}': saved tensors do not match this model's LoRA layout "
                         "(different base model, LoRA rank or target modules?)")
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(state[k])


@contextlib.contextmanager
def use_adapter(model: nn.Module, name: str | None):
    """Runs the model with adapter `name` (None: the bare base) and restores the previous one."""
    layers = [m for _, m in lora_layers(model)]
    before = [m.active for m in layers]
    for m in layers:
        m.active = name
    try:
        yield
    finally:
        for m, a in zip(layers, before):
            m.active = a


# ----------------------------------------------------------------------------------------------------
# Small helpers

def derive_seed(*parts) -> int:
    """A 63-bit seed that is a pure function of its parts, e.g. (run seed, "direction", step, q).
    Every source of randomness gets its own stream, so direction noise never couples to sampling."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little") >> 1


def make_generator(seed: int, device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that ignore left padding. mask: [B, L] -> [B, L]."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


@dataclass
class Sequences:
    """prompt ⊕ response token ids; prompts left-padded to P, responses right-padded to T.
    ids, mask: [B, P+T] long. The response of row b is ids[b, P:][mask[b, P:] == 1]."""
    ids: torch.Tensor
    mask: torch.Tensor
    prompt_len: int

    @property
    def response_mask(self) -> torch.Tensor:  # [B, T]
        return self.mask[:, self.prompt_len:]

    def __len__(self):
        return self.ids.shape[0]

    def select(self, idx) -> "Sequences":
        return Sequences(self.ids[idx], self.mask[idx], self.prompt_len)

    def chunks(self, size: int):
        for i in range(0, len(self), size):
            yield slice(i, i + size), self.select(slice(i, i + size))


def cat_sequences(parts: list[Sequences], pad_id: int) -> Sequences:
    """The rows of several Sequences with one prompt_len, responses right-padded to the longest."""
    L = max(p.ids.shape[1] for p in parts)
    ids = torch.cat([F.pad(p.ids, (0, L - p.ids.shape[1]), value=pad_id) for p in parts])
    mask = torch.cat([F.pad(p.mask, (0, L - p.mask.shape[1])) for p in parts])
    return Sequences(ids, mask, parts[0].prompt_len)


def pack(prompts: list[list[int]], responses: list[list[int]], pad_id: int, device="cpu") -> Sequences:
    """Lays out token lists as Sequences (prompts left-padded, responses right-padded)."""
    P = max(len(p) for p in prompts)
    T = max(1, max(len(r) for r in responses))
    ids = torch.full((len(prompts), P + T), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, (p, r) in enumerate(zip(prompts, responses)):
        ids[b, P - len(p):P], mask[b, P - len(p):P] = torch.tensor(p, dtype=torch.long), 1
        if r:
            ids[b, P:P + len(r)], mask[b, P:P + len(r)] = torch.tensor(r, dtype=torch.long), 1
    return Sequences(ids.to(device), mask.to(device), P)


def backbone(model: nn.Module) -> nn.Module:
    return model.base_model  # the transformer without its LM head (LlamaModel, GPT2Model, ...)


# ----------------------------------------------------------------------------------------------------
# Forward passes: generation, response log-probs, reward scores

@torch.no_grad()
def generate(model, prompts: Sequences, max_new_tokens: int, temperature: float, eos_id: int, pad_id: int,
             gen: torch.Generator | None = None) -> tuple[Sequences, torch.Tensor]:
    """Samples at `temperature` with `gen` (greedy when gen is None), stopping each row at EOS.

    prompts: Sequences with no response (T = 0 or ignored). Returns the rollouts as Sequences, with the
    EOS token kept and everything after it masked, and their temperature-scaled log-probs [B, T]
    (0 where masked): the log π_old of the surrogate, taken from the sampling pass itself.
    """
    ids, mask = prompts.ids[:, :prompts.prompt_len], prompts.mask[:, :prompts.prompt_len]
    B = ids.shape[0]
    pos, cache = positions(mask), None
    done = torch.zeros(B, dtype=torch.bool, device=ids.device)
    tokens, logps, alive = [], [], []
    step_ids, step_pos = ids, pos
    for _ in range(max_new_tokens):
        out = model(input_ids=step_ids, attention_mask=mask, position_ids=step_pos, cache=cache,
                    use_cache=True, logits_to_keep=1)
        cache = out.cache
        logits = out.logits[:, -1].float() / (temperature if gen is not None else 1.0)  # [B, V]
        tok = (torch.multinomial(logits.softmax(-1), 1, generator=gen).squeeze(-1) if gen is not None
               else logits.argmax(-1))
        logp = logits.log_softmax(-1).gather(-1, tok[:, None]).squeeze(-1)
        live = ~done
        tokens.append(torch.where(live, tok, pad_id))
        logps.append(torch.where(live, logp, 0.0))
        alive.append(live.long())
        done = done | (tok == eos_id)
        mask = torch.cat([mask, live.long()[:, None]], 1)
        step_ids, step_pos = tokens[-1][:, None], step_pos[:, -1:] + 1
        if done.all():
            break
    seq = Sequences(torch.cat([ids, torch.stack(tokens, 1)], 1), torch.cat([prompts.mask[:, :prompts.prompt_len],
                                                                             torch.stack(alive, 1)], 1),
                    prompts.prompt_len)
    return seq, torch.stack(logps, 1)


def response_logprobs(model, seqs: Sequences, temperature: float = 1.0) -> torch.Tensor:
    """log π(y_t | x, y_<t) / temperature-scaled, at the T response positions only: [B, T].
    The LM head runs on response positions alone, so no [B, P+T, V] logits are made."""
    h = backbone(model)(input_ids=seqs.ids, attention_mask=seqs.mask, position_ids=positions(seqs.mask)).last_hidden_state
    h = h[:, seqs.prompt_len - 1:-1]                                          # states predicting y: [B, T, H]
    logits = model.get_output_embeddings()(h).float() / temperature           # [B, T, V]
    y = seqs.ids[:, seqs.prompt_len:, None]
    return logits.gather(-1, y).squeeze(-1) - logits.logsumexp(-1)


@dataclass
class RewardModel:
    """r_φ: the base with adapter `adapter` active, and a linear head on the last real token's state."""
    adapter: str
    head: nn.Linear  # [H] -> [1], fp32


def reward_scores(model, rm: RewardModel, seqs: Sequences) -> torch.Tensor:
    """r_φ(prompt ⊕ response) for each row: [B]. Read at the last real token (padding on both sides)."""
    with use_adapter(model, rm.adapter):
        h = backbone(model)(input_ids=seqs.ids, attention_mask=seqs.mask, position_ids=positions(seqs.mask)).last_hidden_state
    L = seqs.mask.shape[1]
    last = L - 1 - seqs.mask.flip(-1).argmax(-1)                                # [B]
    return rm.head(h[torch.arange(len(seqs), device=h.device), last].float()).squeeze(-1)


# ----------------------------------------------------------------------------------------------------
# Rewards, advantages and the surrogate objective (pure functions)

def kl_penalised_reward(scores, logp_old, logp_ref, response_mask, kl_coef):
    """R = s − β·Σ_t (log π_old − log π_ref) over response tokens. scores [B], logp_* [B, T] -> (R [B], KL [B])."""
    kl = ((logp_old - logp_ref) * response_mask).sum(-1)
    return scores - kl_coef * kl, kl


def rloo_advantages(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """A_i = R_i − mean_{j≠i} R_j within each prompt's group. rewards [B_p·k], grouped prompt-major."""
    if k < 2:
        raise ValueError(f"RLOO needs k >= 2 samples per prompt (leave-one-out of one sample is 0/0); got k={k}")
    R = rewards.view(-1, k)
    baseline = (R.sum(1, keepdim=True) - R) / (k - 1)
    return (R - baseline).view(-1)


def surrogate_loss(logp, logp_old, advantages, response_mask, clip):
    """PPO-clip on the sequence ratio ρ = exp(Σ_t (log π_θ − log π_old)): mean_i max(−A ρ, −A clip(ρ, 1±c)).
    logp, logp_old, response_mask [B, T]; advantages [B]."""
    ratio = torch.exp(((logp - logp_old) * response_mask).sum(-1))
    return torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - clip, 1 + clip)).mean()


def sft_loss(model, seqs: Sequences) -> torch.Tensor:
    """Mean negative log-likelihood of the response tokens (the prompt is context, not target)."""
    m = seqs.response_mask.float()
    return -(response_logprobs(model, seqs) * m).sum() / m.sum()


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """−log σ(r_c − r_r), averaged. [B], [B] -> scalar."""
    return -F.logsigmoid(r_chosen - r_rejected).mean()


def reward_loss(model, rm: RewardModel, batch) -> torch.Tensor:
    """batch: (Sequences, targets [B]) -> MSE on scalar scores; (chosen, rejected) Sequences -> Bradley–Terry."""
    a, b = batch
    if isinstance(b, Sequences):
        return bradley_terry_loss(reward_scores(model, rm, a), reward_scores(model, rm, b))
    return F.mse_loss(reward_scores(model, rm, a), b.to(a.ids.device).float())


# ----------------------------------------------------------------------------------------------------
# The targeted sampler

def targeted_direction(noise, prev_update, reward_delta, decay, noise_norm):
    """z = d·μ + √(1−d²)·n for one tensor, n = p·noise_norm/‖p‖ with p = g − (v·g/‖v‖²)·v.

    noise g ~ N(0, I), prev_update μ, reward_delta v: same shape. p is g with the direction of v removed;
    a tensor the reward did not move (v = 0) is not projected, and gives no NaN (B8). noise_norm is ‖μ‖
    (or a stand-in when μ is zero, see Sampler). So z ⟂ v when d = 0, and z = μ when d = 1.
    """
    p = noise - ((reward_delta * noise).sum() / (reward_delta * reward_delta).sum().clamp_min(1e-30)) * reward_delta
    n = p * (noise_norm / p.norm().clamp_min(1e-12))
    return decay * prev_update + math.sqrt(max(0.0, 1 - decay * decay)) * n


def decay(t: int, T: int, kind: str, start: float, rate: float) -> float:
    """d_t for step t of T. linear: max(0, d0 − t/T). exp: d0·e^(−rate·t/T), whatever T is
    (the original's e^(−t) was ~0 after 5 steps however long the iteration)."""
    if kind == "linear":
        return max(0.0, start - t / T)
    if kind == "exp":
        return start * math.exp(-rate * t / T)
    raise ValueError(f"unknown decay schedule {kind!r}: use 'linear' or 'exp'")


class Sampler:
    """Builds the SPSA direction z of every trainable tensor from a seed. perturb and update both call
    `directions`, so z is regenerated, never stored. kind "gaussian": z ~ N(0, I) (MeZO). kind
    "targeted": ZOPrO's z, given μ (prev_update) and v (reward_delta), keyed like the policy adapter."""

    def __init__(self, kind: str, params: dict[str, torch.Tensor], prev_update=None, reward_delta=None):
        if kind not in ("gaussian", "targeted"):
            raise ValueError(f"unknown sampler {kind!r}: use 'gaussian' or 'targeted'")
        self.kind = kind
        if kind == "gaussian":
            return
        missing = [k for k in params if k not in prev_update or k not in reward_delta]
        if missing:
            raise ValueError(f"targeted sampler: no previous update / reward delta for {missing[:3]}... "
                             "(policy and reward adapters must share names and shapes)")
        # μ and v as given (fp32 tensors are not copied): the sampler holds no adapter-sized state of its own
        self.mu = {k: prev_update[k].float() for k in params}
        self.v = {k: reward_delta[k].float() for k in params}
        # A tensor with μ = 0 would get z = 0 and never move (B9): explore it at the typical scale of μ.
        total = sum(m.numel() for m in self.mu.values())
        rms = math.sqrt(sum(float(m.pow(2).sum()) for m in self.mu.values()) / total)
        if rms == 0:
            raise ValueError("targeted sampler: the previous update μ is zero everywhere (did the last "
                             "iteration skip every step?); use sampler 'gaussian' for this iteration")
        self.noise_norm = {k: (float(m.norm()) or rms * math.sqrt(m.numel())) for k, m in self.mu.items()}

    def directions(self, params: dict[str, torch.Tensor], seed: int, d: float):
        """Yields (param, z) in the fixed order of `params`; the same seed gives the same z."""
        gen = make_generator(seed, next(iter(params.values())).device)
        for k, p in params.items():
            g = torch.randn(p.shape, generator=gen, device=p.device, dtype=torch.float32)
            yield p, (g if self.kind == "gaussian" else
                      targeted_direction(g, self.mu[k], self.v[k], d, self.noise_norm[k]))


# ----------------------------------------------------------------------------------------------------
# SPSA: perturb in place, estimate, update

@torch.no_grad()
def perturb(params, sampler: Sampler, seed: int, d: float, scale: float) -> None:
    """θ ← θ + scale·z."""
    for p, z in sampler.directions(params, seed, d):
        p.add_(z, alpha=scale)


def spsa_grad(loss_fn, params, sampler: Sampler, seed: int, d: float, eps: float):
    """g = (L(θ+εz) − L(θ−εz)) / 2ε; θ is restored by the +ε, −2ε, +ε walk. Returns (g, L₊, L₋)."""
    perturb(params, sampler, seed, d, +eps)
    loss_plus = loss_fn()
    perturb(params, sampler, seed, d, -2 * eps)
    loss_minus = loss_fn()
    perturb(params, sampler, seed, d, +eps)
    return (loss_plus - loss_minus) / (2 * eps), loss_plus, loss_minus


def decays_weight(name: str) -> bool:
    """Weight decay applies to every tensor but biases and norms (all LoRA A/B tensors qualify)."""
    return not any(s in name.lower() for s in ("bias", "norm"))


@torch.no_grad()
def spsa_update(params, sampler: Sampler, seeds: list[int], grads: list[float], d: float, lr: float,
                weight_decay: float) -> None:
    """θ ← θ − lr·(mean_q g_q·z_q + λθ). Note that ε does not scale the step."""
    if weight_decay:
        for name, p in params.items():
            if decays_weight(name):
                p.mul_(1 - lr * weight_decay)
    for seed, g in zip(seeds, grads):
        for p, z in sampler.directions(params, seed, d):
            p.add_(z, alpha=-lr * g / len(seeds))


# ----------------------------------------------------------------------------------------------------
# One policy step

@dataclass
class Batch:
    """A step's rollouts and everything the surrogate needs; tensors are [B] or [B, T]."""
    seqs: Sequences
    logp_old: torch.Tensor
    logp_ref: torch.Tensor
    scores: torch.Tensor
    kl: torch.Tensor
    rewards: torch.Tensor
    advantages: torch.Tensor
    seconds: dict = field(default_factory=dict)


def _timed(seconds: dict, key: str, fn):
    t0 = time.perf_counter()
    out = fn()
    seconds[key] = seconds.get(key, 0.0) + time.perf_counter() - t0
    return out


def chunked(fn, seqs: Sequences, size: int) -> torch.Tensor:
    """fn applied to micro-batches of `size` rows and concatenated along the batch."""
    return torch.cat([fn(c) for _, c in seqs.chunks(size)])


@torch.no_grad()
def make_batch(model, prompts: Sequences, rm: RewardModel, cfg: Config, gen, eos_id: int, pad_id: int) -> Batch:
    """Steps 3a–3c: k rollouts per prompt from the policy, scores, KL-penalised rewards, RLOO advantages."""
    t = {}
    rep = prompts.select(torch.arange(len(prompts), device=prompts.ids.device).repeat_interleave(cfg.k))
    with use_adapter(model, POLICY):
        seqs, logp_old = _timed(t, "generate", lambda: generate(model, rep, cfg.max_new_tokens, cfg.temperature,
                                                                eos_id, pad_id, gen))
    with use_adapter(model, REFERENCE):
        logp_ref = _timed(t, "reference", lambda: chunked(
            lambda c: response_logprobs(model, c, cfg.temperature), seqs, cfg.micro_batch))
    scores = _timed(t, "reward", lambda: chunked(lambda c: reward_scores(model, rm, c), seqs, cfg.micro_batch))
    rewards, kl = kl_penalised_reward(scores, logp_old, logp_ref, seqs.response_mask, cfg.kl_coef)
    return Batch(seqs, logp_old, logp_ref, scores, kl, rewards, rloo_advantages(rewards, cfg.k), t)


def batch_loss(model, batch: Batch, cfg: Config, backward: bool = False) -> float:
    """L(θ) over the batch, in micro-batches; with backward=True also accumulates ∇L into .grad."""
    total = 0.0
    for sl, c in batch.seqs.chunks(cfg.micro_batch):
        with use_adapter(model, POLICY), torch.set_grad_enabled(backward):
            logp = response_logprobs(model, c, cfg.temperature)
            loss = surrogate_loss(logp, batch.logp_old[sl], batch.advantages[sl], c.response_mask, cfg.clip)
            loss = loss * len(c) / len(batch.seqs)
        if backward:
            loss.backward()
        total += loss.item()
    return total


def zo_step(model, params, sampler: Sampler, batch: Batch, cfg: Config, step: int, d: float, lr: float) -> dict:
    """One SPSA update (step 3, iterations ≥ 1). A NaN/inf estimate skips the update."""
    seeds = [derive_seed(cfg.seed, "direction", step, q) for q in range(cfg.n_directions)]
    loss_fn = lambda: batch_loss(model, batch, cfg)  # noqa: E731
    t0 = time.perf_counter()
    est = [spsa_grad(loss_fn, params, sampler, s, d, cfg.eps) for s in seeds]
    batch.seconds["forward_pm"] = time.perf_counter() - t0
    grads = [g for g, _, _ in est]
    skipped = not all(math.isfinite(g) for g in grads)
    t0 = time.perf_counter()
    if not skipped:
        spsa_update(params, sampler, seeds, grads, d, lr, cfg.weight_decay)
    batch.seconds["update"] = time.perf_counter() - t0
    return {"seed": seeds[0], "projected_grad": sum(grads) / len(grads), "loss_plus": est[0][1],
            "loss_minus": est[0][2], "skipped": skipped}


def rloo_step(model, params, optimizer, batch: Batch, cfg: Config, lr: float) -> dict:
    """One first-order update on the same surrogate (iteration 0, and method "rloo")."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    loss = batch_loss(model, batch, cfg, backward=True)
    grad_norm = torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0).item()
    skipped = not math.isfinite(grad_norm)
    if not skipped:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    batch.seconds["backward_update"] = time.perf_counter() - t0
    return {"loss": loss, "grad_norm": grad_norm, "skipped": skipped}


# ----------------------------------------------------------------------------------------------------
# Reward model: first-order fitting, judges, refinement between iterations

def reward_part(micro_batch: int, pairs: bool) -> int:
    """Rows of a reward-model batch per backward (fit's `part`): a preference pair is two sequences."""
    return max(1, micro_batch // 2) if pairs else micro_batch


def fit(params: list[torch.Tensor], loss_fn, batches, lr: float, on_batch=None, part: int = 0) -> list[float]:
    """Plain AdamW over `batches` (SFT and reward-model training). Returns the losses.

    A batch is a list or an index tensor. With part > 0 it goes through loss_fn in slices of `part` rows whose
    gradients, weighted by each slice's share of the rows, add up to one step: exact for a loss that is a mean
    over rows (MSE, Bradley–Terry), with the memory of one slice."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses = []
    for b in batches:
        opt.zero_grad(set_to_none=True)
        n = len(b)
        size, loss = part or n, 0.0
        for i in range(0, n, size):
            l = loss_fn(b[i:i + size]) * (min(size, n - i) / n)
            l.backward()
            loss += l.item()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss)
        if on_batch:
            on_batch(losses[-1])
    return losses


def reward_state(model, rm: RewardModel) -> dict[str, torch.Tensor]:
    """φ: the reward adapter's tensors plus the head's (head.weight, head.bias)."""
    state = adapter_state(model, rm.adapter)
    state.update({f"head.{k}": v.detach().clone() for k, v in rm.head.state_dict().items()})
    return state


def load_reward_state(model, rm: RewardModel, state: dict[str, torch.Tensor]) -> None:
    load_adapter_state(model, rm.adapter, {k: v for k, v in state.items() if not k.startswith("head.")})
    rm.head.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("head.")})


class RewardModelJudge:
    """Prefers the answer that a (fixed) reward model scores higher. Deterministic."""

    def __init__(self, model, rm: RewardModel, micro_batch: int = 16):
        self.model, self.rm, self.micro_batch = model, rm, micro_batch

    @torch.no_grad()
    def __call__(self, questions, answers_a, answers_b, seqs_a: Sequences, seqs_b: Sequences, seed: int):
        score = lambda s: chunked(lambda c: reward_scores(self.model, self.rm, c), s, self.micro_batch)  # noqa: E731
        return score(seqs_a) > score(seqs_b)


class LLMJudge:
    """Asks a causal LM which of two answers is better and compares the next-token probabilities of the
    two labels ("A", "B") instead of sampling. The order is flipped at random (seeded) against position bias.
    `adapter` picks the LM: None is the bare base model, so the judge costs no extra memory."""

    QUESTION = ("Which response is better? Judge accuracy, fluency and faithfulness to the request.\n\n"
                "Request:\n{q}\n\nResponse A:\n{a}\n\nResponse B:\n{b}\n\nAnswer with a single letter: A or B.")

    def __init__(self, model, tokenizer, adapter: str | None = None):
        self.model, self.tok, self.adapter = model, tokenizer, adapter
        self.label_ids = [tokenizer.encode(x, add_special_tokens=False)[0] for x in ("A", "B")]

    def prompt(self, q: str, a: str, b: str) -> list[int]:
        text = self.QUESTION.format(q=q, a=a, b=b)
        if self.tok.chat_template:
            return self.tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                tokenize=True, return_dict=False)
        return self.tok.encode(text + "\nAnswer:", add_special_tokens=False)

    @torch.no_grad()
    def first_is_better(self, question: str, first: str, second: str) -> bool:
        """P(next token = "A") > P(next token = "B") for the prompt that shows `first` as A."""
        x = torch.tensor([self.prompt(question, first, second)], device=self.model.device)
        with use_adapter(self.model, self.adapter):
            logits = self.model(input_ids=x, logits_to_keep=1).logits[0, -1]
        return bool(logits[self.label_ids[0]] > logits[self.label_ids[1]])

    def __call__(self, questions, answers_a, answers_b, seqs_a, seqs_b, seed: int):
        flip = torch.rand(len(questions), generator=torch.Generator().manual_seed(seed)) < 0.5
        better_a = [self.first_is_better(q, b, a) != f if f else self.first_is_better(q, a, b)
                    for q, a, b, f in zip(questions, answers_a, answers_b, flip.tolist())]
        return torch.tensor(better_a, device=seqs_a.ids.device)


def split_pairs(seqs: Sequences) -> tuple[Sequences, Sequences]:
    """Rows (2i, 2i+1) are two answers to prompt i: returns (answers a, answers b), aligned by construction."""
    return seqs.select(slice(0, None, 2)), seqs.select(slice(1, None, 2))


def refine_reward_model(model, rm: RewardModel, judge, prompts: Sequences, questions: list[str], tokenizer,
                        cfg: Config, seed: int, eos_id: int, pad_id: int) -> dict:
    """Step 4: φ⁽ⁱ⁺¹⁾ from judged pairs of the policy's own samples. Returns metrics; φ is updated in place."""
    dev = prompts.ids.device
    gen = make_generator(derive_seed(seed, "pairs"), dev)
    rep = prompts.select(torch.arange(len(prompts), device=dev).repeat_interleave(2))
    with use_adapter(model, POLICY):  # 2·refine_prompts rows: 1024 on the GPU preset, so in gen_batch calls
        seqs = cat_sequences([generate(model, c, cfg.max_new_tokens, cfg.temperature, eos_id, pad_id, gen)[0]
                              for _, c in rep.chunks(cfg.gen_batch)], pad_id)
    a, b = split_pairs(seqs)
    score = lambda s: chunked(lambda c: reward_scores(model, rm, c), s, cfg.micro_batch)  # noqa: E731
    with torch.no_grad():
        margin = (score(a) - score(b)).abs()
    keep = margin.argsort()[:max(1, int(cfg.pair_keep * len(a)))]  # least confident pairs first
    a, b = a.select(keep), b.select(keep)
    text = lambda s: [tokenizer.decode(r[m == 1], skip_special_tokens=True).strip()  # noqa: E731
                      for r, m in zip(s.ids[:, s.prompt_len:], s.response_mask)]
    qs = [questions[i] for i in keep.tolist()]
    a_better = judge(qs, text(a), text(b), a, b, derive_seed(seed, "judge"))
    chosen = Sequences(torch.where(a_better[:, None], a.ids, b.ids), torch.where(a_better[:, None], a.mask, b.mask), a.prompt_len)
    rejected = Sequences(torch.where(a_better[:, None], b.ids, a.ids), torch.where(a_better[:, None], b.mask, a.mask), a.prompt_len)
    before = reward_state(model, rm)
    with torch.no_grad():
        acc_before = (score(chosen) > score(rejected)).float().mean().item()
    order = torch.randperm(len(chosen), generator=torch.Generator().manual_seed(derive_seed(seed, "rm-order")))
    batches = [order[i:i + cfg.rm_batch] for _ in range(cfg.rm_epochs) for i in range(0, len(order), cfg.rm_batch)]
    params = list(adapter_params(model, rm.adapter).values()) + list(rm.head.parameters())
    losses = fit(params, lambda idx: reward_loss(model, rm, (chosen.select(idx), rejected.select(idx))), batches,
                 cfg.rm_lr, part=reward_part(cfg.micro_batch, pairs=True))
    if cfg.rm_alpha:
        after = reward_state(model, rm)
        load_reward_state(model, rm, {k: cfg.rm_alpha * before[k] + (1 - cfg.rm_alpha) * after[k] for k in after})
    return {"pairs": len(chosen), "judge_prefers_a": a_better.float().mean().item(),
            "rm_agreement_before": acc_before, "rm_loss": sum(losses) / len(losses)}


# ----------------------------------------------------------------------------------------------------
# The loop

@dataclass
class State:
    """Everything needed to resume, besides the adapter weights that live in the model."""
    iteration: int = 0
    step: int = 0                                   # step within the iteration
    global_step: int = 0
    prev_update: dict | None = None                 # μ for this iteration (None in iteration 0)
    reward_delta: dict | None = None                # v for this iteration
    iteration_start: dict | None = None             # θ at the start of this iteration
    optimizer: dict | None = None                   # AdamW state while an iteration is first-order


def step_lr(cfg: Config, base: float, t: int) -> float:
    return base * (1 - t / cfg.steps_per_iteration) if cfg.lr_schedule == "linear" else base


def is_first_order(cfg: Config, iteration: int) -> bool:
    return iteration == 0 or cfg.method == "rloo"


def prompt_order(n: int, cfg: Config, iteration: int) -> torch.Tensor:
    """The prompt indices of one iteration, a seeded permutation (repeated if the iteration needs more)."""
    need = cfg.steps_per_iteration * cfg.prompts_per_step
    gen = torch.Generator().manual_seed(derive_seed(cfg.seed, "order", iteration))
    return torch.cat([torch.randperm(n, generator=gen) for _ in range(-(-need // n))])[:need]


def train(model, tokenizer, cfg: Config, prompts: Sequences, questions: list[str], rm: RewardModel, judge,
          state: State, on_step=None, on_iteration_end=None) -> State:
    """Runs (or resumes, from `state`) the policy iterations. `prompts` are the training prompts and
    `questions` their plain text for the judge. on_step(state, metrics) and on_iteration_end(state, metrics)
    do the caller's logging and checkpointing; either may raise to stop the run."""
    params = adapter_params(model, POLICY)
    while state.iteration < cfg.iterations:
        if state.iteration_start is None:
            state.iteration_start = adapter_state(model, POLICY)
        # ALGO: iteration 0 (and method "rloo") is first-order; later ones sample directions from μ and v
        # (targeted, ZOPrO) or from N(0, I) (gaussian, MeZO).
        sampler = optimizer = None
        if is_first_order(cfg, state.iteration):
            optimizer = torch.optim.AdamW(params.values(), lr=cfg.fo_lr, weight_decay=cfg.weight_decay)
            if state.optimizer is not None:
                optimizer.load_state_dict(state.optimizer)
        else:
            kind = "targeted" if cfg.method == "zopro" else "gaussian"
            sampler = Sampler(kind, params, state.prev_update, state.reward_delta)
        order = prompt_order(len(prompts), cfg, state.iteration)
        while state.step < cfg.steps_per_iteration:
            idx = order[state.step * cfg.prompts_per_step:(state.step + 1) * cfg.prompts_per_step]
            m = policy_step(model, tokenizer, params, cfg, state, prompts.select(idx.to(prompts.ids.device)), rm,
                            sampler, optimizer)
            state.step += 1
            state.global_step += 1
            if on_step:
                on_step(state, m)
        metrics = end_iteration(model, tokenizer, params, cfg, state, prompts, questions, rm, judge)
        if on_iteration_end:
            on_iteration_end(state, metrics)
    return state


def policy_step(model, tokenizer, params, cfg: Config, state: State, prompts: Sequences, rm: RewardModel,
                sampler: Sampler | None, optimizer) -> dict:
    """One update on a batch of prompts: rollouts, then SPSA (sampler given) or AdamW (optimizer given)."""
    t, t0 = state.step, time.perf_counter()
    gen = make_generator(derive_seed(cfg.seed, "rollout", state.global_step), prompts.ids.device)
    batch = make_batch(model, prompts, rm, cfg, gen, tokenizer.eos_token_id, tokenizer.pad_token_id)
    if optimizer is not None:
        lr, d = step_lr(cfg, cfg.fo_lr, t), None
        m = rloo_step(model, params, optimizer, batch, cfg, lr)
        state.optimizer = optimizer.state_dict()
    else:
        lr, d = step_lr(cfg, cfg.lr, t), decay(t, cfg.steps_per_iteration, cfg.decay, cfg.decay_start, cfg.decay_rate)
        m = zo_step(model, params, sampler, batch, cfg, state.global_step, d, lr)
    batch.seconds["step"] = time.perf_counter() - t0
    return {**m, "iteration": state.iteration, "step": t, "global_step": state.global_step, "lr": lr, "decay": d,
            "reward": batch.scores.mean().item(), "kl": batch.kl.mean().item(),
            "rlhf_reward": batch.rewards.mean().item(),
            "response_len": batch.seqs.response_mask.sum(-1).float().mean().item(), "seconds": batch.seconds}


def previous_update(theta: dict, start: dict, scale: str) -> tuple[dict, float]:
    """μ = θ⁽ⁱ⁾ − θ⁽ⁱ⁻¹⁾. With scale "unit", μ/‖μ‖: at d = 1 the direction is then a unit vector, SPSA
    measures the slope along it and lr is a step length, whatever ‖μ‖ was. With "raw" (the original code)
    the step grows with ‖μ‖², so one iteration's step size feeds the next one's quadratically.
    Returns (μ, ‖μ‖ before scaling)."""
    mu = {k: p.detach() - start[k] for k, p in theta.items()}
    norm = math.sqrt(sum(float(x.pow(2).sum()) for x in mu.values()))
    if scale not in ("unit", "raw"):
        raise ValueError(f"unknown prev_update_scale {scale!r}: use 'unit' or 'raw'")
    return ({k: x / norm for k, x in mu.items()} if scale == "unit" and norm > 0 else mu), norm


def end_iteration(model, tokenizer, params, cfg: Config, state: State, prompts: Sequences, questions, rm, judge) -> dict:
    """ALGO: after iteration i: μ = θ⁽ⁱ⁾ − θ⁽ⁱ⁻¹⁾; refine φ on judged pairs; v = φ⁽ⁱ⁺¹⁾ − φ⁽ⁱ⁾."""
    it = state.iteration
    metrics = {"iteration": it}
    mu, metrics["prev_update_norm"] = previous_update(params, state.iteration_start, cfg.prev_update_scale)
    if it + 1 < cfg.iterations:  # no refinement after the last iteration: nothing would use it
        phi_before = adapter_state(model, rm.adapter)
        sel = prompt_order(len(prompts), cfg, it)[:cfg.refine_prompts].to(prompts.ids.device)
        metrics.update(refine_reward_model(model, rm, judge, prompts.select(sel), [questions[i] for i in sel.tolist()],
                                           tokenizer, cfg, derive_seed(cfg.seed, "refine", it),
                                           tokenizer.eos_token_id, tokenizer.pad_token_id))
        state.reward_delta = {k: v - phi_before[k] for k, v in adapter_state(model, rm.adapter).items()}
        metrics["reward_delta_norm"] = math.sqrt(sum(float(v.pow(2).sum()) for v in state.reward_delta.values()))
        metrics["cos_prev_update_reward_delta"] = cosine(mu, state.reward_delta)
    state.prev_update = mu
    state.iteration, state.step, state.iteration_start, state.optimizer = it + 1, 0, None, None
    return metrics


def cosine(a: dict, b: dict) -> float:
    """cos∠(a, b) of two tensor dicts flattened over their shared keys (the interplay the paper plots)."""
    keys = [k for k in a if k in b]
    dot = sum(float((a[k].float() * b[k].float()).sum()) for k in keys)
    na = math.sqrt(sum(float(a[k].float().pow(2).sum()) for k in keys))
    nb = math.sqrt(sum(float(b[k].float().pow(2).sum()) for k in keys))
    return dot / (na * nb) if na > 0 and nb > 0 else 0.0


# ----------------------------------------------------------------------------------------------------
# Evaluation (train.py reports with it, evaluate.py too)

@torch.no_grad()
def evaluate_policy(model, prompts: Sequences, rm: RewardModel, cfg: Config, eos_id: int, pad_id: int,
                    adapter: str = POLICY, seed: int = 0, batch_size: int = 16, on_batch=None) -> dict:
    """Greedy responses scored by `rm`, and a KL(π_τ‖π_ref,τ) estimate from one response per prompt sampled
    at the training temperature. Returns per-prompt lists: reward, kl, length, finished (EOS before the
    token limit), responses (token ids without the EOS). on_batch(rows done) is called after each batch."""
    out = {"reward": [], "kl": [], "length": [], "finished": [], "responses": []}
    for i in range(0, len(prompts), batch_size):
        p = prompts.select(slice(i, i + batch_size))
        with use_adapter(model, adapter):
            greedy, _ = generate(model, p, cfg.max_new_tokens, 1.0, eos_id, pad_id, gen=None)
            sampled, logp = generate(model, p, cfg.max_new_tokens, cfg.temperature, eos_id, pad_id,
                                     make_generator(derive_seed(seed, "eval-kl", i), p.ids.device))
        with use_adapter(model, REFERENCE):
            logp_ref = response_logprobs(model, sampled, cfg.temperature)
        out["reward"] += reward_scores(model, rm, greedy).tolist()
        out["kl"] += ((logp - logp_ref) * sampled.response_mask).sum(-1).tolist()
        for r, m in zip(greedy.ids[:, greedy.prompt_len:], greedy.response_mask):
            r = r[m == 1]
            finished = len(r) > 0 and r[-1].item() == eos_id
            out["finished"].append(finished)
            out["length"].append(len(r) - int(finished))
            out["responses"].append(r[:len(r) - int(finished)].tolist())
        if on_batch:
            on_batch(len(p))
    return out
