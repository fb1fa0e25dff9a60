"""The paper's comparison, reproducible: zopro, mezo and rloo on one task, several seeds, one table and plots.

    python benchmarks/compare_methods.py --task wmt --seeds 0 1 2 --out runs/compare   # CPU preset: ~3 h on 2 cores

For each seed, the zopro run goes first; mezo and rloo start from its iteration 0 (train.py --init-from):
SFT, the initial reward model, iteration 0 (first-order for every method) and the refinement after it are
the same for all three, so they are computed once per seed. The methods differ from iteration 1 on, and
only in how θ moves. Finished runs are skipped and stopped ones resumed, so the command can be re-run.
Flags after `--` go to every train.py call (e.g. `-- --steps-per-iteration 6` for a quick look).
`--variant NAME FLAGS` adds a row started from the same iteration 0, e.g. `--variant zopro-exp "--decay exp"`.

Writes OUT/comparison.md (the table), OUT/comparison.json, and OUT/{reward_vs_step,reward_vs_time,dev_reward}.png.
Held-out numbers come from each run's results.json: the final policy and the SFT policy on the same test
prompts, scored by the run's evaluation reward model (its initial one, never refined).
"""
import argparse
import json
import math
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import runs  # noqa: E402
from metrics import mean_stderr, require  # noqa: E402

METHODS = ("zopro", "mezo", "rloo")


def train(args, name, seed, flags) -> Path:
    """Run (or resume, or skip if finished) one train.py job; every run but the zopro one starts from the zopro
    run's iteration 0. flags: `--method M` and any other train.py flags."""
    out = Path(args.out) / f"{args.task}-{name}-s{seed}"
    if (out / "results.json").exists():
        print(f"[compare] {out} is done")
        return out
    cmd = [sys.executable, str(ROOT / "train.py"), "--task", args.task, "--seed", str(seed), "--out", str(out), *flags]
    if (out / "config.json").exists():
        cmd.append("--resume")
    elif name != METHODS[0]:
        cmd += ["--init-from", str(Path(args.out) / f"{args.task}-{METHODS[0]}-s{seed}")]
    print("[compare] " + " ".join(cmd), flush=True)
    if subprocess.run(cmd).returncode != 0:
        raise SystemExit(f"[compare] {out} failed; see {out / 'log.txt'}, then run this command again")
    return out


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def trajectory(run: Path) -> dict:
    """Where the policy adapter went, from the run's checkpoints: θ⁽⁻¹⁾ = SFT, θ⁽ⁱ⁾ after iteration i, and
    Δ⁽ⁱ⁾ = θ⁽ⁱ⁾ − θ⁽ⁱ⁻¹⁾. Returns per iteration i: step_norm ‖Δ⁽ⁱ⁾‖, from_sft ‖θ⁽ⁱ⁾ − θ_SFT‖, and for i ≥ 1
    cos_prev = cos(Δ⁽ⁱ⁾, Δ⁽ⁱ⁻¹⁾): the targeted sampler bets that an iteration continues the last one."""
    ck, n = run / "checkpoints", json.loads((run / "config.json").read_text())["iterations"]
    states = [runs.load_tensors(ck / "sft.safetensors")[0]]
    states += [runs.unprefixed("policy", runs.load_tensors(ck / f"iter{i}.safetensors")[0]) for i in range(n)]
    theta = [torch.cat([st[k].double().flatten() for k in sorted(states[0])]) for st in states]  # [N] each
    delta = [b - a for a, b in zip(theta, theta[1:])]
    cos = lambda a, b: float(a @ b / (a.norm() * b.norm()))  # noqa: E731
    return {"step_norm": [float(x.norm()) for x in delta], "from_sft": [float((t - theta[0]).norm()) for t in theta[1:]],
            "cos_prev": [cos(delta[i], delta[i - 1]) for i in range(1, n)], "dim": theta[0].numel()}


def mu_share(steps: list[dict]) -> list[float]:
    """For each iteration ≥ 1 of a targeted-sampler run, the share of its summed step lengths lr·|g|·‖z‖ taken
    while z is mostly μ (d ≥ 0.5). ‖z‖ ≈ ‖μ‖ at every step of an iteration, so it cancels in the share."""
    shares = []
    for it in sorted({m["iteration"] for m in steps if m["iteration"] >= 1}):
        zo = [m for m in steps if m["iteration"] == it and "projected_grad" in m and not m.get("skipped")]
        total = sum(m["lr"] * abs(m["projected_grad"]) for m in zo)
        along_mu = sum(m["lr"] * abs(m["projected_grad"]) for m in zo if m["decay"] >= 0.5)
        if total > 0:
            shares.append(along_mu / total)
    return shares


def summarize(run: Path) -> dict:
    """One run's numbers: held-out reward and gain over SFT, KL, the seconds its policy steps took from
    iteration 1 on (where the methods differ; refinement and evaluation are the same for all), and its path."""
    res = json.loads((run / "results.json").read_text())
    steps = read_jsonl(run / "metrics.jsonl")
    its = [x for x in read_jsonl(run / "iterations.jsonl") if x["stage"] == "iteration"]
    return {"reward": res["final"]["reward"], "sft_reward": res["sft"]["reward"], "gain": res["final"]["reward_gain"],
            "gain_stderr": res["final"]["reward_gain_stderr"], "kl": res["final"]["kl"], "n": res["final"]["n"],
            "step_seconds": sum(m["seconds"]["step"] for m in steps if m["iteration"] >= 1),
            # zeroth-order methods: g at each iteration's first step; for zopro z ≈ μ/‖μ‖ there (d = d0 ≈ 1), so
            # g is the slope of the loss along the previous update: < 0 means continuing that update helps
            "first_step_g": {m["iteration"]: m["projected_grad"] for m in steps
                             if m["iteration"] >= 1 and m["step"] == 0 and "projected_grad" in m},
            # dev reward under the evaluation reward model: the SFT policy (iteration -1), then after each iteration
            "dev": {**{x["iteration"]: x["reward"] for x in read_jsonl(run / "iterations.jsonl") if x["stage"] == "dev"},
                    **{x["iteration"]: x["dev"]["reward"] for x in its}},
            # the evaluation reward model's quality on held-out human labels (Pearson r, or pair accuracy)
            "rm_dev": next((x["dev"] for x in read_jsonl(run / "iterations.jsonl") if x["stage"] == "reward0"), {}),
            "path": trajectory(run), "steps": steps,
            "mu_share": mu_share(steps) if json.loads((run / "config.json").read_text())["method"] == "zopro" else []}


def fmt(xs: list[float], digits: int = 3, sign: str = "+", se1: float | None = None) -> str:
    """Mean ± stderr over seeds; with one seed, the value ± `se1` (its own stderr over prompts) when given."""
    if len(xs) == 1:
        return f"{xs[0]:{sign}.{digits}f}" + (f" ± {se1:.{digits}f} (prompts)" if se1 is not None else "")
    m, se = mean_stderr(xs)
    return f"{m:{sign}.{digits}f} ± {se:.{digits}f}"


def table(results: dict, seeds: list[int], task: str) -> str:
    lines = [f"| method | held-out reward | − {METHODS[0]}'s, same seed | gain over SFT (paired) | KL to SFT "
             f"| policy-step time, iterations ≥ 1 (s) | time ÷ {METHODS[0]}'s, same seed | seeds |",
             "|---|---|---|---|---|---|---|---|"]
    base = results[METHODS[0]]
    for method, per_seed in results.items():
        rs = list(per_seed.values())
        # Differences and ratios are taken within a seed: the runs of one seed share SFT, the reward model and
        # iteration 0, so the difference is the method's; a ratio also cancels the machine's load that day.
        diff = [r["reward"] - base[s]["reward"] for s, r in per_seed.items()]
        rel = [r["step_seconds"] / base[s]["step_seconds"] for s, r in per_seed.items()]
        lines.append(f"| {method} | {fmt([r['reward'] for r in rs])} | "
                     f"{'-' if method == METHODS[0] else fmt(diff)} | "
                     f"{fmt([r['gain'] for r in rs], se1=rs[0]['gain_stderr'])} | {fmt([r['kl'] for r in rs], sign='')} | "
                     f"{fmt([r['step_seconds'] for r in rs], 0, sign='')} | {fmt(rel, 2, sign='')} | {len(rs)} |")
    sft = [next(iter(results.values()))[s]["sft_reward"] for s in seeds]
    lines.append(f"| (SFT policy) | {fmt(sft)} | - | - | 0 | - | - | {len(sft)} |")
    n = next(iter(next(iter(results.values())).values()))["n"]
    lines.append(f"\n{task}: mean ± stderr over seeds of each run's held-out numbers (n={n} test prompts per seed, "
                 "greedy, scored by the run's evaluation reward model); with one seed, ± is the paired stderr over prompts.")
    quality = {s: {k: v for k, v in r["rm_dev"].items() if k in ("pearson", "pair_accuracy")} for s, r in base.items()}
    lines.append("Each seed trains its own evaluation reward model; on held-out human labels: "
                 + "; ".join(f"seed {s}: " + ", ".join(f"{k} {v:.2f}" for k, v in q.items() if v is not None)
                             for s, q in quality.items()) + ".")
    return "\n".join(lines) + "\n\n" + paths(results)


def paths(results: dict) -> str:
    """How far and which way each method moved the policy adapter from iteration 1 on (mean ± stderr over seeds,
    and over iterations for the per-iteration columns), and zopro's measured slope along μ."""
    lines = ["| method | ‖Δθ‖ an iteration, iterations ≥ 1 | mean abs cos(Δθ⁽ⁱ⁾, Δθ⁽ⁱ⁻¹⁾), i ≥ 1 | cos, each seed and i "
             "| share of step length while d ≥ 0.5 | ‖θ − θ_SFT‖ after iteration 0 | ‖θ − θ_SFT‖ final | seeds |",
             "|---|---|---|---|---|---|---|---|"]
    for method, per_seed in results.items():
        ps = [r["path"] for r in per_seed.values()]
        mu = [x for r in per_seed.values() for x in r.get("mu_share", [])]  # targeted-sampler runs only
        lines.append(f"| {method} | {fmt([x for p in ps for x in p['step_norm'][1:]], sign='')} | "
                     f"{fmt([abs(x) for p in ps for x in p['cos_prev']], sign='')} | "
                     f"{' '.join(f'{x:+.2f}' for p in ps for x in p['cos_prev'])} | "
                     f"{fmt(mu, sign='') if mu else '-'} | "
                     f"{fmt([p['from_sft'][0] for p in ps], sign='')} | {fmt([p['from_sft'][-1] for p in ps], sign='')} | "
                     f"{len(ps)} |")
    dim = next(iter(next(iter(results.values())).values()))["path"]["dim"]
    lines.append(f"\nΔθ⁽ⁱ⁾ = θ⁽ⁱ⁾ − θ⁽ⁱ⁻¹⁾ over the N = {dim:,} adapter weights (from the runs' checkpoints); two random "
                 f"directions have |cos| of order 1/√N = {1 / math.sqrt(dim):.4f}. In the per-iteration columns ± "
                 "pools seeds and iterations, which are not independent. The share column is the targeted sampler's: of the "
                 "summed lengths of an iteration's SPSA steps (lr·|g|·‖z‖, ‖z‖ the same at every step), the part taken "
                 "while z is mostly the previous update μ.")
    g = {s: r["first_step_g"] for s, r in results[METHODS[0]].items()}
    lines.append(f"\n{METHODS[0]}'s first step of each iteration ≥ 1 measures the slope of the loss along the "
                 "previous update (z ≈ μ/‖μ‖ at d = d0; > 0: the loss rises along μ, and that step goes back along −μ): "
                 + "; ".join(f"seed {s}: " + ", ".join(f"it {i} {x:+.4f}" for i, x in v.items()) for s, v in g.items())
                 + ". Where the whole iteration went is the cos column above.")
    return "\n".join(lines)


def smooth(xs: list[float], its: list[int], w: int = 5) -> list[float]:
    """Trailing w-step mean that restarts at each iteration (its: the iteration of each step, in order): the
    reward model that scores the training samples changes between iterations."""
    lo = [max(i - w + 1, its.index(its[i])) for i in range(len(xs))]
    return [sum(xs[a:i + 1]) / (i + 1 - a) for i, a in enumerate(lo)]


def plots(results: dict, out: Path) -> list[Path]:
    """Training reward against step and against policy-step seconds, and dev reward under the evaluation reward
    model after each iteration, each as a mean over seeds of the change from a baseline that the methods of a
    seed share (every seed has its own reward models, whose levels differ by more than any method moves them):
    training reward minus the seed's mean over iteration 0, a 5-step moving average within each iteration; dev
    reward minus SFT's."""
    require("matplotlib", "matplotlib").use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for axis in ("step", "time"):
        fig, ax = plt.subplots(figsize=(7, 4))
        for method, per_seed in results.items():
            runs = [r["steps"] for r in per_seed.values()]
            n = min(len(s) for s in runs)
            base = [mean_stderr([m["reward"] for m in s if m["iteration"] == 0])[0] for s in runs]
            reward = smooth([sum(s[i]["reward"] - b for s, b in zip(runs, base)) / len(runs) for i in range(n)],
                            [runs[0][i]["iteration"] for i in range(n)])
            if axis == "step":
                xs = [runs[0][i]["global_step"] for i in range(n)]
            else:
                secs = [sum(s[i]["seconds"]["step"] for s in runs) / len(runs) for i in range(n)]
                xs = [sum(secs[:i + 1]) for i in range(n)]
            ax.plot(xs, reward, label=method, linewidth=1.5)
        ax.set(xlabel="global step" if axis == "step" else "policy-step wall-clock (s, mean over seeds)",
               ylabel="training reward − iteration 0's mean",
               title=f"reward vs {axis} (5-step average within an iteration), mean over seeds")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        written.append(out / f"reward_vs_{axis}.png")
        fig.savefig(written[-1], dpi=100)
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4))
    for method, per_seed in results.items():
        its = sorted(next(iter(per_seed.values()))["dev"])
        ms = [mean_stderr([r["dev"][i] - r["dev"][-1] for r in per_seed.values()]) for i in its]
        ax.errorbar(its, [m for m, _ in ms], yerr=[0 if math.isnan(se) else se for _, se in ms], label=method,
                    marker="o", capsize=3)
    ax.set_xticks(sorted(next(iter(next(iter(results.values())).values()))["dev"]))
    ax.set(xlabel="iteration (-1: the SFT policy)", ylabel="dev reward − SFT's (evaluation reward model)",
           title="dev reward gain after each iteration, mean ± stderr over seeds")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    written.append(out / "dev_reward.png")
    fig.savefig(written[-1], dpi=100)
    plt.close(fig)
    return written


def main():
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="wmt")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--out", default="runs/compare")
    ap.add_argument("--variant", nargs=2, action="append", default=[], metavar=("NAME", "FLAGS"),
                    help='an extra row: train.py FLAGS from the zopro run\'s iteration 0, in OUT/TASK-NAME-sSEED; '
                         'e.g. --variant zopro-exp "--decay exp" (train.py\'s default method is zopro)')
    args = ap.parse_args(argv)
    for name, _ in args.variant:
        if name in METHODS:
            raise SystemExit(f"--variant {name}: pick a name that is not a method's ({', '.join(METHODS)})")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    order = [m for m in METHODS if m in args.methods]
    if order[0] != METHODS[0]:
        raise SystemExit("the comparison needs zopro: the other methods start from its iteration 0")
    jobs = [(m, ["--method", m]) for m in order] + [(name, shlex.split(flags)) for name, flags in args.variant]
    results = {name: {} for name, _ in jobs}
    for seed in args.seeds:
        for name, flags in jobs:
            results[name][seed] = summarize(train(args, name, seed, flags + extra))
    out = Path(args.out)
    md = table(results, args.seeds, args.task)
    (out / "comparison.md").write_text(md + "\n")
    (out / "comparison.json").write_text(json.dumps(
        {m: {s: {k: v for k, v in r.items() if k != "steps"} for s, r in per.items()} for m, per in results.items()},
        indent=2))
    print(md)
    for f in plots(results, out):
        print(f"wrote {f}")


if __name__ == "__main__":
    main()
