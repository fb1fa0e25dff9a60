"""evaluate.py and metrics.py: each metric against an independent calculation, then the script as a user
runs it on a tiny trained run (real MLQE rows and post-edits, a tiny model from a config)."""
import itertools
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

import evaluate
import metrics
import runs
import zopro
from conftest import DATA, ROOT, tiny_llama, with_adapters
import tasks
from tasks import load_wmt

PE = DATA / "wmt20-mlqe-en-de-pe" / "v2"


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny models gain nothing from threads, and lose much to oversubscription on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------------------------------
# metrics.py on hand-made cases

def test_win_rate_counts_ties_half():
    a = [1.0, 2.0, 0.5, 3.0, 1.0]
    b = [0.0, 2.0, 1.0, 1.0, 0.9]
    same = [False, False, False, False, True]  # identical outputs tie whatever their scores
    out = metrics.win_outcomes([x > y for x, y in zip(a, b)], [s or x == y for s, x, y in zip(same, a, b)])
    assert out == [1.0, 0.5, 0.0, 1.0, 0.5]
    w = metrics.win_rate(out)
    assert (w["wins"], w["ties"], w["losses"], w["n"]) == (2, 2, 1, 5)
    assert w["rate"] == pytest.approx(3 / 5)
    sd = math.sqrt(sum((x - 0.6) ** 2 for x in out) / 4)
    assert w["stderr"] == pytest.approx(sd / math.sqrt(5))
    assert w["ci95"][0] <= 0.6 <= w["ci95"][1]


def test_bootstrap_interval_matches_the_normal_one_on_a_large_sample():
    xs = [float(i % 10 < 3) for i in range(2000)]  # p = 0.3
    lo, hi = metrics.bootstrap_ci(xs, n_resamples=2000, seed=1)
    half = 1.96 * math.sqrt(0.3 * 0.7 / 2000)
    assert lo == pytest.approx(0.3 - half, abs=0.006) and hi == pytest.approx(0.3 + half, abs=0.006)


def test_copy_heuristic_on_known_strings():
    src = "The committee approved the new budget after a long debate."
    assert metrics.source_coverage(src, src) == 1.0
    assert metrics.copies_source(src, src.upper())                    # case does not hide a copy
    assert metrics.copies_source(src, "Der Ausschuss approved the new budget after a long debate.")
    assert not metrics.copies_source(src, "Der Ausschuss billigte nach langer Debatte den neuen Haushalt.")
    # common words: committee approved the new budget after long debate ("The" is capitalised, "a" short)
    half = "Der Ausschuss approved the new Haushalt nach langer Debatte."
    assert metrics.source_coverage(src, half) == pytest.approx(3 / 8)   # approved, the, new of 8
    assert metrics.source_coverage("Barack Obama in Berlin", "Barack Obama in Berlin") == 0.0  # only names: no call


def test_not_german_heuristic_on_known_sentences():
    assert metrics.not_german("The committee approved the budget after a long debate.")
    assert metrics.not_german("It was the first of many visits to the island.")
    assert not metrics.not_german("Der Ausschuss billigte nach langer Debatte den neuen Haushalt.")
    assert not metrics.not_german("Sie ist mit ihrer Familie in die Stadt gezogen.")
    assert not metrics.not_german("")                 # cannot tell: counted as empty, not as English
    assert metrics.GERMAN_WORDS.isdisjoint(metrics.ENGLISH_WORDS)


def test_language_and_copy_heuristics_on_real_mlqe_rows():
    rows = load_wmt("test20", DATA)
    src, mt = [r.meta["source"] for r in rows], [r.response for r in rows]
    assert sum(map(metrics.not_german, src)) / len(src) > 0.95       # the English sources
    assert sum(map(metrics.not_german, mt)) / len(mt) < 0.03         # the German MT
    assert sum(metrics.copies_source(s, s) for s in src) / len(src) > 0.95
    assert sum(metrics.copies_source(s, m) for s, m in zip(src, mt)) / len(mt) < 0.05


def test_repetition():
    assert metrics.repetition("a b c d e f") == 0.0
    assert metrics.repetition("a b c d a b c d") == pytest.approx(1 - 4 / 5)  # grams abcd bcda cdab dabc abcd
    assert metrics.repetition("x x x x x x x x") == pytest.approx(1 - 1 / 5)
    assert metrics.repetition("too short") == 0.0


def test_chrf_matches_sacrebleu_and_the_data_readme():
    sacrebleu = pytest.importorskip("sacrebleu")
    hyp, ref = "Der Hund bellt laut .", "Der Hund bellte laut."
    assert metrics.chrf([hyp], [ref])["score"] == pytest.approx(sacrebleu.sentence_chrf(hyp, [ref]).score)
    assert metrics.chrf([ref], [ref], n_bootstrap=1)["score"] == pytest.approx(100.0)
    # data/README.md: the MLQE MT against the v2 post-edits of test20 scores chrF 84.9 (whitespace ignored,
    # so the tokenized references and the untokenized MT compare fairly).
    mt = [r.response for r in load_wmt("test20", DATA)]
    pe = (PE / "test20.pe").read_text(encoding="utf-8").splitlines()
    out = metrics.chrf(mt, pe, n_bootstrap=200)
    assert round(out["score"], 1) == 84.9 and out["ci95"][0] < out["score"] < out["ci95"][1]


def test_a_missing_optional_dependency_says_how_to_install_it():
    with pytest.raises(metrics.MissingDependency, match=r"pip install nothing-here==1\.0"):
        metrics.require("nothing_here_zopro", "nothing-here==1.0")


# ----------------------------------------------------------------------------------------------------
# The KL estimate that zopro.evaluate_policy reports, against exact enumeration

def test_kl_estimate_matches_exact_enumeration():
    """A 6-token vocabulary and 3 new tokens: every response (stopping at EOS) can be listed, so
    KL(π_τ‖π_ref,τ) = Σ_y π(y) log π(y)/π_ref(y) is exact, from plain forward passes without a cache."""
    torch.manual_seed(0)
    model = with_adapters(tiny_llama(6))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for k, p in zopro.adapter_params(model, zopro.POLICY).items():
            if k.endswith("lora_B"):
                p.add_(torch.randn(p.shape, generator=g) * 0.5)
    eos, T, tau, prompt = 2, 3, 0.7, [1, 3, 4, 5]

    @torch.no_grad()
    def logp(adapter, y):
        total = 0.0
        for t in range(len(y)):
            with zopro.use_adapter(model, adapter):
                logits = model(input_ids=torch.tensor([prompt + y[:t]])).logits[0, -1].double() / tau
            total += logits.log_softmax(-1)[y[t]].item()
        return total

    responses = [list(y) for n in range(1, T + 1) for y in itertools.product(range(6), repeat=n)
                 if eos not in y[:-1] and (n == T or y[-1] == eos)]
    lp = [(logp(zopro.POLICY, y), logp(zopro.REFERENCE, y)) for y in responses]
    assert sum(math.exp(a) for a, _ in lp) == pytest.approx(1.0)
    exact = sum(math.exp(a) * (a - b) for a, b in lp)
    assert exact > 0.05

    n = 4000
    rm = zopro.RewardModel(zopro.REWARD, torch.nn.Linear(32, 1))
    out = zopro.evaluate_policy(model, zopro.pack([prompt] * n, [[]] * n, 2), rm,
                                zopro.Config(max_new_tokens=T, temperature=tau), eos, 2, zopro.POLICY, 0, 1000)
    mean, se = runs.mean_stderr(out["kl"])
    assert abs(mean - exact) < 4 * se


# ----------------------------------------------------------------------------------------------------
# The script, on a tiny trained run

FAST = ["--task", "wmt", "--preset", "cpu", "--sft-examples", "8", "--rm-examples", "16", "--rm-dev-examples", "8",
        "--iterations", "2", "--steps-per-iteration", "1", "--prompts-per-step", "2", "--refine-prompts", "2",
        "--dev-prompts", "1", "--test-prompts", "6", "--max-prompt-len", "200", "--max-new-tokens", "48",
        "--micro-batch", "8", "--save-every", "1"]


def run(script, *args, **env):
    # one thread: the tiny model gains nothing from more, and loses a lot on a busy machine
    env = {**os.environ, "ZOPRO_DATA_DIR": str(DATA), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **env}
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=600)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, tiny_model_dir):
    """A trained run, and a copy whose final policy is pushed far from the SFT policy."""
    base = tmp_path_factory.mktemp("eval-runs")
    a, b = base / "a", base / "b"
    p = run("train.py", *FAST, "--model", tiny_model_dir, "--out", a)
    assert p.returncode == 0, p.stdout + p.stderr
    shutil.copytree(a, b)
    tensors, meta = runs.load_tensors(b / "checkpoints" / "latest.safetensors")
    g = torch.Generator().manual_seed(0)
    for k in tensors:
        if k.startswith("policy/") and k.endswith("lora_B"):
            tensors[k] = tensors[k] + torch.randn(tensors[k].shape, generator=g)
    runs.save_tensors(b / "checkpoints" / "latest.safetensors", tensors, meta)
    return a, b


def test_runs_side_by_side(two_runs, tmp_path):
    a, b = two_runs
    out = tmp_path / "cmp.json"
    p = run("evaluate.py", a, b, a / "checkpoints" / "iter0.safetensors", "--llm-judge", "--samples", "6",
            "--json", out)
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.count("win vs sft (RM)") == 1                      # one table
    rep = json.loads(out.read_text())
    assert rep["task"] == "wmt" and rep["split"] == "test20" and rep["n"] == 6
    assert [r["label"] for r in rep["runs"]] == [f"{a}:latest", f"{b}:latest", f"{a}:iter0"]
    for r in rep["runs"]:
        pol = r["policy"]
        assert pol["n"] == r["sft"]["n"] == 6 and pol["chrf"]["n"] == 6
        for w in (pol["win_rate"], pol["win_rate_llm"]):
            assert w["wins"] + w["ties"] + w["losses"] == w["n"] == 6
            assert w["rate"] == pytest.approx((w["wins"] + w["ties"] / 2) / 6)
        assert abs(r["sft"]["kl"]) < 1e-3                                # the SFT policy is its own reference
        for key in ("reward_stderr", "kl_stderr", "empty", "at_limit", "copies_source", "not_german"):
            assert key in pol
    pushed = rep["runs"][1]
    assert pushed["policy"]["kl"] > 0.1                                 # b's policy moved far from the SFT
    assert any(s["response"] != s["sft"] for s in pushed["samples"])
    # each run folder gets its own numbers, the same as the combined file and as training's own report
    ev = json.loads((a / "eval.json").read_text())
    assert ev["policy"] == rep["runs"][0]["policy"] and ev["checkpoint"]["name"] == "latest"
    assert (a / "eval-iter0.json").exists()
    final = json.loads((a / "results.json").read_text())["final"]
    assert ev["policy"]["reward"] == pytest.approx(final["reward"], abs=1e-5)
    # chrF references: the v2 post-edit of each sampled source, and the MT's chrF computed here directly
    sacrebleu = pytest.importorskip("sacrebleu")
    by_question = {r.question: r for r in load_wmt("test20", DATA)}
    pe = (PE / "test20.pe").read_text(encoding="utf-8").splitlines()
    rows = [by_question[s["question"]] for s in rep["runs"][0]["samples"]]
    assert [s["reference"] for s in rep["runs"][0]["samples"]] == [pe[r.meta["index"]] for r in rows]
    direct = sacrebleu.corpus_chrf([r.response for r in rows], [[pe[r.meta["index"]] for r in rows]]).score
    assert rep["dataset_responses"]["chrf"]["score"] == pytest.approx(direct)


def edited_copy(src, dst, **changes):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**cfg, **changes}))
    return dst


def test_runs_of_another_task_or_lora_layout_are_refused(two_runs, tmp_path, capsys):
    a, _ = two_runs
    p = run("evaluate.py", a, edited_copy(a, tmp_path / "task", task="chat"))
    assert p.returncode == 2 and "differ in task" in p.stderr and "win vs sft" not in p.stdout, p.stderr
    # the same check in-process (the subprocess costs seconds of imports)
    assert evaluate.main([str(a), str(edited_copy(a, tmp_path / "lora", lora_r=4))]) == 2
    err = capsys.readouterr()
    assert "differ in lora_r" in err.err and "win vs sft" not in err.out


def test_an_eval_rm_of_another_lora_layout_is_refused(two_runs, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ZOPRO_DATA_DIR", str(DATA))
    a, _ = two_runs
    tensors, meta = runs.load_tensors(a / "checkpoints" / "reward0.safetensors")
    # rank 4 instead of the run's 8: A is [r, in], B is [out, r]
    narrow = {k: v[:4] if k.endswith("lora_A") else v[:, :4] if k.endswith("lora_B") else v for k, v in tensors.items()}
    runs.save_tensors(tmp_path / "reward0.safetensors", narrow, meta)
    assert evaluate.main([str(a), "--eval-rm", str(tmp_path / "reward0.safetensors")]) == 2
    assert "does not fit" in capsys.readouterr().err


def test_plot_draws_the_training_curves_without_a_model(two_runs, tmp_path, capsys):
    a, b = two_runs
    assert evaluate.main([str(a), str(b), "--plot", str(tmp_path / "figs")]) == 0
    for key in ("reward", "kl", "projected_grad", "decay"):
        for axis in ("step", "time"):
            f = tmp_path / "figs" / f"{key}_vs_{axis}.png"
            assert f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f
    assert "win vs sft" not in capsys.readouterr().out                # curves only: nothing was scored


def test_chrf_is_skipped_with_a_clear_message(two_runs, tmp_path, monkeypatch, capsys):
    a, _ = two_runs
    s = json.loads((a / "config.json").read_text())
    rows = load_wmt("test20", DATA)[:3]

    def no_sacrebleu(module, pip_spec):
        raise metrics.MissingDependency(f"{module} is not installed (pip install {pip_spec})")

    monkeypatch.setattr(metrics, "require", no_sacrebleu)
    assert evaluate.references(s, rows) is None
    assert "pip install sacrebleu==2.6.0" in capsys.readouterr().out
    monkeypatch.undo()

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(tasks.urllib.request, "urlopen", offline)
    monkeypatch.setenv("ZOPRO_CACHE", str(tmp_path / "cache"))
    (tmp_path / "data").mkdir()
    assert evaluate.references(dict(s, data_dir=str(tmp_path / "data")), rows) is None
    assert "skipped: no MLQE-PE post-edit files (test20.pe, test20.src)" in capsys.readouterr().out
    monkeypatch.delenv("ZOPRO_DATA_DIR", raising=False)                # no data folder: the download is tried
    assert evaluate.references(dict(s, data_dir=None), rows) is None
    msg = capsys.readouterr().out
    assert "skipped" in msg and "sheffieldnlp/mlqe-pe" in msg and "could not be fetched" in msg
