"""What one policy step costs: wall time per phase and peak memory of inference (rollout + scoring), a
ZOPrO step, a MeZO step and a first-order RLOO step, on one model and one fixed batch.

    python benchmarks/step_cost.py                        # SmolLM2-135M-Instruct, the run's preset batch
    python benchmarks/step_cost.py --tiny                 # a tiny Llama built in memory: a self-check in seconds
    python benchmarks/step_cost.py --prompts 4 --k 2 --max-new-tokens 32 --steps 3 --json cost.json

ZOPrO claims that a zeroth-order step costs about what inference costs. This script checks the claim, and
checks that our implementation is close to that limit:
  * ZOPrO step memory ≤ 1.10 × inference memory (peak, model included);
  * building directions and perturbing (the three perturb calls of spsa_grad) ≤ 5 % of the step;
  * a ZOPrO step ≤ 1.10 × a MeZO step (the targeted sampler is no dearer than Gaussian noise);
  * a ZOPrO step ≤ 1.10 × (rollout + scoring + the two perturbed forward passes), our reading of the
    issue's "little more than its rollout plus two forward passes".

How it measures. The parent picks the prompts once and starts one child process per case (this script
with --case), so that one case's peak memory is never another's leftovers: on GPU
torch.cuda.max_memory_allocated; on CPU the child's peak resident memory (VmHWM), reset once the model is
loaded and its weights paged in, with the increase over that RSS reported too (glibc keeps some freed
memory: MALLOC_MMAP_THRESHOLD_=131072 in the environment makes the RSS follow live memory more closely).
The children live side by side and run their steps one at a time, round-robin, so a change in the
machine's load falls on every case alike; time ratios are medians over rounds of the ratio within a round.
Every step starts from the same θ with the same rollout seed, so every step of every case sees the same
batch (the fingerprint row checks it). Phases come from the library's own timers (Batch.seconds:
generate, reference, reward, forward_pm, update, backward_update) and from wrapping zopro.perturb where
spsa_grad calls it: forward passes = forward_pm − perturb. Nothing of the algorithm is copied here. On a
shared CPU, absolute times carry the other jobs' load (the load average is printed); --threads 1 makes
them steadier.
"""
import argparse
import gc
import hashlib
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import runs  # noqa: E402
import train  # noqa: E402
import zopro  # noqa: E402
from models import resolve_model  # noqa: E402

CASES = ("inference", "zopro", "mezo", "rloo")
TITLES = {"inference": "inference", "zopro": "ZOPrO", "mezo": "MeZO", "rloo": "RLOO+AdamW"}
# (key, label) of the phases of a step, in the order they run
PHASES = [("generate", "generation"), ("reference", "reference log-probs"), ("reward", "reward scoring"),
          ("forward", "2 perturbed forward passes"), ("perturb", "directions + perturb (3 calls)"),
          ("z_only", "  of which building z alone"),
          ("update", "update (spsa_update)"), ("backward_update", "fwd+backward+AdamW"), ("other", "other"),
          ("total", "step total")]
TINY_TEXTS = ["The cat sleeps on the warm windowsill.", "Trains leave every hour from the main station.",
              "She planted tomatoes in the garden.", "The museum opens at nine in the morning.",
              "Rain is expected over the weekend.", "He forgot his umbrella at the office.",
              "Our team won the match yesterday.", "The library closes early on Sundays."]


# ----------------------------------------------------------------------------------------------------
# Settings, model and the fixed batch

def settings(args, method: str = "zopro") -> dict:
    """The run's own settings (train.py's defaults <- preset <- flags), so the default batch is a real one;
    `method` picks its ε and lr (a MeZO step with zopro's lr 5 would be a different step, if not a slower one)."""
    argv = ["--model", args.model, "--dtype", args.dtype, "--seed", str(args.seed), "--method", method]
    if args.device != "auto":  # train.resolve picks the device only when --device is not given
        argv += ["--device", args.device]
    for flag, v in (("--prompts-per-step", args.prompts), ("--k", args.k), ("--max-new-tokens", args.max_new_tokens),
                    ("--micro-batch", args.micro_batch), ("--data-dir", args.data_dir)):
        if v is not None:
            argv += [flag, str(v)]
    return train.resolve(train.build_parser().parse_args(argv))


def write_tiny_model(folder: Path) -> None:
    """The 2-layer Llama and byte-level tokenizer of the tests (tests/conftest.py), saved as a model folder."""
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import tiny_llama, tiny_tokenizer
    tok = tiny_tokenizer()
    tiny_llama(len(tok)).save_pretrained(folder)
    tok.save_pretrained(folder)


def pick_prompts(args, s: dict) -> list[list[int]]:
    """Token ids of the batch's prompts: seeded MLQE train rows that fit max_prompt_len, or fixed sentences."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(s["model"])
    n = s["prompts_per_step"]
    if args.tiny:
        return [runs.encode_prompt(tok, [{"role": "user", "content": t}]) for t in (TINY_TEXTS * n)[:n]]
    ids = []
    for row in runs.take(runs.load_split(s, "train"), 0, s["seed"], "benchmark"):
        p = runs.encode_prompt(tok, row.messages)
        if len(p) <= s["max_prompt_len"]:
            ids.append(p)
        if len(ids) == n:
            return ids
    raise SystemExit(f"only {len(ids)} prompts fit max_prompt_len={s['max_prompt_len']}")


def random_deltas(params: dict, seed: int) -> tuple[dict, dict]:
    """μ and v as after an iteration: random tensors of the adapter's shapes, μ scaled to norm 1
    (Config.prev_update_scale "unit"), v small (a reward-model update)."""
    g = torch.Generator().manual_seed(zopro.derive_seed(seed, "benchmark-deltas"))
    mu = {k: torch.randn(p.shape, generator=g).to(p.device) for k, p in params.items()}
    norm = math.sqrt(sum(float(m.pow(2).sum()) for m in mu.values()))
    mu = {k: m / norm for k, m in mu.items()}
    v = {k: 1e-3 * torch.randn(p.shape, generator=g).to(p.device) for k, p in params.items()}
    return mu, v


# ----------------------------------------------------------------------------------------------------
# Memory and timers

def proc_kb(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


class Memory:
    """Bytes in use now and at peak since reset(): CUDA allocator on GPU, resident memory on CPU."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.kind = "torch.cuda.max_memory_allocated" if cuda else "peak RSS (VmHWM) of the case's process"

    def now(self) -> int:
        gc.collect()
        return torch.cuda.memory_allocated() if self.cuda else proc_kb("VmRSS") * 1024

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            return
        try:  # Linux ≥ 4.0: "5" resets VmHWM to the current RSS
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self.kind = "peak RSS over the process's whole life (VmHWM could not be reset: model loading included)"

    def peak(self) -> int:
        return torch.cuda.max_memory_allocated() if self.cuda else proc_kb("VmHWM") * 1024


@contextmanager
def instrument(sync):
    """Times zopro.perturb and zopro.spsa_update where zo_step and spsa_grad call them (module globals) and
    keeps the batch that make_batch returns. With CUDA, the wrappers and the library's timers synchronise,
    so that asynchronous kernels are charged to the phase that launched them."""
    probe = {"perturb": 0.0, "batch": None}
    saved = {n: getattr(zopro, n) for n in ("perturb", "spsa_update", "make_batch", "_timed") if hasattr(zopro, n)}

    def synced(fn, key=None):
        def wrapper(*a, **kw):
            sync()
            t0 = time.perf_counter()
            out = fn(*a, **kw)
            sync()
            if key:
                probe[key] += time.perf_counter() - t0
            return out
        return wrapper

    def keep_batch(*a, **kw):
        probe["batch"] = saved["make_batch"](*a, **kw)
        return probe["batch"]

    zopro.perturb = synced(saved["perturb"], "perturb")
    zopro.spsa_update = synced(saved["spsa_update"])
    zopro.make_batch = keep_batch
    if "_timed" in saved:  # make_batch's phase timer (a private helper: skipped if it is renamed)
        zopro._timed = lambda seconds, key, fn: saved["_timed"](seconds, key, synced(fn))
    try:
        yield probe
    finally:
        for n, f in saved.items():
            setattr(zopro, n, f)


# ----------------------------------------------------------------------------------------------------
# One case, in its own process

class Case:
    """The model, the fixed batch and what a step of kind `case` needs (sampler, μ, v / AdamW)."""

    def __init__(self, args, case: str):
        s = settings(args, case if case in ("mezo", "rloo") else "zopro")
        self.case, self.cfg, self.dev = case, train.config_of(s), s["device"]
        cuda = self.dev.startswith("cuda")
        self.sync = torch.cuda.synchronize if cuda else (lambda: None)
        if args.threads:
            torch.set_num_threads(args.threads)
        self.mem = Memory(cuda)
        self.model, self.tok, self.rm, _ = runs.build_model(s, log=lambda m: None)
        for p in zopro.adapter_params(self.model, zopro.REFERENCE).values():  # frozen, as after SFT
            p.requires_grad_(False)
        head = self.rm.head.weight
        g = torch.Generator().manual_seed(zopro.derive_seed(s["seed"], "benchmark-head"))
        with torch.no_grad():  # a non-zero head, so that scores and advantages are not all zero
            head.copy_(torch.randn(head.shape, generator=g) / math.sqrt(head.shape[1]))
        ids = json.loads(Path(args.prompts_file).read_text())
        self.prompts = zopro.pack(ids, [[]] * len(ids), self.tok.pad_token_id, self.dev)
        self.params = zopro.adapter_params(self.model, zopro.POLICY)
        self.theta0 = zopro.adapter_state(self.model, zopro.POLICY)
        with torch.no_grad():  # from_pretrained maps the safetensors file: page the weights in before the baseline
            for t in [*self.model.parameters(), *self.model.buffers()]:
                t.sum()
        self.after_load = self.mem.now()
        self.mem.reset()  # from here on, everything the step type needs counts

        self.state = zopro.State(iteration=1)
        self.sampler = self.optimizer = None
        if case in ("zopro", "mezo"):
            mu, v = random_deltas(self.params, s["seed"])
            # State holds μ and v through every zeroth-order iteration, whatever the sampler (end_iteration)
            self.state.prev_update, self.state.reward_delta = mu, v
            self.sampler = zopro.Sampler("targeted" if case == "zopro" else "gaussian", self.params, mu, v)
        elif case == "rloo":
            self.optimizer = torch.optim.AdamW(self.params.values(), lr=self.cfg.fo_lr,
                                               weight_decay=self.cfg.weight_decay)

    def step(self) -> dict:
        """One step from θ₀ at global step 0 (so the same rollout seed and direction seed every time)."""
        zopro.load_adapter_state(self.model, zopro.POLICY, self.theta0)
        self.state.step = self.state.global_step = 0
        with instrument(self.sync) as probe:
            self.sync()
            t0 = time.perf_counter()
            if self.case == "inference":
                gen = zopro.make_generator(zopro.derive_seed(self.cfg.seed, "rollout", 0), self.dev)
                zopro.make_batch(self.model, self.prompts, self.rm, self.cfg, gen, self.tok.eos_token_id,
                                 self.tok.pad_token_id)
            else:
                zopro.policy_step(self.model, self.tok, self.params, self.cfg, self.state, self.prompts, self.rm,
                                  self.sampler, self.optimizer)
            self.sync()
            total = time.perf_counter() - t0
        b = probe["batch"]
        sec = {k: v for k, v in b.seconds.items() if k != "step"}
        if "forward_pm" in sec:
            sec["perturb"] = probe["perturb"]
            sec["forward"] = sec.pop("forward_pm") - probe["perturb"]
        sec["other"] = total - sum(sec.values())
        sec["total"] = total
        self.batch = {"sequences": len(b.seqs), "prompt_len": b.seqs.prompt_len,
                      "response_tokens": int(b.seqs.response_mask.sum()),
                      "fingerprint": hashlib.sha1(b.seqs.ids.cpu().numpy().tobytes()).hexdigest()[:12]}
        return sec

    def directions_only(self) -> float | None:
        """Seconds to build z three times without the in-place add: how the perturb time splits."""
        if self.sampler is None:
            return None
        d = zopro.decay(0, self.cfg.steps_per_iteration, self.cfg.decay, self.cfg.decay_start, self.cfg.decay_rate)
        seed = zopro.derive_seed(self.cfg.seed, "direction", 0, 0)
        self.sync()
        t0 = time.perf_counter()
        for _ in range(3):
            for _ in self.sampler.directions(self.params, seed, d):
                pass
        self.sync()
        return time.perf_counter() - t0

    def memory(self) -> dict:
        peak = self.mem.peak()
        return {"kind": self.mem.kind, "after_load_mb": self.after_load / 2**20, "peak_mb": peak / 2**20,
                "increase_mb": (peak - self.after_load) / 2**20}


def serve(args) -> None:
    """Child: build the case, then answer the parent's commands on stdin ("step", "z", "memory", "quit") with
    one JSON line each on the original stdout. Everything else the libraries print goes to stderr."""
    reply = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    case = Case(args, args.case)
    reply.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "quit":
            break
        out = {"step": case.step, "z": case.directions_only, "memory": case.memory}[cmd]()
        if cmd == "step":
            out = {"seconds": out, "batch": case.batch}
        reply.write(json.dumps(out) + "\n")


class Child:
    """A running case process, driven one command at a time."""

    def __init__(self, cmd: list[str], log: Path):
        self.log = log
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(log, "w"),
                                     text=True, bufsize=1)

    def ask(self, cmd: str | None = None):
        if cmd:
            self.proc.stdin.write(cmd + "\n")
            self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            raise RuntimeError(f"exit {self.proc.returncode}:\n{self.log.read_text()[-4000:]}")
        return json.loads(line)

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
            self.proc.wait()


def run_cases(cases: list[str], child_cmd: list[str], tmp: Path, warmup: int, steps: int) -> dict:
    """All cases' processes live side by side; steps run one at a time, round-robin, in an order that
    rotates every round, so that the machine's load over time falls on every case alike."""
    children = {c: Child([*child_cmd, "--case", c], tmp / f"{c}.log") for c in cases}
    try:
        for c, ch in children.items():
            print(f"[step_cost] loading {c} ...", file=sys.stderr, flush=True)
            ch.ask()
        per_step, z_only, batch = {c: [] for c in cases}, {c: [] for c in cases}, {}
        for r in range(warmup + steps):
            print(f"[step_cost] {'warm-up' if r < warmup else 'measured'} round {r + 1}/{warmup + steps}",
                  file=sys.stderr, flush=True)
            for c in cases[r % len(cases):] + cases[:r % len(cases)]:
                out = children[c].ask("step")
                if r >= warmup:
                    per_step[c].append(out["seconds"])
                    z_only[c].append(children[c].ask("z"))
                batch[c] = out["batch"]
        res = {}
        for c, ch in children.items():
            steps_c = per_step[c]
            sec = {k: statistics.median(x[k] for x in steps_c) for k in steps_c[0]}
            if z_only[c][0] is not None:
                sec["z_only"] = statistics.median(z_only[c])  # not a phase of the step: not in its total
            res[c] = {"seconds": sec, "seconds_per_step": steps_c, "memory": ch.ask("memory"), "batch": batch[c]}
        return res
    except RuntimeError as e:
        raise SystemExit(f"error: a case failed: {e}")
    finally:
        for ch in children.values():
            ch.close()


# ----------------------------------------------------------------------------------------------------
# The parent: run the cases, compare, print

def machine(cuda: bool) -> dict:
    import transformers
    m = {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
         "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "load_average": os.getloadavg()}
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        name = re.search(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), re.M)
        m["cpu"] = name.group(1) if name else platform.processor()
    if cuda:
        m["gpu"] = torch.cuda.get_device_name()
    return m


def ratios(c: dict) -> dict:
    """Each comparison whose cases were run: {label, value, target, met}; target and met are None on the
    lines that only explain the line above. A time ratio is the median over rounds of the ratio within a
    round (steps of one round ran next to each other), which cancels slow changes in the machine's load."""
    def per_round(f, *cases):
        return statistics.median(f(*x) for x in zip(*(c[n]["seconds_per_step"] for n in cases)))

    mem = lambda a, b, f="peak_mb": c[a]["memory"][f] / c[b]["memory"][f]  # noqa: E731
    limit = lambda x: x["generate"] + x["reward"] + x["reference"] + x["forward"]  # noqa: E731
    zo_extra = lambda x: x["perturb"] + x["update"]  # noqa: E731
    rows = [  # (key, cases needed, label, value, target, test)
        ("zopro_mem_over_inference", {"zopro", "inference"}, "ZOPrO step memory ÷ inference memory (peak)",
         lambda: mem("zopro", "inference"), "≤ 1.10", lambda v: v <= 1.10),
        ("zopro_mem_over_inference_increase", {"zopro", "inference"}, "  the same, increase over the loaded model",
         lambda: mem("zopro", "inference", "increase_mb"), None, None),
        ("rloo_mem_over_zopro", {"rloo", "zopro"}, "first-order ÷ ZOPrO step memory (peak)",
         lambda: mem("rloo", "zopro"), "> 1 (claim)", lambda v: v > 1),
        ("rloo_mem_over_zopro_increase", {"rloo", "zopro"}, "  the same, increase over the loaded model",
         lambda: mem("rloo", "zopro", "increase_mb"), None, None),
        ("zopro_time_over_limit", {"zopro"}, "ZOPrO step ÷ (rollout + scoring + 2 forward passes)",
         lambda: per_round(lambda z: z["total"] / limit(z), "zopro"), "≤ 1.10", lambda v: v <= 1.10),
        ("perturb_share", {"zopro"}, "directions + perturb ÷ ZOPrO step time",
         lambda: per_round(lambda z: z["perturb"] / z["total"], "zopro"), "≤ 0.05", lambda v: v <= 0.05),
        ("perturb_update_share", {"zopro"}, "  perturb + update (all z building) ÷ step time",
         lambda: per_round(lambda z: zo_extra(z) / z["total"], "zopro"), None, None),
        ("zopro_time_over_mezo", {"zopro", "mezo"}, "ZOPrO ÷ MeZO step time",
         lambda: per_round(lambda z, m: z["total"] / m["total"], "zopro", "mezo"), "≤ 1.10", lambda v: v <= 1.10),
        ("zopro_extra_over_mezo", {"zopro", "mezo"}, "  1 + (perturb + update, ZOPrO − MeZO) ÷ MeZO step",
         lambda: per_round(lambda z, m: 1 + (zo_extra(z) - zo_extra(m)) / m["total"], "zopro", "mezo"), None, None),
    ]
    out = {}
    for key, need, label, value, target, test in rows:
        if need <= c.keys():
            v = value()
            out[key] = {"label": label, "value": v, "target": target, "met": None if test is None else bool(test(v))}
    return out


def report(res: dict) -> str:
    c, s = res["cases"], res["settings"]
    names = [n for n in CASES if n in c]
    m = res["machine"]
    where = (f"GPU {m['gpu']}" if "gpu" in m else f"CPU {m.get('cpu', '?')}, {m['cpu_count']} cores, "
             f"{s['threads'] or m['torch_threads']} torch threads per case")
    first = c[names[0]]["batch"]
    lines = [f"machine: {where} | torch {m['torch']}, transformers {m['transformers']} | load average "
             f"{m['load_average'][0]:.2f} at start, {res['load_average_end'][0]:.2f} at end",
             f"model: {s['model_name']} on {s['device']} ({s['dtype']}) | batch: {s['prompts']} prompts × k={s['k']} "
             f"= {first['sequences']} sequences, prompt length {first['prompt_len']}, ≤ {s['max_new_tokens']} new "
             f"tokens, micro-batch {s['micro_batch']} | {s['warmup']} warm-up + {s['steps']} measured steps, medians",
             "", f"{'seconds per step':<34}" + "".join(f"{TITLES[n]:>12}" for n in names)]
    for key, label in PHASES:
        vals = [c[n]["seconds"].get(key) for n in names]
        if any(v is not None for v in vals):
            lines.append(f"  {label:<32}" + "".join(f"{v:12.4f}" if v is not None else f"{'-':>12}" for v in vals))
    lines += ["", f"{'memory (MB)':<34}" + "".join(f"{TITLES[n]:>12}" for n in names)]
    for key, label in (("after_load_mb", "after model load"), ("peak_mb", "peak during the steps"),
                       ("increase_mb", "increase over load")):
        lines.append(f"  {label:<32}" + "".join(f"{c[n]['memory'][key]:12.1f}" for n in names))
    lines.append(f"  ({c[names[0]]['memory']['kind']})")
    lines += [f"{'batch':<34}" + "".join(f"{c[n]['batch']['fingerprint']:>13}" for n in names),
              f"  {'response tokens':<32}" + "".join(f"{c[n]['batch']['response_tokens']:12d}" for n in names),
              "  same batch in every case: " + ("yes" if len({c[n]["batch"]["fingerprint"] for n in names}) == 1
                                                else "NO (the cases are not comparable)")]
    lines += ["", f"{'ratio':<56}{'value':>8}  {'target':<14}met"]
    for r in res["ratios"].values():
        met = "" if r["met"] is None else ("yes" if r["met"] else "NO")
        lines.append(f"{r['label']:<56}{r['value']:8.3f}  {r['target'] or '':<14}{met}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_argument_group("model and batch (defaults: train.py's, with its cpu/gpu preset)")
    g.add_argument("--model", default=train.DEFAULTS["model"], help="hub id or local HF folder (default %(default)s)")
    g.add_argument("--tiny", action="store_true", help="a tiny Llama built in memory and fixed prompts: a quick self-check")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    g.add_argument("--dtype", default="auto", help="base weights: auto (= fp32, as train.py) | bf16 | fp32")
    g.add_argument("--data-dir", default=None, help="MLQE folder (else $ZOPRO_DATA_DIR, else the download cache)")
    g.add_argument("--prompts", type=int, default=None, help="prompts in the batch (default: the preset's prompts_per_step)")
    g.add_argument("--k", type=int, default=None, help="samples per prompt")
    g.add_argument("--max-new-tokens", type=int, default=None, help="response length limit")
    g.add_argument("--micro-batch", type=int, default=None, help="sequences per forward pass")
    g.add_argument("--seed", type=int, default=0, help="run seed: prompts, rollout, directions")
    g = ap.add_argument_group("measurement")
    g.add_argument("--cases", default=",".join(CASES), help="comma-separated subset of " + ", ".join(CASES))
    g.add_argument("--warmup", type=int, default=1, help="unmeasured steps first")
    g.add_argument("--steps", type=int, default=5, help="measured steps (the median is reported)")
    g.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    g.add_argument("--json", default=None, help="also write the numbers to this file")
    ap.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)          # child: serve one case
    ap.add_argument("--prompts-file", help=argparse.SUPPRESS)                 # child: the batch's prompt ids
    args = ap.parse_args(argv)

    if args.case:
        serve(args)
        return 0

    cases = [x for x in args.cases.split(",") if x]
    if not cases or any(x not in CASES for x in cases):
        ap.error(f"--cases: choose from {', '.join(CASES)}")
    with tempfile.TemporaryDirectory(prefix="step_cost-") as tmp:
        tmp = Path(tmp)
        model_name = "tiny Llama (tests/conftest.py)" if args.tiny else args.model
        if args.tiny:
            write_tiny_model(tmp / "tiny-llama")
            args.model = str(tmp / "tiny-llama")
        else:
            args.model = resolve_model(args.model, log=lambda m: print(m, file=sys.stderr))
        s = settings(args)
        (tmp / "prompts.json").write_text(json.dumps(pick_prompts(args, s)))
        cuda = s["device"].startswith("cuda")
        res = {"machine": machine(cuda),
               "settings": {"model_name": model_name, "model": s["model"], "device": s["device"], "dtype": s["dtype"],
                            "prompts": s["prompts_per_step"], "k": s["k"], "max_new_tokens": s["max_new_tokens"],
                            "micro_batch": s["micro_batch"], "warmup": args.warmup, "steps": args.steps,
                            "seed": s["seed"], "threads": args.threads}}
        child = [sys.executable, str(Path(__file__).resolve()), *(argv if argv is not None else sys.argv[1:]),
                 "--model", args.model, "--prompts-file", str(tmp / "prompts.json")]
        res["cases"] = run_cases(cases, child, tmp, args.warmup, args.steps)
    res["load_average_end"] = os.getloadavg()
    res["ratios"] = ratios(res["cases"])
    print(report(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
