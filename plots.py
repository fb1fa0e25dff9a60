"""Training curves from run folders' metrics.jsonl (one record per policy step), several runs overlaid.

matplotlib is optional: it is imported only here, when curves are drawn.
"""
import json
from pathlib import Path

from metrics import require
from runs import RunError

MATPLOTLIB_PIP = "matplotlib"

# metrics.jsonl key -> axis label. Steps without a value (decay and g exist on zeroth-order steps only)
# leave a gap.
CURVES = {
    "reward": "reward (training reward model, sampled responses)",
    "kl": "KL(π‖π_ref) per sequence",
    "projected_grad": "projected gradient g (SPSA)",
    "decay": "decay d (targeted sampler)",
}
X_AXES = {"step": "global step", "time": "policy-step wall-clock (s, cumulative)"}


def read_steps(run: Path) -> list[dict]:
    f = run / "metrics.jsonl"
    if not f.exists():
        raise RunError(f"{run}: no metrics.jsonl (has the run reached the policy stage?)")
    return [json.loads(line) for line in f.read_text().splitlines() if line.strip()]


def x_values(steps: list[dict], axis: str) -> list[float]:
    """Global step, or the running sum of each step's own seconds (evaluation between iterations excluded)."""
    if axis == "step":
        return [m["global_step"] for m in steps]
    total, out = 0.0, []
    for m in steps:
        total += m["seconds"]["step"]
        out.append(total)
    return out


def plot_runs(runs: dict[str, Path], outdir: Path) -> list[Path]:
    """One PNG per (curve, x axis): OUTDIR/{curve}_vs_{step|time}.png, a line per run. Returns the files."""
    require("matplotlib", MATPLOTLIB_PIP).use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    steps = {label: read_steps(path) for label, path in runs.items()}
    outdir.mkdir(parents=True, exist_ok=True)
    written = []
    for key, ylabel in CURVES.items():
        if not any(m.get(key) is not None for s in steps.values() for m in s):
            continue  # e.g. no zeroth-order step in any run: no g, no d
        for axis, xlabel in X_AXES.items():
            fig, ax = plt.subplots(figsize=(7, 4))
            for label, s in steps.items():
                xs = x_values(s, axis)
                ax.plot(xs, [m.get(key) if m.get(key) is not None else float("nan") for m in s],
                        marker=".", linewidth=1, label=label)
            ax.set(xlabel=xlabel, ylabel=ylabel, title=f"{key} vs {X_AXES[axis].split(' (')[0]}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize="small")
            fig.tight_layout()
            path = outdir / f"{key}_vs_{axis}.png"
            fig.savefig(path, dpi=100)
            plt.close(fig)
            written.append(path)
    return written
