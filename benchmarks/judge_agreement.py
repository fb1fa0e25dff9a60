"""How much to trust a judge: its agreement with human preferences on pairs whose better side is known.

    python benchmarks/judge_agreement.py --run runs/wmt-zopro-s0 --pairs 200

Pairs with a known winner, offline:
  * wmt-pe:  MLQE dev, the human post-edit vs the MT it corrects, on rows with HTER >= 0.3 (the post-editor
             changed at least 30 % of the words, so the post-edit is the better translation). The post-edits
             are Moses-tokenized; we undo the common cases (space before punctuation) so that tokenization
             does not give them away.
  * hh:      HH-RLHF test pairs (helpful-base), chosen vs rejected final turns (human labels; these are noisy,
             inter-annotator agreement on HH-RLHF is about 63-65 %).
Judges: the LLM judge (zopro.LLMJudge on the base model, adapters off) and, for wmt-pe, the run's evaluation
reward model (zopro.RewardModelJudge, the default judge of train.py). Prints accuracy ± stderr and, for the
LLM judge, how often it answers "A" (position bias).
"""
import argparse
import gzip
import json
import math
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import runs  # noqa: E402
import zopro  # noqa: E402
from tasks import find_mlqe, load_wmt  # noqa: E402


def detok(s: str) -> str:
    s = re.sub(r" ([.,;:!?%)\]}])", r"\1", s)
    s = re.sub(r"([(\[{„]) ", r"\1", s)
    return re.sub(r" ([’'`]) ", r"\1", s).replace(' " ', ' "')


def wmt_pe_pairs(data_dir, n, seed):
    """(question, messages, better, worse) with the post-edit as the better answer."""
    rows = load_wmt("dev", data_dir)
    pe_dir = find_mlqe(data_dir).parent / "wmt20-mlqe-en-de-pe" / "v2"
    pe = (pe_dir / "dev.pe").read_text(encoding="utf-8").splitlines()
    hter = [float(x) for x in (pe_dir / "dev.hter").read_text().split()]
    pairs = [(r.question, r.messages, detok(pe[i]), r.response) for i, r in enumerate(rows) if hter[i] >= 0.3]
    return runs.take(pairs, n, seed, "judge-wmt")


def hh_pairs(data_dir, n, seed):
    path = Path(data_dir) / "hh-rlhf" / "helpful-base" / "test.jsonl.gz"
    out = []
    for line in gzip.open(path, "rt", encoding="utf-8"):
        r = json.loads(line)
        cut_c, cut_r = r["chosen"].rfind("\n\nAssistant:"), r["rejected"].rfind("\n\nAssistant:")
        if r["chosen"][:cut_c] != r["rejected"][:cut_r] or r["chosen"] == r["rejected"]:
            continue
        prompt = r["chosen"][:cut_c].strip()
        better, worse = r["chosen"][cut_c + 12:].strip(), r["rejected"][cut_r + 12:].strip()
        if better and worse and len(prompt) < 1500:
            out.append((prompt, [{"role": "user", "content": prompt}], better, worse))
    return runs.take(out, n, seed, "judge-hh")


def agreement(judge, tok, pairs, device, seed):
    """Share of pairs where the judge prefers the better answer; each pair is shown in a seeded random order."""
    qs, _, good, bad = zip(*pairs)
    enc = lambda answers: zopro.pack([runs.encode_prompt(tok, m) for _, m, _, _ in pairs],  # noqa: E731
                                     [runs.encode_response(tok, a) for a in answers], tok.pad_token_id, device)
    wins = judge(list(qs), list(good), list(bad), enc(good), enc(bad), seed).float()
    p = wins.mean().item()
    return p, math.sqrt(p * (1 - p) / len(wins))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", help="a train.py run folder: its model, and its evaluation reward model as a judge")
    ap.add_argument("--pairs", type=int, default=200)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    s = json.loads((Path(args.run) / "config.json").read_text())
    s["device"] = runs.pick_device("auto")
    data_dir = args.data_dir or s["data_dir"] or __import__("os").environ.get("ZOPRO_DATA_DIR")
    model, tok, _, eval_rm = runs.build_model(s)
    rm_state = runs.load_tensors(Path(args.run) / "checkpoints" / "reward0.safetensors", s["device"])[0]
    zopro.load_reward_state(model, eval_rm, rm_state)
    judges = {"llm (base model)": zopro.LLMJudge(model, tok, adapter=None),
              "rm (evaluation reward model)": zopro.RewardModelJudge(model, eval_rm, s["micro_batch"])}
    sets = {"wmt-pe": wmt_pe_pairs(data_dir, args.pairs, args.seed), "hh": hh_pairs(data_dir, args.pairs, args.seed)}
    print(f"judge agreement with known winners ({s['model']}, {args.pairs} pairs per set)")
    for set_name, pairs in sets.items():
        for judge_name, judge in judges.items():
            if set_name == "hh" and judge_name.startswith("rm"):
                continue  # a translation reward model has nothing to say about dialogue
            with torch.no_grad():
                p, se = agreement(judge, tok, pairs, s["device"], args.seed)
            print(f"  {set_name:<7} {judge_name:<30} accuracy {p:.3f} ± {se:.3f}  (n={len(pairs)})")
            if judge_name.startswith("llm"):
                # position bias: show the first 50 pairs both ways
                both = [(judge.first_is_better(q, a, b), judge.first_is_better(q, b, a)) for q, _, a, b in pairs[:50]]
                says_a = sum(x + y for x, y in both) / (2 * len(both))
                consistent = sum(x != y for x, y in both) / len(both)
                print(f"  {'':<7} {'':<30} answers 'A' {says_a:.2f} of the time; flips its verdict when the order is swapped {consistent:.2f} of the time")

if __name__ == "__main__":
    main()
