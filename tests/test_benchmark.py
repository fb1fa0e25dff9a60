"""benchmarks/step_cost.py as a user runs it, on the tiny model: every case runs, the ratios are printed
with their targets, and the JSON holds the numbers."""
import json
import subprocess
import sys

import pytest
import torch

from conftest import ROOT


def test_step_cost_tiny_prints_ratios_and_writes_json(tmp_path):
    out = tmp_path / "cost.json"
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "step_cost.py"), "--tiny", "--prompts", "2",
                        "--max-new-tokens", "4", "--warmup", "0", "--steps", "1", "--threads", "1", "--json", str(out)],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    for text in ("ZOPrO step memory ÷ inference memory", "first-order ÷ ZOPrO step memory",
                 "ZOPrO step ÷ (rollout + scoring + 2 forward passes)", "directions + perturb ÷ ZOPrO step time",
                 "ZOPrO ÷ MeZO step time", "same batch in every case: yes"):
        assert text in p.stdout
    res = json.loads(out.read_text())
    assert res.keys() >= {"machine", "settings", "cases", "ratios"}
    assert set(res["cases"]) == {"inference", "zopro", "mezo", "rloo"}
    assert {"generate", "reference", "reward", "forward", "perturb", "update", "total"} <= res["cases"]["zopro"]["seconds"].keys()
    assert "backward_update" in res["cases"]["rloo"]["seconds"]
    for c in res["cases"].values():
        assert c["memory"]["peak_mb"] >= c["memory"]["after_load_mb"] > 0
    for key in ("zopro_mem_over_inference", "rloo_mem_over_zopro", "zopro_time_over_limit", "perturb_share",
                "zopro_time_over_mezo"):
        r = res["ratios"][key]
        assert r["value"] > 0 and r["target"] and isinstance(r["met"], bool)


def test_comparison_table_means_over_seeds_and_times_relative_within_a_seed():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import compare_methods

    def run(reward, secs, norms=(1.0, 1.0, 1.0), cos=(0.0, 0.0), g=None, mu_share=()):
        return {"reward": reward, "sft_reward": 0.1, "gain": reward - 0.1, "gain_stderr": 0.0, "kl": 0.5, "n": 8,
                "step_seconds": secs, "first_step_g": g or {}, "rm_dev": {"pearson": reward, "mse": 1.0, "n": 8},
                "mu_share": list(mu_share),
                "path": {"step_norm": list(norms), "cos_prev": list(cos), "from_sft": [0.5, 0.25, 0.75], "dim": 10_000}}
    # Seed 1 ran on a machine twice as loaded: absolute times differ, ratios to zopro do not.
    results = {"zopro": {0: run(0.3, 100.0, (9.0, 0.2, 0.4), (-0.5, 0.25), {1: 0.5, 2: -0.25}, (0.5, 0.7)),
                         1: run(0.5, 200.0, (9.0, 0.6, 0.8), (-1.0, 0.75), {1: 0.125, 2: 1.0}, (0.6, 0.8))},
               "mezo": {0: run(0.2, 110.0), 1: run(0.2, 220.0)}}
    md = compare_methods.table(results, [0, 1], "wmt")
    rows = {}
    for line in md.splitlines():
        if line.startswith("| ") and "method" not in line:
            cells = [c.strip() for c in line.split("|")[1:-1]]
            rows.setdefault(cells[0], []).append(cells[1:])   # a method has a row in each of the two tables
    assert rows["zopro"][0][0] == "+0.400 ± 0.100"     # mean of 0.3 and 0.5; stderr = |0.5-0.3| / 2
    assert rows["mezo"][0][0] == "+0.200 ± 0.000"
    assert rows["mezo"][0][1] == "-0.200 ± 0.100"      # 0.2-0.3 and 0.2-0.5, within each seed
    assert rows["zopro"][0][1] == "-"
    assert rows["mezo"][0][5] == "1.10 ± 0.00"         # 110/100 and 220/200
    assert rows["zopro"][0][5] == "1.00 ± 0.00"
    assert rows["(SFT policy)"][0][0] == "+0.100 ± 0.000"
    assert all(len(r[0]) == len(rows["zopro"][0]) for r in rows.values())
    # the path table: iteration 0 (shared) is left out of the per-iteration columns
    assert rows["zopro"][1][0] == "0.500 ± 0.129"      # 0.2 0.4 0.6 0.8: mean 0.5, sd 0.2582, / √4
    assert rows["zopro"][1][1] == "0.625 ± 0.161"      # |cos| 0.5 0.25 1 0.75: mean 0.625, sd 0.3227, / √4
    assert rows["zopro"][1][2] == "-0.50 +0.25 -1.00 +0.75"
    assert rows["zopro"][1][3] == "0.650 ± 0.065"      # 0.5 0.7 0.6 0.8: mean 0.65, sd 0.1291, / √4
    assert rows["mezo"][1][3] == "-"                   # no targeted sampler, no μ
    assert rows["zopro"][1][4:6] == ["0.500 ± 0.000", "0.750 ± 0.000"]
    assert "1/√N = 0.0100" in md
    assert "seed 0: pearson 0.30; seed 1: pearson 0.50." in md  # zopro's runs carry the seed's reward model
    assert "seed 0: it 1 +0.5000, it 2 -0.2500; seed 1: it 1 +0.1250, it 2 +1.0000." in md


def test_trajectory_reads_the_policy_path_from_checkpoints(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import compare_methods
    import runs

    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "config.json").write_text(json.dumps({"iterations": 3, "method": "zopro"}))
    # θ as two tensors of a 3-vector: SFT at 0, then steps (1,0,0), (-2,0,0) (straight back), (0,0,3)
    pts = [[0, 0, 0], [1, 0, 0], [-1, 0, 0], [-1, 0, 3]]
    split = lambda v: {"a.lora_A": torch.tensor(v[:1], dtype=torch.float32), "a.lora_B": torch.tensor(v[1:], dtype=torch.float32)}  # noqa: E731
    runs.save_tensors(tmp_path / "checkpoints" / "sft.safetensors", split(pts[0]), {})
    for i, v in enumerate(pts[1:]):
        runs.save_tensors(tmp_path / "checkpoints" / f"iter{i}.safetensors",
                          {**runs.prefixed("policy", split(v)), **runs.prefixed("reward", {"x": torch.ones(1)})}, {})
    p = compare_methods.trajectory(tmp_path)
    assert p["step_norm"] == pytest.approx([1, 2, 3])
    assert p["cos_prev"] == pytest.approx([-1, 0])
    assert p["from_sft"] == pytest.approx([1, 1, 10 ** 0.5])
    assert p["dim"] == 3

    # the rest of a run folder, as train.py writes it: summarize reads the logs around the checkpoints
    final = {"reward": 0.3, "reward_gain": 0.05, "reward_gain_stderr": 0.01, "kl": 0.2, "n": 4}
    (tmp_path / "results.json").write_text(json.dumps({"final": final, "sft": {"reward": 0.25}}))
    steps = [{"iteration": it, "step": t, "reward": 0.0, "seconds": {"step": 1.0 + it}, "lr": 1.0 + t, "decay": 0.9 - 0.5 * t,
              **({"projected_grad": 0.1 * it + 0.01 * t} if it else {"grad_norm": 1.0})} for it in range(3) for t in range(2)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in steps))
    its = [{"stage": "reward0", "dev": {"pearson": 0.3, "mse": 0.5, "n": 8}}, {"stage": "dev", "iteration": -1, "reward": 0.2}]
    its += [{"stage": "iteration", "iteration": i, "prev_update_norm": 1.0, "dev": {"reward": 0.21 + i / 100}} for i in range(3)]
    (tmp_path / "iterations.jsonl").write_text("".join(json.dumps(x) + "\n" for x in its))
    r = compare_methods.summarize(tmp_path)
    assert r["step_seconds"] == 2 * 2.0 + 2 * 3.0          # iterations 1 and 2 only, two steps each
    assert r["first_step_g"] == {1: 0.1, 2: 0.2}            # step 0 of iterations >= 1
    # step lengths lr·|g|: iteration 1 takes 1·0.1 at d 0.9 and 2·0.11 at d 0.4, iteration 2 1·0.2 and 2·0.21
    assert r["mu_share"] == pytest.approx([0.1 / 0.32, 0.2 / 0.62])
    assert r["dev"] == pytest.approx({-1: 0.2, 0: 0.21, 1: 0.22, 2: 0.23})
    assert r["rm_dev"]["pearson"] == 0.3 and r["gain"] == 0.05 and r["sft_reward"] == 0.25


def test_training_curves_restart_their_moving_average_at_each_iteration():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import compare_methods
    assert compare_methods.smooth([1, 2, 3, 10, 20, 30], [0, 0, 0, 1, 1, 1], w=2) == [1, 1.5, 2.5, 10, 15, 25]


def test_comparison_runs_each_method_and_variant_from_the_zopro_runs_iteration0(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import compare_methods
    calls = []
    monkeypatch.setattr(compare_methods.subprocess, "run", lambda cmd: calls.append(cmd) or subprocess.CompletedProcess(cmd, 0))
    monkeypatch.setattr(compare_methods, "summarize", lambda run: {})
    monkeypatch.setattr(compare_methods, "table", lambda *a: "")
    monkeypatch.setattr(compare_methods, "plots", lambda *a: [])
    monkeypatch.setattr(sys, "argv", ["compare_methods.py", "--seeds", "3", "--methods", "zopro", "mezo", "--out",
                                      str(tmp_path), "--variant", "zopro-exp", "--decay exp --decay-rate 2", "--",
                                      "--iterations", "2"])
    compare_methods.main()
    args = [c[2:] for c in calls]                           # drop python and train.py
    base = str(tmp_path / "wmt-zopro-s3")
    assert args[0] == ["--task", "wmt", "--seed", "3", "--out", base, "--method", "zopro", "--iterations", "2"]
    assert args[1] == ["--task", "wmt", "--seed", "3", "--out", str(tmp_path / "wmt-mezo-s3"), "--method", "mezo",
                       "--iterations", "2", "--init-from", base]
    assert args[2] == ["--task", "wmt", "--seed", "3", "--out", str(tmp_path / "wmt-zopro-exp-s3"), "--decay", "exp",
                       "--decay-rate", "2", "--iterations", "2", "--init-from", base]
    assert len(calls) == 3
