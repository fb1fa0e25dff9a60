"""Evaluate runs on the task's held-out split, side by side: one table, optional JSON, training curves.

    python evaluate.py runs/wmt-zopro-s0                                   # final policy vs its SFT policy
    python evaluate.py runs/wmt-zopro-s0 runs/wmt-mezo-s0 --json cmp.json  # several runs, one table
    python evaluate.py runs/wmt-zopro-s0/checkpoints/iter1.safetensors     # one checkpoint (or --checkpoint iter1)
    python evaluate.py runs/wmt-zopro-s0 runs/wmt-mezo-s0 --eval-rm runs/wmt-zopro-s0   # one judge for all
    python evaluate.py runs/wmt-zopro-s0 runs/wmt-mezo-s0 --plot figs      # training curves only, no model

Every run is scored on the same held-out prompts (the task's test split, a sample seeded by --seed), with
greedy responses, through zopro.evaluate_policy as in training:
  reward     the evaluation reward model's score: by default each run's own initial reward model φ⁽⁰⁾
             (trained on human labels, never refined, so not the model the policy chased); --eval-rm
             scores every run with one reward model, so that runs are comparable
  win rate   against the run's SFT policy on the same prompts: the higher reward wins, ties (and identical
             responses) count ½; with --llm-judge also a causal LM's verdict (zopro.LLMJudge)
  KL         KL(π‖π_ref) from one response per prompt sampled at the training temperature
  length, empty (no text), at limit (no EOS before max_new_tokens)
  task checks (the task table's `checks`): wmt: copies the source, not German; chat, summarize: repetition
  chrF       wmt: against the human post-edits (MLQE-PE v2) of the same sources, with the original MT's own
             chrF as a yardstick (post-edits favour outputs close to that MT)
Each value comes with its stderr or a 95% bootstrap interval, and n. Writes RUN/eval.json (eval-CKPT.json for
a checkpoint other than latest) for each run, and --json PATH for all of them.
"""
import argparse
import hashlib
import json
import sys
from pathlib import Path

import metrics
import plots
import runs
import train
import zopro
from metrics import MissingDependency
from models import ModelError
from runs import RunError
from tasks import DataError, TASKS

# A run can be compared with another only if the adapters of one fit the model of the other.
SAME_MODEL = ("model", "lora_r", "lora_alpha", "lora_targets")

def say(msg: str) -> None:
    print(msg, flush=True)


# ----------------------------------------------------------------------------------------------------
# What to evaluate: run folders, checkpoints, their compatibility

def targets_of(paths: list[str], checkpoint: str) -> list[tuple[Path, str]]:
    """(run folder, checkpoint name) per argument: RUN (with --checkpoint) or RUN/checkpoints/NAME.safetensors."""
    out = []
    for p in map(Path, paths):
        if p.suffix == ".safetensors" and p.parent.name == "checkpoints":
            out.append((p.parent.parent, p.stem))
        else:
            out.append((p, checkpoint))
    return out


def read_config(run: Path) -> dict:
    f = run / "config.json"
    if not f.exists():
        raise RunError(f"{run} is not a run folder (no config.json)")
    return json.loads(f.read_text())


def check_same_model(named: list[tuple[str, dict]], what: str = "runs") -> None:
    """Refuses a mix of tasks or of base models / LoRA layouts, naming the setting and its values."""
    (first, c0), rest = named[0], named[1:]
    for key in ("task",) + SAME_MODEL:
        odd = [(name, c.get(key)) for name, c in rest if c.get(key) != c0.get(key)]
        if odd:
            values = ", ".join(f"{n}: {v!r}" for n, v in [(first, c0.get(key))] + odd)
            why = ("they are scored on different data" if key == "task" else
                   "one's adapters do not fit the other's base model / LoRA layout")
            raise RunError(f"cannot compare these {what}: they differ in {key} ({values}); {why}. "
                           "Evaluate them separately.")


def eval_rm_file(arg: str, c0: dict) -> Path:
    """--eval-rm: a run folder (its checkpoints/reward0.safetensors) or a reward0.safetensors file."""
    p = Path(arg)
    f = p / "checkpoints" / "reward0.safetensors" if p.is_dir() else p
    if not f.is_file():
        raise RunError(f"--eval-rm {arg}: no such reward model file ({f})")
    cfg = f.parent.parent / "config.json"
    if f.parent.name == "checkpoints" and cfg.exists():
        check_same_model([("the runs", c0), (f"--eval-rm {arg}", json.loads(cfg.read_text()))], "runs and --eval-rm")
    return f


def eval_settings(c0: dict, args) -> dict:
    """The first run's settings, with this command's overrides: every run is scored under these."""
    s = dict(c0, device=runs.pick_device(args.device))
    for key in ("seed", "test_prompts", "max_new_tokens", "data_dir"):
        if getattr(args, key) is not None:
            s[key] = getattr(args, key)
    if args.batch_size is not None:
        s["micro_batch"] = args.batch_size
    return s


def digest(path: Path) -> str:
    """Of the tensors alone: two runs' identical adapters differ in their files' metadata."""
    h = hashlib.sha256()
    for k, v in sorted(runs.load_tensors(path)[0].items()):
        h.update(k.encode() + v.float().numpy().tobytes())
    return h.hexdigest()


def load_policy(model, eval_rm, run: Path, checkpoint: str, rm_file: Path, device: str) -> dict:
    """Loads the run's SFT adapter (reference), the evaluation reward model and the policy at `checkpoint`.
    Returns the checkpoint's metadata (iteration, step)."""
    ckpt = run / "checkpoints"
    needed = [ckpt / "sft.safetensors", rm_file, ckpt / f"{checkpoint}.safetensors"]
    missing = [str(f) for f in needed if not f.exists()]
    if missing:
        raise RunError(f"{run}: missing {', '.join(missing)} (has the run reached that point? see log.txt)")
    zopro.load_adapter_state(model, zopro.REFERENCE, runs.load_tensors(needed[0], device)[0])
    try:
        zopro.load_reward_state(model, eval_rm, runs.load_tensors(rm_file, device)[0])
    except (ValueError, RuntimeError) as e:
        raise RunError(f"reward model {rm_file} does not fit {run}'s model: {e}") from e
    tensors, meta = runs.load_tensors(needed[2], device)
    policy = runs.unprefixed("policy", tensors)
    if policy is None:
        raise RunError(f"{needed[2]} holds no policy; choose latest or iterN")
    zopro.load_adapter_state(model, zopro.POLICY, policy)
    return meta


# ----------------------------------------------------------------------------------------------------
# References for chrF (wmt: human post-edits of the MLQE MT)

def references(s: dict, rows) -> list[str] | None:
    """References for chrF (the task table's `references`, e.g. wmt's human post-edits), or None, with the
    reason printed, if the task has none or they are unavailable."""
    task = TASKS[s["task"]]
    if task.references is None:
        return None
    try:
        metrics.require("sacrebleu", metrics.CHRF_PIP)
        return task.references(rows, s.get("data_dir"))
    except (MissingDependency, DataError) as e:
        say(f"[chrF] skipped: {e}")
        return None


# ----------------------------------------------------------------------------------------------------
# Scoring

def means(values: dict[str, list[float]]) -> dict:
    """{name: mean, name_stderr: stderr} for per-prompt values, and n."""
    out = {}
    for k, xs in values.items():
        out[k], out[k + "_stderr"] = metrics.mean_stderr([float(x) for x in xs])
    out["n"] = len(next(iter(values.values())))
    return out


def text_metrics(texts: list[str], rows, task: str, refs: list[str] | None) -> dict:
    """Task checks (per prompt, averaged) and chrF: what can be said of responses as text alone."""
    check = TASKS[task].checks
    per = [check(r, t) for r, t in zip(rows, texts)] if check else []
    out = means({k: [p[k] for p in per] for k in per[0]}) if per else {}
    if refs is not None:
        out["chrf"] = metrics.chrf(texts, refs)
    return out


def score(model, tok, eval_rm, cfg, s, prompts, rows, adapter, refs) -> tuple[dict, dict]:
    """One policy on the held-out prompts, through zopro.evaluate_policy. Returns (summary, per-prompt)."""
    out = runs.evaluate_policy(model, tok, eval_rm, cfg, s, prompts, adapter, s["seed"])
    out["text"] = [tok.decode(ids, skip_special_tokens=True).strip() for ids in out["responses"]]
    summary = means({"reward": out["reward"], "kl": out["kl"], "length": out["length"],
                     "empty": [t == "" for t in out["text"]], "at_limit": [not f for f in out["finished"]]})
    summary.update(text_metrics(out["text"], rows, s["task"], refs))
    return summary, out


def compare(pol: dict, sft: dict, s: dict, judge, rows, prompt_ids, tok) -> dict:
    """Paired comparison with the SFT policy on the same prompts: reward gain, win rates."""
    same = [a == b for a, b in zip(pol["responses"], sft["responses"])]
    gain, gain_se = metrics.mean_stderr([a - b for a, b in zip(pol["reward"], sft["reward"])])
    out = {"reward_gain": gain, "reward_gain_stderr": gain_se, "win_rate": metrics.win_rate(metrics.win_outcomes(
        [a > b for a, b in zip(pol["reward"], sft["reward"])],
        [t or a == b for t, a, b in zip(same, pol["reward"], sft["reward"])]), seed=s["seed"])}
    if judge is not None:
        pack = lambda rs: zopro.pack(prompt_ids, rs, tok.pad_token_id, s["device"])  # noqa: E731
        better = judge([r.question for r in rows], pol["text"], sft["text"], pack(pol["responses"]),
                       pack(sft["responses"]), zopro.derive_seed(s["seed"], "eval-judge")).tolist()
        out["win_rate_llm"] = metrics.win_rate(metrics.win_outcomes(better, same), seed=s["seed"])
    return out


def samples(rows, pol: dict, sft: dict, refs, n: int) -> list[dict]:
    return [{"question": r.question, "sft": sft["text"][i], "sft_reward": sft["reward"][i],
             "response": pol["text"][i], "reward": pol["reward"][i],
             **({"reference": refs[i]} if refs else {})} for i, r in enumerate(rows[:n])]


EVAL_SETTINGS = ("seed", "test_prompts", "max_prompt_len", "max_new_tokens", "temperature", "micro_batch")


def header(s: dict, configs: list[dict], n: int, rm_override: Path | None) -> dict:
    """What every number of the report shares: task, split, prompts, settings, reward model."""
    differ = [k for k in EVAL_SETTINGS if len({json.dumps(c.get(k)) for c in configs}) > 1]
    if differ:
        say(f"[eval] the runs differ in {', '.join(differ)}: all are scored with the first run's values "
            "(or this command's flags)")
    return {"task": s["task"], "split": TASKS[s["task"]].splits["test"], "n": n,
            "settings": {k: s[k] for k in EVAL_SETTINGS + ("device", "dtype", "model")},
            "reward_model": str(rm_override) if rm_override else "each run's own initial reward model "
                            "(checkpoints/reward0.safetensors: trained on human labels, never refined)"}


def evaluate(args, targets, configs) -> dict:
    """Scores every (run, checkpoint) and its SFT policy on the same prompts; returns the report."""
    s = eval_settings(configs[0], args)
    rm_override = eval_rm_file(args.eval_rm, configs[0]) if args.eval_rm else None
    model, tok, _, eval_rm = runs.build_model(s, say)
    cfg = train.config_of(s)
    rows, prompt_ids = runs.held_out_prompts(tok, s, runs.load_split(s, "test"), say)
    prompts = zopro.pack(prompt_ids, [[]] * len(prompt_ids), tok.pad_token_id, s["device"])
    refs = references(s, rows)
    judge = train.make_judge(dict(s, judge="llm"), model, tok, eval_rm, say) if args.llm_judge else None
    report = {**header(s, configs, len(rows), rm_override), "runs": []}
    if refs is not None or TASKS[s["task"]].checks is not None:
        report["dataset_responses"] = text_metrics([r.response for r in rows], rows, s["task"], refs)
    sft_cache = {}  # (sft adapter, reward model) file digests -> scored SFT policy: runs often share both
    for (run, ckpt), c in zip(targets, configs):
        rm_file = rm_override or run / "checkpoints" / "reward0.safetensors"
        meta = load_policy(model, eval_rm, run, ckpt, rm_file, s["device"])
        key = (digest(run / "checkpoints" / "sft.safetensors"), digest(rm_file))
        if key not in sft_cache:
            sft_cache[key] = score(model, tok, eval_rm, cfg, s, prompts, rows, zopro.REFERENCE, refs)
        (sft_sum, sft), (pol_sum, pol) = sft_cache[key], score(model, tok, eval_rm, cfg, s, prompts, rows,
                                                               zopro.POLICY, refs)
        pol_sum.update(compare(pol, sft, s, judge, rows, prompt_ids, tok))
        report["runs"].append({
            "run": str(run), "label": f"{run}:{ckpt}", "method": c.get("method"), "run_seed": c.get("seed"),
            "checkpoint": {"name": ckpt, "iteration": meta.get("iteration"), "global_step": meta.get("global_step")},
            "reward_model_file": str(rm_file), "sft": sft_sum, "policy": pol_sum,
            "samples": samples(rows, pol, sft, refs, args.samples)})
    return report


# ----------------------------------------------------------------------------------------------------
# Printing

def pm(d: dict, key: str, fmt: str = "+.3f", scale: float = 1.0) -> str:
    if key not in d:
        return "-"
    return f"{d[key] * scale:{fmt}} ± {d[key + '_stderr'] * scale:{fmt.lstrip('+')}}"


def win_cell(w: dict | None) -> str:
    return "-" if w is None else f"{w['rate']:.2f} [{w['ci95'][0]:.2f},{w['ci95'][1]:.2f}]"


def chrf_cell(d: dict) -> str:
    c = d.get("chrf")
    if c is None:
        return "-"
    return f"{c['score']:.1f}" + (f" [{c['ci95'][0]:.1f},{c['ci95'][1]:.1f}]" if "ci95" in c else "")


CHECK_CELLS = {"copies_source": ("copies src %", ".0f", 100), "not_german": ("not German %", ".0f", 100),
               "repetition": ("repeated 4-grams", ".2f", 1)}


def policy_cells(d: dict) -> dict:
    """The table's cells for one policy's summary (any key may be missing)."""
    cells = {"reward ± se": pm(d, "reward"), "Δ vs sft ± se": pm(d, "reward_gain"),
             "win vs sft (RM) [95%]": win_cell(d.get("win_rate")), "win (LLM) [95%]": win_cell(d.get("win_rate_llm")),
             "KL ± se": pm(d, "kl", ".3f")}
    for name, k in (("empty %", "empty"), ("at limit %", "at_limit")):
        cells[name] = f"{100 * d[k]:.0f}" if k in d else "-"
    cells["length"] = f"{d['length']:.1f}" if "length" in d else "-"
    cells["chrF [95%]"] = chrf_cell(d)
    cells.update({name: pm(d, k, fmt, scale) for k, (name, fmt, scale) in CHECK_CELLS.items()})
    return cells


def table_rows(report: dict) -> list[dict]:
    """One row per policy (each distinct SFT policy and each checkpoint) and one for the dataset's own
    responses; columns that are empty in every row are left out."""
    rows, seen_sft = [], []
    for r in report["runs"]:
        if r["sft"] not in seen_sft:  # runs that share the SFT adapter and reward model share its row
            seen_sft.append(r["sft"])
            rows.append({"policy": f"{r['run']}:sft", **policy_cells(r["sft"])})
        rows.append({"policy": r["label"], **policy_cells(r["policy"])})
    if "dataset_responses" in report:
        rows.append({"policy": "dataset responses" + (" (the MT)" if report["task"] == "wmt" else ""),
                     **policy_cells(report["dataset_responses"])})
    keep = [c for c in rows[0] if c == "policy" or any(r[c] != "-" for r in rows)]
    return [{c: r[c] for c in keep} for r in rows]


def print_table(rows: list[dict]) -> None:
    width = {c: max(len(c), *(len(r[c]) for r in rows)) for c in rows[0]}
    for r in [{c: c for c in rows[0]}] + rows:
        say("  ".join(r[c].ljust(width[c]) for c in rows[0]).rstrip())


def one_line(text: str, width: int = 160) -> str:
    t = " ".join(text.split())
    return t if len(t) <= width else t[:width - 1] + "…"


def print_report(report: dict) -> None:
    s = report["settings"]
    say(f"\n[eval] {report['task']} {report['split']}: n={report['n']} held-out prompts (seed {s['seed']}), greedy, "
        f"max_new_tokens {s['max_new_tokens']}, KL sampled at τ={s['temperature']}")
    say(f"[eval] reward model: {report['reward_model']}")
    say("[eval] ± is one stderr; [95%] a bootstrap interval; win rates count ties ½\n")
    print_table(table_rows(report))
    if not report["runs"] or not report["runs"][0]["samples"]:
        return
    say("\n[samples] reward under the evaluation reward model in brackets")
    for i, first in enumerate(report["runs"][0]["samples"]):
        say(f"{i + 1}. {one_line(first['question'])}")
        shown = set()
        for r in report["runs"]:
            x = r["samples"][i]
            if (x["sft"], x["sft_reward"]) not in shown:  # runs that share the SFT policy show it once
                shown.add((x["sft"], x["sft_reward"]))
                say(f"   {r['run']}:sft [{x['sft_reward']:+.3f}] {one_line(x['sft'])}")
            say(f"   {r['label']} [{x['reward']:+.3f}] {one_line(x['response'])}")
        if "reference" in first:
            say(f"   reference (post-edit) {one_line(first['reference'])}")


def run_file(run: Path, ckpt: str) -> Path:
    return run / ("eval.json" if ckpt == "latest" else f"eval-{ckpt}.json")


# ----------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="run folders made by train.py, or RUN/checkpoints/NAME.safetensors")
    ap.add_argument("--checkpoint", default="latest", help="for run folders: latest (default) or iterN")
    ap.add_argument("--json", help="write every number of the table (and the samples) to this file")
    ap.add_argument("--eval-rm", help="score every run with this reward model: a run folder or a reward0.safetensors "
                                      "(default: each run's own)")
    ap.add_argument("--llm-judge", action="store_true", help="also a win rate judged by a causal LM (zopro.LLMJudge; "
                                                             "the run's --judge-model, else the base model)")
    ap.add_argument("--samples", type=int, default=3, help="prompts shown (and saved) with every policy's response")
    ap.add_argument("--plot", metavar="OUTDIR", help="draw training curves from metrics.jsonl into OUTDIR (PNG); "
                                                     "no model needed")
    ap.add_argument("--evaluate", action=argparse.BooleanOptionalAction, default=None,
                    help="score the policies (default: yes, unless --plot is given)")
    g = ap.add_argument_group("evaluation settings (default: the first run's)")
    g.add_argument("--seed", type=int, help="seeds the prompt sample and the KL samples")
    g.add_argument("--test-prompts", type=int, help="held-out prompts (0: all)")
    g.add_argument("--max-new-tokens", type=int, help="response length limit")
    g.add_argument("--batch-size", type=int, help="prompts per generation batch")
    g.add_argument("--data-dir", help="folder with the task's data (else $ZOPRO_DATA_DIR)")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    do_eval = args.evaluate if args.evaluate is not None else args.plot is None
    try:
        targets = targets_of(args.runs, args.checkpoint)
        configs = [read_config(run) for run, _ in targets]
        if args.plot:
            folders = list(dict.fromkeys(run for run, _ in targets))
            for f in plots.plot_runs({str(p): p for p in folders}, Path(args.plot)):
                say(f"wrote {f}")
        if not do_eval:
            return 0
        check_same_model([(f"{run}", c) for (run, _), c in zip(targets, configs)])
        report = evaluate(args, targets, configs)
    except (RunError, ModelError, DataError, MissingDependency, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print_report(report)
    shared = {k: v for k, v in report.items() if k != "runs"}
    for r, (run, ckpt) in zip(report["runs"], targets):
        runs.write_atomic(run_file(run, ckpt), json.dumps({**shared, **r}, indent=2))
        say(f"wrote {run_file(run, ckpt)}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
        say(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
