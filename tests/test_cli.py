"""train.py and evaluate.py as a user runs them: subprocesses, real MLQE rows, a tiny model from a config."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import DATA, ROOT

SMALL = ["--task", "wmt", "--preset", "cpu", "--sft-examples", "8", "--rm-examples", "16", "--rm-dev-examples", "8",
         "--iterations", "3", "--steps-per-iteration", "2", "--prompts-per-step", "2", "--refine-prompts", "4",
         "--dev-prompts", "4", "--test-prompts", "6", "--max-prompt-len", "200", "--max-new-tokens", "120",
         "--micro-batch", "8", "--save-every", "1"]


def run(script, *args):
    env = {**os.environ, "ZOPRO_DATA_DIR": str(DATA), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=600)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, tiny_model_dir):
    out = tmp_path_factory.mktemp("runs") / "full"
    p = run("train.py", *SMALL, "--model", tiny_model_dir, "--out", out)
    assert p.returncode == 0, p.stdout + p.stderr
    return out, p


def test_train_writes_a_complete_run_folder(full_run):
    out, p = full_run
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["task"] == "wmt" and cfg["iterations"] == 3 and cfg["lr"] > 0
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["global_step"] for m in steps] == list(range(6))
    for key in ("iteration", "step", "lr", "reward", "kl", "seconds"):
        assert all(key in m for m in steps)
    zo = [m for m in steps if m["iteration"] >= 1]
    assert all({"seed", "projected_grad", "loss_plus", "loss_minus", "decay"} <= m.keys() for m in zo)
    assert [round(m["decay"], 4) for m in zo] == [0.999, 0.499] * 2
    assert {f.name for f in (out / "checkpoints").iterdir()} >= {
        "sft.safetensors", "reward0.safetensors", "latest.safetensors", "iter0.safetensors", "iter1.safetensors",
        "iter2.safetensors"}
    results = json.loads((out / "results.json").read_text())
    assert results["split"] == "test20" and results["final"]["n"] == results["sft"]["n"] > 0
    assert abs(results["sft"]["kl"]) < 1e-3      # the SFT policy is its own reference
    assert "[test] test20" in p.stdout
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert {s["iteration"] for s in samples} >= {-1, 0, 1, 2, "test-final"}


def test_refinement_moves_the_reward_model_between_iterations(full_run):
    out, _ = full_run
    it = [json.loads(line) for line in (out / "iterations.jsonl").read_text().splitlines()]
    ends = [x for x in it if x["stage"] == "iteration"]
    assert [x["iteration"] for x in ends] == [0, 1, 2]
    assert all(x["pairs"] > 0 and x["reward_delta_norm"] > 0 for x in ends[:2])
    assert "pairs" not in ends[2]                  # no refinement after the last iteration
    r0, r1 = load_file(out / "checkpoints" / "iter0.safetensors"), load_file(out / "checkpoints" / "iter1.safetensors")
    assert any(not torch.equal(r0[k], r1[k]) for k in r0 if k.startswith("reward/"))


def test_evaluate_scores_the_run(full_run):
    out, _ = full_run
    p = run("evaluate.py", out)
    assert p.returncode == 0, p.stdout + p.stderr
    ev = json.loads((out / "eval.json").read_text())
    res = json.loads((out / "results.json").read_text())
    assert ev["checkpoint"]["name"] == "latest"
    assert ev["policy"]["reward"] == pytest.approx(res["final"]["reward"], abs=1e-5)  # same prompts, same policy
    assert ev["sft"]["reward"] == pytest.approx(res["sft"]["reward"], abs=1e-5)


def test_resume_gives_the_same_result_as_an_uninterrupted_run(full_run, tmp_path, tiny_model_dir):
    out, _ = full_run
    part = tmp_path / "part"
    p = run("train.py", *SMALL, "--model", tiny_model_dir, "--out", part, "--stop-after", "3")
    assert p.returncode == 0 and not (part / "results.json").exists(), p.stderr
    p = run("train.py", *SMALL, "--model", tiny_model_dir, "--out", part, "--resume")
    assert p.returncode == 0, p.stdout + p.stderr
    a, b = load_file(out / "checkpoints" / "latest.safetensors"), load_file(part / "checkpoints" / "latest.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda f: [{k: v for k, v in json.loads(x).items() if k != "seconds"} for x in f.read_text().splitlines()]  # noqa: E731
    assert strip(out / "metrics.jsonl") == strip(part / "metrics.jsonl")


def test_existing_run_folder_and_changed_config_are_refused(full_run, tiny_model_dir):
    out, _ = full_run
    p = run("train.py", *SMALL, "--model", tiny_model_dir, "--out", out)
    assert p.returncode == 2 and "--resume" in p.stderr
    p = run("train.py", *SMALL, "--model", tiny_model_dir, "--out", out, "--resume", "--lr", "0.5")
    assert p.returncode == 2 and "another configuration" in p.stderr and "lr" in p.stderr


def test_help_is_a_manual():
    p = run("train.py", "--help")
    assert p.returncode == 0
    for text in ("--method", "--eps", "--decay", "--judge", "Presets", "wmt cpu:", "wmt gpu:"):
        assert text in p.stdout


def test_init_from_another_method_equals_running_from_scratch(full_run, tmp_path, tiny_model_dir):
    # SFT, the reward model and iteration 0 are the same for every method: a mezo run started from the
    # zopro run's iteration 0 must end exactly where a mezo run from scratch ends
    out, _ = full_run
    scratch, init = tmp_path / "scratch", tmp_path / "init"
    for folder, extra in ((scratch, []), (init, ["--init-from", out])):
        p = run("train.py", *SMALL, "--model", tiny_model_dir, "--method", "mezo", "--out", folder, *extra)
        assert p.returncode == 0, p.stdout + p.stderr
    assert "[init] SFT, reward model and iteration 0 copied" in (init / "log.txt").read_text()
    a, b = (load_file(f / "checkpoints" / "latest.safetensors") for f in (scratch, init))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda f: [{k: v for k, v in json.loads(x).items() if k != "seconds"} for x in f.read_text().splitlines()]  # noqa: E731
    assert strip(scratch / "metrics.jsonl") == strip(init / "metrics.jsonl")
    p = run("train.py", *SMALL, "--model", tiny_model_dir, "--out", tmp_path / "bad", "--init-from", out, "--kl-coef", "0.1")
    assert p.returncode == 2 and "kl_coef" in p.stdout + p.stderr
