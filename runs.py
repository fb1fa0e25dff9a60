"""What train.py and evaluate.py share: the run folder, atomic safetensors checkpoints, and building the
model with its adapters and the encoded data for a run's settings."""
import json
import math
import os
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

import zopro
from models import load_model
from metrics import mean_stderr
from tasks import TASKS, DataError

EVAL_RM = "eval_rm"  # adapter holding φ⁽⁰⁾, frozen: the evaluation reward model (and the default judge)

# Settings that may differ between a run and its resumption; every other one must match.
RESUME_FREE = {"out", "resume", "stop_after", "save_every", "data_dir"}


class RunError(RuntimeError):
    pass


# ----------------------------------------------------------------------------------------------------
# Run folder

class RunDir:
    """runs/NAME/: config.json, log.txt, metrics.jsonl (one object per policy step), iterations.jsonl,
    samples.jsonl, results.json and checkpoints/*.safetensors."""

    def __init__(self, path: str, settings: dict, resume: bool):
        self.path = Path(path)
        self.ckpt = self.path / "checkpoints"
        cfg_file = self.path / "config.json"
        started = any(self.ckpt.glob("*.safetensors"))  # a run that failed before its first checkpoint can restart
        if started and not resume:
            raise RunError(f"{self.path} already holds a run. Pass --resume to continue it, or choose another --out.")
        if resume and not cfg_file.exists():
            raise RunError(f"--resume: {self.path} holds no run (no config.json).")
        if resume:
            check_same_config(json.loads(cfg_file.read_text()), settings, self.path)
        self.ckpt.mkdir(parents=True, exist_ok=True)
        write_atomic(cfg_file, json.dumps(settings, indent=2, sort_keys=True))

    def log(self, msg: str) -> None:
        with open(self.path / "log.txt", "a") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg}\n")

    def append(self, name: str, record: dict) -> None:
        with open(self.path / name, "a") as f:
            f.write(json.dumps(record, default=_jsonable) + "\n")

    def truncate_steps(self, global_step: int) -> None:
        """On resume, drop the step records after the checkpoint: the resumed run writes them again."""
        f = self.path / "metrics.jsonl"
        if f.exists():
            keep = [ln for ln in f.read_text().splitlines() if ln and json.loads(ln)["global_step"] < global_step]
            write_atomic(f, "".join(ln + "\n" for ln in keep))


def _jsonable(x):
    if isinstance(x, torch.Tensor):
        return x.tolist()
    raise TypeError(f"not JSON: {type(x)}")


def check_same_config(saved: dict, now: dict, path) -> None:
    diff = {k: (saved.get(k), now.get(k)) for k in set(saved) | set(now)
            if k not in RESUME_FREE and saved.get(k) != now.get(k)}
    if diff:
        lines = ", ".join(f"{k}: {a!r} (saved) vs {b!r} (now)" for k, (a, b) in sorted(diff.items()))
        raise RunError(f"{path} was made with another configuration ({lines}). "
                       "Resume with the same flags, or start a new run with another --out.")


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Atomic: a crash leaves the previous file intact, never a half-written one."""
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp),
              metadata={"zopro": json.dumps(meta, default=_jsonable)})
    os.replace(tmp, path)


def load_tensors(path: Path, device="cpu") -> tuple[dict, dict]:
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("zopro", "{}"))
    return load_file(str(path), device=str(device)), meta


def prefixed(prefix: str, d: dict | None) -> dict:
    return {f"{prefix}/{k}": v for k, v in (d or {}).items()}


def unprefixed(prefix: str, d: dict) -> dict | None:
    out = {k[len(prefix) + 1:]: v for k, v in d.items() if k.startswith(prefix + "/")}
    return out or None


# ----------------------------------------------------------------------------------------------------
# Checkpoints of the policy loop

def save_checkpoint(run: RunDir, model, rm, state: zopro.State, settings: dict) -> None:
    """checkpoints/latest.safetensors: θ, φ, μ, v, θ at the iteration start, AdamW state, loop position."""
    tensors = {**prefixed("policy", zopro.adapter_state(model, zopro.POLICY)),
               **prefixed("reward", zopro.reward_state(model, rm)),
               **prefixed("mu", state.prev_update), **prefixed("v", state.reward_delta),
               **prefixed("start", state.iteration_start)}
    opt_groups = None
    if state.optimizer is not None:
        for idx, s in state.optimizer["state"].items():
            tensors.update({f"opt/{idx}/{k}": torch.as_tensor(v) for k, v in s.items()})
        opt_groups = state.optimizer["param_groups"]
    meta = {"iteration": state.iteration, "step": state.step, "global_step": state.global_step,
            "opt_groups": opt_groups, "settings": settings}
    save_tensors(run.ckpt / "latest.safetensors", tensors, meta)


def load_checkpoint(run: RunDir, model, rm, device) -> zopro.State | None:
    path = run.ckpt / "latest.safetensors"
    if not path.exists():
        return None
    t, meta = load_tensors(path, device)
    zopro.load_adapter_state(model, zopro.POLICY, unprefixed("policy", t))
    zopro.load_reward_state(model, rm, unprefixed("reward", t))
    optimizer = None
    if meta["opt_groups"] is not None:
        opt = {}
        for k, v in t.items():
            if k.startswith("opt/"):
                _, idx, name = k.split("/")
                opt.setdefault(int(idx), {})[name] = v if name != "step" else v.cpu()
        optimizer = {"state": opt, "param_groups": meta["opt_groups"]}
    return zopro.State(iteration=meta["iteration"], step=meta["step"], global_step=meta["global_step"],
                       prev_update=unprefixed("mu", t), reward_delta=unprefixed("v", t),
                       iteration_start=unprefixed("start", t), optimizer=optimizer)


# ----------------------------------------------------------------------------------------------------
# Building a run: model, adapters, reward models, data

def pick_device(name: str) -> str:
    if name != "auto":
        return name
    return "cuda" if torch.cuda.is_available() else "cpu"


def build_model(s: dict, log=print):
    """The base model with LoRA layers and the adapters of a run: sft (reference), policy, reward, eval_rm."""
    # fp32 unless asked: with a bf16 base, activations round the effect of ε·z, and SPSA estimates of one
    # direction on one batch scatter ~30x wider than in fp32, with random sign (README, What we found).
    dtype = {"auto": torch.float32, "bf16": torch.bfloat16, "fp32": torch.float32}[s["dtype"]]
    model, tok = load_model(s["model"], dtype, s["device"], log)
    zopro.add_lora(model, tuple(s["lora_targets"].split(",")), s["lora_r"], s["lora_alpha"])
    for i, (name, trainable) in enumerate([(zopro.REFERENCE, True), (zopro.POLICY, True),
                                           (zopro.REWARD, True), (EVAL_RM, False)]):
        zopro.add_adapter(model, name, zopro.derive_seed(s["seed"], "lora-init", i), trainable)
    hidden = model.get_output_embeddings().weight.shape[1]
    heads = [torch.nn.Linear(hidden, 1).float().to(s["device"]) for _ in range(2)]
    for h in heads:  # a zero head: the untrained reward model scores everything 0
        torch.nn.init.zeros_(h.weight), torch.nn.init.zeros_(h.bias)
    heads[1].requires_grad_(False)
    return model, tok, zopro.RewardModel(zopro.REWARD, heads[0]), zopro.RewardModel(EVAL_RM, heads[1])


def encode_prompt(tok, messages: list[dict]) -> list[int]:
    if tok.chat_template:
        return tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
    return tok.encode(text, add_special_tokens=False)


def encode_response(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False) + [tok.eos_token_id]


def load_split(s: dict, role: str):
    """Rows of the task's `role` split: "train", "dev" (selection) or "test" (report)."""
    task = TASKS[s["task"]]
    rows = task.load(task.splits[role], s["data_dir"])
    if not rows:
        raise DataError(f"{s['task']} {role} split is empty")
    return rows


def fit_rows(tok, rows, s: dict, role: str, log=print, answers: str = "none"):
    """Rows whose prompt fits max_prompt_len and whose answers fit max_new_tokens, encoded.
    answers: "none" (prompts only, each distinct prompt once), "response" (SFT targets) or "both" (the
    reward model's data: the response, and the rejected answer of a pair). Returns (rows, prompts, answers)
    with answers [] / response ids / (chosen ids, rejected ids) per row."""
    kept, prompts, encoded, seen = [], [], [], set()
    for r in rows:
        if answers == "none" and r.question in seen:  # several pairs of one post: score its prompt once
            continue
        seen.add(r.question)
        p = encode_prompt(tok, r.messages)
        resp = encode_response(tok, r.response) if answers != "none" else []
        rej = encode_response(tok, r.rejected) if answers == "both" and r.rejected is not None else None
        if len(p) <= s["max_prompt_len"] and max(len(resp), len(rej or [])) <= s["max_new_tokens"]:
            kept.append(r), prompts.append(p), encoded.append(resp if rej is None else (resp, rej))
    dropped = len(seen) - len(kept) if answers == "none" else len(rows) - len(kept)
    if dropped:
        log(f"[data] {role}: dropped {dropped} of {len(kept) + dropped} rows longer than max_prompt_len="
            f"{s['max_prompt_len']}" + (f" / max_new_tokens={s['max_new_tokens']}" if answers != "none" else ""))
    if not kept:
        raise DataError(f"{role}: no row fits max_prompt_len={s['max_prompt_len']} / max_new_tokens="
                        f"{s['max_new_tokens']}; raise them")
    return kept, prompts, encoded


def take(items: list, n: int, seed: int, stream: str) -> list:
    """A seeded sample of n items (all of them, shuffled, if n is 0 or too large)."""
    g = torch.Generator().manual_seed(zopro.derive_seed(seed, stream))
    idx = torch.randperm(len(items), generator=g).tolist()
    return [items[i] for i in (idx[:n] if n else idx)]


def held_out_prompts(tok, s: dict, rows, say=print) -> tuple[list, list[list[int]]]:
    """The held-out prompts a report scores: rows that fit, then a sample of s["test_prompts"] seeded by
    s["seed"] (0: all). Returns (rows, prompt token ids), aligned."""
    rows, p, _ = fit_rows(tok, rows, s, "test", say)
    rows, p = zip(*take(list(zip(rows, p)), s["test_prompts"], s["seed"], "test"))
    return list(rows), list(p)


# ----------------------------------------------------------------------------------------------------
# Scoring policies (train.py's reports and evaluate.py)

def evaluate_policy(model, tok, eval_rm, cfg, s, prompts, adapter, seed) -> dict:
    """zopro.evaluate_policy with a progress bar (a wmt test report is minutes per policy on CPU)."""
    bar = tqdm(total=len(prompts), desc=f"eval {adapter}", unit="prompt", dynamic_ncols=True, leave=False)
    out = zopro.evaluate_policy(model, prompts, eval_rm, cfg, tok.eos_token_id, tok.pad_token_id, adapter, seed,
                                s["micro_batch"], on_batch=bar.update)
    bar.close()
    return out


def score_policy(model, tok, eval_rm, cfg, s, prompts, rows, adapter, seed) -> tuple[dict, list, dict]:
    """Greedy responses under the evaluation reward model, KL to the SFT policy from samples, lengths.
    Returns (summary, three samples, per-prompt values)."""
    out = evaluate_policy(model, tok, eval_rm, cfg, s, prompts, adapter, seed)
    reward, reward_se = mean_stderr(out["reward"])
    summary = {"reward": reward, "reward_stderr": reward_se, "kl": sum(out["kl"]) / len(out["kl"]),
               "length": sum(out["length"]) / len(out["length"]), "n": len(out["reward"])}
    samples = [{"question": r.question, "response": tok.decode(ids, skip_special_tokens=True).strip(),
                "reward": rw} for r, ids, rw in zip(rows[:3], out["responses"], out["reward"])]
    return summary, samples, out


def compare_policies(model, tok, eval_rm, cfg, s, rows, adapters: dict, run=None, say=print) -> dict:
    """Scores each adapter on the same held-out prompts; the first one is the baseline of the paired
    difference (per-prompt reward of a policy minus the baseline's, mean ± stderr)."""
    rows, p = held_out_prompts(tok, s, rows, say)
    prompts = zopro.pack(p, [[]] * len(p), tok.pad_token_id, s["device"])
    results = {"task": s["task"], "split": TASKS[s["task"]].splits["test"], "note": TASKS[s["task"]].note,
               "method": s["method"],
               "reward_model": "eval_rm: the initial reward model, trained on human labels, fixed for the run"}
    per_prompt = {}
    for name, adapter in adapters.items():
        summary, samples, out = score_policy(model, tok, eval_rm, cfg, s, prompts, rows, adapter, s["seed"])
        per_prompt[name] = out["reward"]
        base = per_prompt[next(iter(adapters))]
        if name != next(iter(adapters)):
            diff, diff_se = mean_stderr([a - b for a, b in zip(out["reward"], base)])
            summary.update(reward_gain=diff, reward_gain_stderr=diff_se)
        results[name] = summary
        for x in samples:
            if run is not None:
                run.append("samples.jsonl", {"iteration": "test-" + name, **x})
    say(f"[test] {results['split']}, n={len(rows)} prompts, greedy, scored by the evaluation reward model:"
        + (f"\n  ({results['note']})" if results["note"] else ""))
    w = max(len("policy"), *map(len, adapters))
    say(f"  {'policy':<{w}}   reward ± stderr   gain over {next(iter(adapters))} ± stderr   KL to SFT   length")
    for name in adapters:
        r = results[name]
        gain = f"{r['reward_gain']:+.4f} ± {r['reward_gain_stderr']:.4f}" if "reward_gain" in r else "-"
        say(f"  {name:<{w}}   {r['reward']:+.4f} ± {r['reward_stderr']:.4f}   {gain:>22}   {r['kl']:9.4f}   {r['length']:6.1f}")
    return results
