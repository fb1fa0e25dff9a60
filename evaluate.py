"""Evaluate a run's policy on the task's held-out split, next to the SFT policy on the same prompts.

    python evaluate.py runs/wmt-zopro-s0                       # the final policy (latest checkpoint)
    python evaluate.py runs/wmt-zopro-s0 --checkpoint iter1    # the policy after iteration 1

Responses are greedy; rewards come from the run's evaluation reward model (its initial reward model,
trained on human labels and never refined, so gains are not measured by the model the policy chased);
KL(π‖π_ref) is estimated from one sampled response per prompt. Writes RUN/eval.json.
"""
import argparse
import json
import sys
from pathlib import Path

import runs
import train
import zopro
from models import ModelError
from runs import RunError
from tasks import DataError


def load_run(path: Path, device: str, checkpoint: str):
    """Rebuilds a run's model with its SFT adapter, evaluation reward model and policy at `checkpoint`."""
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise RunError(f"{path} is not a run folder (no config.json)")
    s = json.loads(cfg_file.read_text())
    s["device"] = runs.pick_device(device)
    needed = [path / "checkpoints" / f for f in ("sft.safetensors", "reward0.safetensors", f"{checkpoint}.safetensors")]
    missing = [str(f) for f in needed if not f.exists()]
    if missing:
        raise RunError(f"{path}: missing {', '.join(missing)} (has the run reached that point? see log.txt)")
    model, tok, rm, eval_rm = runs.build_model(s)
    zopro.load_adapter_state(model, zopro.REFERENCE, runs.load_tensors(needed[0], s["device"])[0])
    zopro.load_reward_state(model, eval_rm, runs.load_tensors(needed[1], s["device"])[0])
    tensors, meta = runs.load_tensors(needed[2], s["device"])
    zopro.load_adapter_state(model, zopro.POLICY, runs.unprefixed("policy", tensors))
    return s, model, tok, eval_rm, meta


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="run folder made by train.py")
    ap.add_argument("--checkpoint", default="latest", help="latest (default) or iterN")
    ap.add_argument("--test-prompts", type=int, default=None, help="held-out prompts (default: the run's setting; 0: all)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    args = ap.parse_args(argv)
    path = Path(args.run)
    try:
        s, model, tok, eval_rm, meta = load_run(path, args.device, args.checkpoint)
        if args.test_prompts is not None:
            s["test_prompts"] = args.test_prompts
        results = runs.compare_policies(model, tok, eval_rm, train.config_of(s), s, runs.load_split(s, "test"),
                                        {"sft": zopro.REFERENCE, args.checkpoint: zopro.POLICY})
    except (RunError, ModelError, DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    results["checkpoint"] = {"name": args.checkpoint, "iteration": meta.get("iteration"), "step": meta.get("step")}
    runs.write_atomic(path / "eval.json", json.dumps(results, indent=2))
    print(f"wrote {path / 'eval.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
