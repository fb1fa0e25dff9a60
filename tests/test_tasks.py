"""The preference tasks (chat: HH-RLHF, summarize: TL;DR comparisons): parsing on the real files and on
hand-made records, the group-disjoint splits, what is dropped and reported, and the Bradley–Terry loss on a
real pair. Expected values come from the dataset README, from hand-written records, or from a second,
simpler reading of the raw files."""
import gzip
import json
import math
import os
import re
import subprocess
import sys
import urllib.request
import warnings
from collections import Counter, defaultdict

import pytest
import torch

import runs
import tasks
import train
import zopro
from conftest import DATA, ROOT

HH = DATA / "hh-rlhf"
TLDR = DATA / "summarize-from-feedback" / "comparisons"
SPLITS = ("train", "dev", "test")


def load_all(load, data_dir):
    """{split: rows} and the drop report (the DataWarning's message, or None)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rows = {s: load(s, str(data_dir)) for s in SPLITS}
    messages = {str(w.message) for w in caught if issubclass(w.category, tasks.DataWarning)}
    assert len(messages) <= 1  # the same report for every split
    return rows, next(iter(messages), None)


@pytest.fixture(scope="module")
def chat():
    return load_all(tasks.load_chat, DATA)


@pytest.fixture(scope="module")
def summarize():
    return load_all(tasks.load_summarize, DATA)


def raw_hh():
    """{"subset/test.jsonl.gz:line": record}, read without the task code."""
    out = {}
    for f in sorted(HH.glob("*/test.jsonl.gz")):
        with gzip.open(f, "rt", encoding="utf-8") as fh:
            for n, line in enumerate(fh, start=1):
                out[f"{f.parent.name}/test.jsonl.gz:{n}"] = json.loads(line)
    return out


def raw_tldr():
    out = {}
    for f in sorted(TLDR.glob("batch*.json")):
        for n, line in enumerate(f.read_text(encoding="utf-8").split("\n"), start=1):
            if line:
                out[f"{f.name}:{n}"] = json.loads(line)
    return out


def dropped(report: str, reason: str) -> tuple[int, list[str]]:
    """How many rows a report says were dropped for `reason`, and the file:line places it lists (5 at most)."""
    m = re.search(rf"(\d+) {re.escape(reason)} \(([^)]*)\)", report)
    return (int(m.group(1)), [p for p in m.group(2).split(", ") if p != "..."]) if m else (0, [])


# ----------------------------------------------------------------------------------------------------
# chat: transcript splitting

def hh_file(path, pairs):
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for chosen, rejected in pairs:
            f.write(json.dumps({"chosen": chosen, "rejected": rejected}) + "\n")


def test_transcripts_split_into_dialogue_and_final_answers(tmp_path):
    shared = "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: What is 2+2?"
    pairs = [
        (shared + "\n\nAssistant: 4.", shared + "\n\nAssistant: Fish."),                          # 1 kept
        ("\n\nHuman: A?\n\nAssistant: B.\n\nHuman: C?\n\nAssistant: D.",                           # 2 differs
         "\n\nHuman: A?\n\nAssistant: X.\n\nHuman: C?\n\nAssistant: Y."),                           #   before the end
        (shared + "\n\nAssistant: 4.", shared + "\n\nAssistant: 4."),                              # 3 chosen == rejected
        (shared + "\n\nAssistant: 4.", shared + "\n\nAssistant:  4. "),                            # 4 same answer
        (shared + "\n\nAssistant: Umm.\n\nAssistant: 4.", shared + "\n\nAssistant: 5."),           # 5 two turns, merged
        (shared + "\n\nAssistant: 4.", shared + "\n\nAssistant: 4.\n\nHuman: thanks"),             # 6 ends with Human
        (shared + "\n\nAssistant: 4.", shared + "\n\nAssistant: "),                                # 7 empty answer
    ]
    f = tmp_path / "x.jsonl.gz"
    hh_file(f, pairs)
    drops = defaultdict(list)
    rows = tasks.read_jsonl(f, "x", tasks.hh_row, drops)
    assert dict(drops) == {"dialogues differ before the final answer": ["x:2"], "same final answer": ["x:3", "x:4"],
                             "no final assistant answer": ["x:6", "x:7"]}
    assert [r.meta["source"] for r in rows] == ["x:1", "x:5"]
    first, merged = rows
    assert first.messages == [{"role": "user", "content": "Hi there"},
                              {"role": "assistant", "content": "Hello! How can I help?"},
                              {"role": "user", "content": "What is 2+2?"}]
    assert (first.response, first.rejected) == ("4.", "Fish.")
    assert first.question == "Human: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: What is 2+2?"
    assert first.meta["group"] == "Hi there"
    assert merged.messages == first.messages and (merged.response, merged.rejected) == ("Umm.\n\n4.", "5.")


def test_real_transcripts_kept_and_dropped(chat):
    rows, report = chat
    raw = raw_hh()
    # the README's row counts: 2312 + 2354 + 1137 + 2749 official test pairs
    assert len(raw) == 8552
    kept = [r for s in SPLITS for r in rows[s]]
    # chosen == rejected, counted on the raw text (README: 0 + 2 + 2 + 32)
    same = [k for k, r in raw.items() if r["chosen"] == r["rejected"]]
    assert len(same) == 36 and dropped(report, "same final answer")[0] == 36
    # no non-blank assistant text after the last human turn, counted by string search
    def no_answer(t):
        a = t.find("\n\nAssistant:", t.rfind("\n\nHuman:"))
        return a < 0 or not t[a:].replace("\n\nAssistant:", "").strip()
    no_final = [k for k, r in raw.items() if no_answer(r["chosen"]) or no_answer(r["rejected"])]
    assert dropped(report, "no final assistant answer") == (13, no_final[:5]) and len(no_final) == 13
    assert "dialogues differ" not in report
    assert len(kept) == 8552 - 36 - 13
    # the 17 raw pairs whose text before the last "Assistant:" differs (README: 5 + 9 + 0 + 3) all have two
    # assistant turns in a row; merging them makes the dialogues equal
    last = lambda t: t[:t.rfind("\n\nAssistant:")]  # noqa: E731
    differ = [r for r in raw.values() if last(r["chosen"]) != last(r["rejected"])]
    two_in_a_row = re.compile(r"\n\nAssistant:(?:(?!\n\nHuman:).)*\n\nAssistant:", re.S)
    assert len(differ) == 17 and all(two_in_a_row.search(r["chosen"] + r["rejected"]) for r in differ)
    for r in kept:
        src = raw[r.meta["source"]]
        assert src["chosen"].rstrip().endswith(r.response.split("\n\n")[-1])
        assert src["rejected"].rstrip().endswith(r.rejected.split("\n\n")[-1])
        assert [m["role"] for m in r.messages] == ["user", "assistant"] * (len(r.messages) // 2) + ["user"]
        assert src["chosen"][len("\n\nHuman:"):].lstrip().startswith(r.messages[0]["content"])


def test_chat_split_is_deterministic_and_keeps_a_conversation_on_one_side(chat):
    rows, _ = chat
    groups = {s: {r.meta["group"] for r in rows[s]} for s in SPLITS}
    assert not (groups["train"] & groups["dev"] or groups["train"] & groups["test"] or groups["dev"] & groups["test"])
    n = sum(len(rows[s]) for s in SPLITS)
    assert abs(len(rows["train"]) / n - 0.8) < 0.02 and abs(len(rows["dev"]) / n - 0.1) < 0.02
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", tasks.DataWarning)
        again = tasks.load_chat("test", str(HH))  # the hh-rlhf folder itself works too
    assert [r.meta["source"] for r in again] == [r.meta["source"] for r in rows["test"]]
    assert tasks.TASKS["chat"].splits == {"train": "train", "dev": "dev", "test": "test"}
    assert "official HH-RLHF TEST files" in tasks.TASKS["chat"].note


# ----------------------------------------------------------------------------------------------------
# summarize: TL;DR comparisons

def test_tldr_rows_match_the_raw_records(summarize):
    rows, report = summarize
    raw = raw_tldr()
    assert report is None
    assert Counter(k.split(":")[0] for k in raw) == {"batch13.json": 1097, "batch18.json": 674}  # README
    kept = [r for s in SPLITS for r in rows[s]]
    assert sorted(r.meta["source"] for r in kept) == sorted(raw)
    for r in kept:
        rec = raw[r.meta["source"]]
        texts = [s["text"] for s in rec["summaries"]]
        assert all(t.startswith(" ") for t in texts)  # why the task strips them
        assert r.response == texts[rec["choice"]].strip() and r.rejected == texts[1 - rec["choice"]].strip()
        assert r.response == r.response.strip() and r.rejected == r.rejected.strip()
        assert r.messages == [{"role": "user", "content": r.question}]
        info = rec["info"]
        assert info["post"].strip() in r.question and info["title"] in r.question and f"r/{info['subreddit']}" in r.question
        assert "TL;DR" in r.question and r.meta["upstream_split"] in ("valid1", "valid2")


def test_tldr_split_keeps_every_comparison_of_a_post_on_one_side(summarize):
    rows, _ = summarize
    per_post = Counter(rec["info"]["id"] for rec in raw_tldr().values())
    assert len(per_post) == 905 + 110 - 12  # README: distinct posts per file, 12 in both
    side = {}
    for s in SPLITS:
        for post, n in Counter(r.meta["group"] for r in rows[s]).items():
            assert post not in side and n == per_post[post]  # all its comparisons, and on this side only
            side[post] = s
    assert len(side) == len(per_post)
    assert all(len(rows[s]) > 100 for s in SPLITS)
    assert "VALIDATION" in tasks.TASKS["summarize"].note


def tldr_record(post="My cat ate my homework.", choice=0, texts=(" Cat ate homework.", " Dog ate homework."), **info):
    info = {"id": "t3_x", "post": post, "title": "Help", "subreddit": "tifu", **info}
    return {"info": info, "split": "valid1", "summaries": [{"text": t, "policy": "p", "note": None} for t in texts],
            "choice": choice}


def test_an_article_row_becomes_a_news_prompt():
    rec = tldr_record(choice=1, texts=(" Storm hits coast.", " A storm hit the coast on Monday. "))
    del rec["info"]["post"], rec["info"]["subreddit"]
    rec["info"].update(article=" A storm hit the coast on Monday.\n", site="cnn", title="Storm")
    row = tasks.tldr_row(rec, "cnn.json:1")
    assert (row.response, row.rejected) == ("A storm hit the coast on Monday.", "Storm hits coast.")
    assert row.question.endswith("SITE: cnn\nTITLE: Storm\nARTICLE: A storm hit the coast on Monday.")
    assert "news article" in row.question and row.meta["group"] == "t3_x"


def write_jsonl(path, lines):
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines), encoding="utf-8")


def test_malformed_tldr_rows_are_reported_and_not_used(tmp_path):
    three = tldr_record(texts=(" a", " b", " c"))
    no_post = tldr_record()
    del no_post["info"]["post"]
    write_jsonl(tmp_path / "batch13.json", [
        tldr_record(), "{not json", three, tldr_record(choice=2), tldr_record(texts=(" ok", "  ")), no_post,
        tldr_record(choice=True)])
    write_jsonl(tmp_path / "batch18.json", [tldr_record(post="Second post.", choice=1, id="t3_y")])
    with pytest.warns(tasks.DataWarning) as caught:
        rows = [r for s in SPLITS for r in tasks.load_summarize(s, str(tmp_path))]
    report = str(caught[0].message)
    for reason, place in [("not JSON", "batch13.json:2"), ("not exactly two summaries", "batch13.json:3"),
                          ("choice not 0 or 1", "batch13.json:4"), ("empty summary", "batch13.json:5"),
                          ("no post or article", "batch13.json:6"), ("choice not 0 or 1", "batch13.json:7")]:
        assert place in dropped(report, reason)[1]
    assert "kept 2 rows, dropped 6" in report
    assert sorted((r.meta["source"], r.response, r.rejected) for r in rows) == [
        ("batch13.json:1", "Cat ate homework.", "Dog ate homework."),
        ("batch18.json:1", "Dog ate homework.", "Cat ate homework.")]
    write_jsonl(tmp_path / "batch18.json", ["[]"])
    write_jsonl(tmp_path / "batch13.json", [three])
    with pytest.raises(tasks.DataError, match=r"kept 0 rows.*batch13.json:1"):
        tasks.load_summarize("train", str(tmp_path))


# ----------------------------------------------------------------------------------------------------
# Finding the files, and what happens without them

@pytest.mark.parametrize("sub", ["", "summarize-from-feedback", "summarize-from-feedback/comparisons"])
def test_tldr_folder_may_be_the_data_root_or_below(sub):
    assert len(tasks.load_summarize("dev", str(DATA / sub) if sub else str(DATA))) > 100


def test_no_data_and_no_network_says_where_to_put_the_files(tmp_path, monkeypatch):
    def offline(*a, **k):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    monkeypatch.delenv("ZOPRO_DATA_DIR", raising=False)
    monkeypatch.setenv("ZOPRO_CACHE", str(tmp_path / "cache"))
    with pytest.raises(tasks.DataError, match=r"(?s)could not be fetched.*--data-dir.*harmless-base/test.jsonl.gz"):
        tasks.load_chat("train", None)
    with pytest.raises(tasks.DataError, match=r"(?s)could not be fetched.*--data-dir.*batch13.json"):
        tasks.load_summarize("train", None)
    assert not list((tmp_path / "cache").rglob("*.json*"))  # nothing half-written is left to be read later
    with pytest.raises(tasks.DataError, match="no HH-RLHF test files"):
        tasks.load_chat("train", str(tmp_path))


# ----------------------------------------------------------------------------------------------------
# Bradley–Terry on real pairs, encoded as train.py encodes them

@pytest.mark.parametrize("task", ["chat", "summarize"])
def test_reward_loss_on_real_pairs_is_minus_log_sigmoid_of_the_margin(task, request, model, tok, rm):
    rows = request.getfixturevalue(task)[0]["train"]
    shortest = sorted(rows, key=lambda r: len(r.question) + len(r.response) + len(r.rejected))[:2]
    s = {"device": "cpu", "max_prompt_len": 2000, "max_new_tokens": 1000}
    _, prompts, responses = runs.fit_rows(tok, shortest, s, "bt", answers="both")
    chosen, rejected = train.reward_batch(tok, s, [(p, r, None) for p, r in zip(prompts, responses)])
    loss = zopro.reward_loss(model, rm, (chosen, rejected)).item()

    def score_alone(row, answer):
        """The reward of one unpadded sequence: chat template, then answer bytes and EOS, built by hand."""
        p = tok.apply_chat_template(row.messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        ids = torch.tensor([p + tok.encode(answer, add_special_tokens=False) + [tok.eos_token_id]])
        return zopro.reward_scores(model, rm, zopro.Sequences(ids, torch.ones_like(ids), len(p))).item()

    margins = [score_alone(r, r.response) - score_alone(r, r.rejected) for r in shortest]
    expected = sum(-math.log(1 / (1 + math.exp(-m))) for m in margins) / len(margins)
    assert loss == pytest.approx(expected, abs=1e-5)
    assert any(abs(m) > 1e-3 for m in margins)  # the check is not 0 == 0


@pytest.mark.parametrize("task", ["chat", "summarize"])
def test_presets_reach_train_py(task):
    s = train.resolve(train.build_parser().parse_args(["--task", task, "--preset", "cpu"]))
    preset = tasks.TASKS[task].presets["cpu"]
    assert {k: s[k] for k in preset} == preset and train.config_of(s).max_new_tokens == preset["max_new_tokens"]
    assert f"{task} cpu:" in train.build_parser().epilog and f"{task} gpu:" in train.build_parser().epilog


# ----------------------------------------------------------------------------------------------------
# train.py end to end on chat: a tiny model (byte tokenizer, so lengths are in bytes) on the real rows short
# enough to keep it fast (the tiny model never stops early: every generation runs to max_new_tokens).
# summarize shares every stage after loading; its posts would make a run a minute long.

@pytest.fixture(scope="module")
def short_chat_data(tmp_path_factory, chat):
    """A data folder with the lines of the real HH-RLHF files, byte for byte, whose rows are short."""
    rows, _ = chat
    keep = {r.meta["source"] for s in SPLITS for r in rows[s]
            if len(r.question) <= 150 and max(len(r.response), len(r.rejected)) <= 40}
    dest = tmp_path_factory.mktemp("data")
    for rel in tasks.HH_FILES:
        with gzip.open(HH / rel, "rt", encoding="utf-8") as f:
            lines = [ln for n, ln in enumerate(f, start=1) if f"{rel}:{n}" in keep]
        (dest / "hh-rlhf" / rel).parent.mkdir(parents=True)
        with gzip.open(dest / "hh-rlhf" / rel, "wt", encoding="utf-8") as f:
            f.writelines(lines)
    return dest


def test_train_runs_chat(short_chat_data, tmp_path, tiny_model_dir):
    out = tmp_path / "chat"
    args = ["--task", "chat", "--preset", "cpu", "--model", tiny_model_dir, "--out", out, "--max-prompt-len", "200",
            "--max-new-tokens", "48", "--sft-examples", "4", "--rm-examples", "4", "--rm-dev-examples", "2",
            "--iterations", "1", "--steps-per-iteration", "1", "--prompts-per-step", "2", "--dev-prompts", "2",
            "--test-prompts", "2", "--micro-batch", "8"]
    env = {**os.environ, "ZOPRO_DATA_DIR": str(short_chat_data), "HF_HUB_OFFLINE": "1"}
    p = subprocess.run([sys.executable, str(ROOT / "train.py"), *map(str, args)], capture_output=True, text=True,
                       env=env, cwd=ROOT, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["task"] == "chat" and results["split"] == "test" and results["final"]["n"] == 2
    reward0 = [json.loads(x) for x in (out / "iterations.jsonl").read_text().splitlines()][1]
    assert reward0["stage"] == "reward0" and "pair_accuracy" in reward0["dev"]  # trained on pairs
