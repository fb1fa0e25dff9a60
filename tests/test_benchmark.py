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
