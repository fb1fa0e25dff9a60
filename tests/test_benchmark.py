"""benchmarks/step_cost.py as a user runs it, on the tiny model: every case runs, the ratios are printed
with their targets, and the JSON holds the numbers."""
import json
import subprocess
import sys

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

    def run(reward, secs, moved=1.0, g=None):
        return {"reward": reward, "sft_reward": 0.1, "gain": reward - 0.1, "gain_stderr": 0.0, "kl": 0.5, "n": 8,
                "step_seconds": secs, "moved": moved, "first_step_g": g or {}}
    # Seed 1 ran on a machine twice as loaded: absolute times differ, ratios to zopro do not.
    results = {"zopro": {0: run(0.3, 100.0, 0.2, {1: 0.5, 2: -0.25}), 1: run(0.5, 200.0, 0.6, {1: 0.125, 2: 1.0})},
               "mezo": {0: run(0.2, 110.0), 1: run(0.2, 220.0)}}
    md = compare_methods.table(results, [0, 1], "wmt")
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in md.splitlines()
            if line.startswith("| ") and "method" not in line}
    assert rows["zopro"][0] == "+0.400 ± 0.100"     # mean of 0.3 and 0.5; stderr = |0.5-0.3| / 2
    assert rows["mezo"][0] == "+0.200 ± 0.000"
    assert rows["mezo"][1] == "-0.200 ± 0.100"      # 0.2-0.3 and 0.2-0.5, within each seed
    assert rows["zopro"][1] == "-"
    assert rows["zopro"][4] == "0.400 ± 0.200"      # ‖Δθ‖: mean of 0.2 and 0.6
    assert rows["mezo"][6] == "1.10 ± 0.00"         # 110/100 and 220/200
    assert rows["zopro"][6] == "1.00 ± 0.00"
    assert rows["(SFT policy)"][0] == "+0.100 ± 0.000"
    assert all(len(r) == len(rows["zopro"]) for r in rows.values())
    assert "seed 0: it 1 +0.5000, it 2 -0.2500; seed 1: it 1 +0.1250, it 2 +1.0000. 3 of 4 are > 0" in md
