"""The task table: datasets, prompt formats and presets. zopro.py knows nothing of tasks.

Every loader returns rows of one shape (`Row`), so train.py and evaluate.py have no task-specific branch
beyond the table: a task is a loader per split, a reward-model kind ("mse" on human scores or "bt" on
preference pairs), a rule for the SFT targets, CPU/GPU presets, and a note when its splits are not the
dataset's official ones (chat and summarize: offline, only held-out files exist, so they are split anew).
"""
import csv
import gzip
import hashlib
import json
import os
import re
import tarfile
import urllib.request
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import metrics
from models import cache_dir


class DataError(RuntimeError):
    pass


class DataWarning(UserWarning):
    """Rows were dropped while reading (counted, with file:line); the rest are usable."""


@dataclass
class Row:
    question: str                   # the request as plain text (shown to judges and in samples)
    messages: list[dict]            # the chat messages before the answer: the prompt
    response: str = ""              # a human-scored answer (wmt: the MT) or the preferred one (pairs)
    score: float | None = None      # human score of `response` (wmt: DA z_mean)
    rejected: str | None = None     # the dispreferred answer of a preference pair
    meta: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------
# Shared by the tasks: finding or fetching the files, a fixed split, counting the rows left out

def find_data(data_dir: str | None, name: str, files: list[str], download, what: str) -> Path:
    """The folder holding `files` (paths relative to it). --data-dir / $ZOPRO_DATA_DIR may be that folder or
    any parent along `name` (for "hh-rlhf": DATA/hh-rlhf or DATA); without one, the download cache, where
    download(folder) fetches the files first if any is missing."""
    base = data_dir or os.environ.get("ZOPRO_DATA_DIR")
    if base:
        parts = Path(name).parts
        candidates = [Path(base).joinpath(*parts[i:]) for i in range(len(parts) + 1)]
        for cand in candidates:
            if all((cand / f).exists() for f in files):
                return cand
        raise DataError(f"no {what} files ({', '.join(files)}) in {' or '.join(map(str, candidates))}; point "
                        "--data-dir (or ZOPRO_DATA_DIR) at the folder that holds them")
    cache = cache_dir() / "data" / name
    if not all((cache / f).exists() for f in files):
        download(cache)
    return cache


def download_files(dest: Path, urls: dict[str, str], what: str, hint: str) -> None:
    """Fetches each missing file (path relative to dest -> URL), written atomically so that an interrupted
    download is fetched again rather than read half-written. Failing, says where to put the files instead."""
    for rel, url in urls.items():
        path = dest / rel
        if path.exists():
            continue
        print(f"[data] downloading {url}")
        try:
            with urllib.request.urlopen(url, timeout=30) as r:
                data = r.read()
        except OSError as e:
            raise DataError(
                f"{what} is not on this machine and {url} could not be fetched ({e}). Point --data-dir (or "
                f"ZOPRO_DATA_DIR) at a folder holding {', '.join(urls)} ({hint}), or put them in {dest}.") from e
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)


SPLIT_SEED = 0  # fixed, not the run seed: every run of a task trains, selects and reports on the same rows


def split_of(key: str) -> str:
    """"train", "dev" or "test" (80/10/10) as a pure function of `key` (sha256; Python's hash() is salted per
    process), so rows sharing a key land on one side, on every machine, whatever the file order."""
    u = int.from_bytes(hashlib.sha256(f"{SPLIT_SEED}/{key}".encode("utf-8")).digest()[:8], "big") / 2 ** 64
    return "train" if u < 0.8 else "dev" if u < 0.9 else "test"


def rows_of_split(rows: list[Row], split: str, task: str) -> list[Row]:
    """The rows whose meta["group"] (a conversation, a post) hashes to `split`."""
    if split not in ("train", "dev", "test"):
        raise DataError(f"{task} has splits train, dev, test, not {split!r}")
    return [r for r in rows if split_of(r.meta["group"]) == split]


class Skip(Exception):
    """A record that is read but not used; the message is the reason, counted by read_jsonl."""


def need(ok, reason: str) -> None:
    if not ok:
        raise Skip(reason)


def read_jsonl(path: Path, label: str, parse, dropped: dict) -> list[Row]:
    """Rows of a JSON Lines file (gzip if *.gz), one per line that parse(record, where) accepts. A line that is
    not JSON, or that parse rejects with Skip, is never used: it is listed as "label:line" in dropped[reason]."""
    rows = []
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rt", encoding="utf-8") as f:
            for n, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{label}:{n}"
                try:
                    rows.append(parse(json.loads(line), where))
                except json.JSONDecodeError:
                    dropped["not JSON"].append(where)
                except Skip as e:
                    dropped[str(e)].append(where)
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot be read as UTF-8 JSON Lines ({e})") from e
    return rows


def report_dropped(what: str, kept: int, dropped: dict) -> None:
    """A DataWarning with each reason's count and first places (file:line); a DataError if no row is left."""
    if not dropped and kept:
        return
    parts = [f"{len(w)} {reason} ({', '.join(w[:5])}{', ...' if len(w) > 5 else ''})" for reason, w in dropped.items()]
    msg = f"{what}: kept {kept} rows, dropped {sum(map(len, dropped.values()))}: " + "; ".join(parts)
    if not kept:
        raise DataError(msg)
    warnings.warn(msg, DataWarning, stacklevel=3)


def chosen_rows(rows: list[Row], preset: dict) -> list[Row]:
    """SFT targets of a preference task: every pair's preferred answer (Row.response)."""
    return rows


# ----------------------------------------------------------------------------------------------------
# WMT20 MLQE en-de (Fomicheva et al. 2020): English source, German MT, direct-assessment z_mean

MLQE_COMMIT = "49510b1905e10b48287fb9064835e3e8579a729e"
MLQE_URLS = [f"https://github.com/facebookresearch/mlqe/raw/{MLQE_COMMIT}/data/{name}"
             for name in ("en-de.tar.gz", "en-de_test.tar.gz")]
MLQE_SPLITS = {"train": "train.ende.df.short.tsv", "dev": "dev.ende.df.short.tsv", "test20": "test20.ende.df.short.tsv"}
MLQE_COLUMNS = ["index", "original", "translation", "scores", "mean", "z_scores", "z_mean", "model_scores"]


def wmt_question(source: str) -> str:
    return f"Translate this English sentence into German. Reply with the translation only.\n\n{source}"


def read_mlqe(path: Path) -> list[Row]:
    """One MLQE TSV. Quoting is off: quote characters are literal in these files, and with CSV quoting
    on, 10 rows (8 train, 2 test) are split into the wrong fields."""
    rows = []
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, None)
        if header != MLQE_COLUMNS:
            raise DataError(f"{path}: expected the MLQE header {MLQE_COLUMNS}, got {header}")
        for n, rec in enumerate(reader, start=2):
            if len(rec) != len(MLQE_COLUMNS):
                raise DataError(f"{path}:{n}: expected {len(MLQE_COLUMNS)} tab-separated fields, got {len(rec)}")
            src, mt, z = rec[1].strip(), rec[2].strip(), float(rec[6])
            if not src or not mt or z != z:
                raise DataError(f"{path}:{n}: empty source/translation or NaN z_mean")
            q = wmt_question(src)
            rows.append(Row(q, [{"role": "user", "content": q}], mt, z, meta={"index": int(rec[0]), "source": src}))
    return rows


def find_mlqe(data_dir: str | None) -> Path:
    """The folder holding the MLQE TSVs (see find_data), downloading the public release if needed."""
    return find_data(data_dir, "wmt20-mlqe-en-de", list(MLQE_SPLITS.values()), download_mlqe, "MLQE en-de")


def download_mlqe(dest: Path) -> None:
    tmp = dest.with_name(dest.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    for url in MLQE_URLS:
        print(f"[data] downloading {url}")
        archive = tmp / url.rsplit("/", 1)[1]
        try:
            with urllib.request.urlopen(url, timeout=30) as r:
                archive.write_bytes(r.read())
        except OSError as e:
            raise DataError(
                f"WMT20 MLQE en-de is not on this machine and {url} could not be fetched ({e}). "
                "Point --data-dir (or ZOPRO_DATA_DIR) at a folder holding train.ende.df.short.tsv, "
                "dev.ende.df.short.tsv and test20.ende.df.short.tsv (from github.com/facebookresearch/mlqe, "
                "data/en-de.tar.gz and data/en-de_test.tar.gz).") from e
        with tarfile.open(archive) as tf:
            for m in tf.getmembers():
                if m.name.endswith(".tsv"):
                    (tmp / Path(m.name).name).write_bytes(tf.extractfile(m).read())
        archive.unlink()
    tmp.rename(dest)


def load_wmt(split: str, data_dir: str | None) -> list[Row]:
    if split not in MLQE_SPLITS:
        raise DataError(f"wmt has splits {list(MLQE_SPLITS)}, not {split!r}")
    rows = read_mlqe(find_mlqe(data_dir) / MLQE_SPLITS[split])
    for r in rows:
        r.meta["split"] = split
    return rows


# MLQE-PE (Fomicheva et al. 2020), tag v2.0.0: human post-edits of the MLQE MT that keep the case; line i of
# SPLIT.pe edits row i of the MLQE split. They serve as chrF references (evaluate.py), never for training.
PE_COMMIT = "db898c02326547a6d046fa7ab370b7d87df4ea45"
PE_TARBALLS = {"train": "train/en-de-train.tar.gz", "dev": "dev/en-de-dev.tar.gz", "test20": "test/en-de-test.tar.gz"}
PE_URL = "https://github.com/sheffieldnlp/mlqe-pe/raw/{commit}/data/post-editing/{tarball}"


def download_post_edits(dest: Path, split: str) -> None:
    url = PE_URL.format(commit=PE_COMMIT, tarball=PE_TARBALLS[split])
    print(f"[data] downloading {url}")
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            data = r.read()
        dest.mkdir(parents=True, exist_ok=True)
        (dest / "pe.tar.gz.tmp").write_bytes(data)
        with tarfile.open(dest / "pe.tar.gz.tmp") as tf:
            for ext in ("pe", "src"):
                member = next(m for m in tf.getmembers() if m.name.endswith(f"/{split}.{ext}"))
                (dest / f"{split}.{ext}.tmp").write_bytes(tf.extractfile(member).read())
                os.replace(dest / f"{split}.{ext}.tmp", dest / f"{split}.{ext}")  # never half-written
        (dest / "pe.tar.gz.tmp").unlink()
    except (OSError, tarfile.TarError, StopIteration) as e:
        raise DataError(f"no MLQE-PE post-edits on this machine, and {url} could not be fetched ({e}). Put "
                        "wmt20-mlqe-en-de-pe/v2/ (from github.com/sheffieldnlp/mlqe-pe) next to the MLQE folder.") from e


def wmt_references(rows: list[Row], data_dir: str | None) -> list[str]:
    """The v2 post-edit of each row's MT. The .src line must be the row's source up to whitespace (the files
    are Moses-tokenized), or the files are not aligned with MLQE."""
    split = rows[0].meta["split"]
    files = [f"{split}.pe", f"{split}.src"]
    folder = find_data(data_dir, "wmt20-mlqe-en-de-pe/v2", files, lambda d: download_post_edits(d, split),
                       "MLQE-PE post-edit")
    pe, src = ((folder / f).read_text(encoding="utf-8").splitlines() for f in files)
    squash = lambda text: "".join(text.split())  # noqa: E731
    bad = [r.meta["index"] for r in rows
           if r.meta["index"] >= len(src) or squash(src[r.meta["index"]]) != squash(r.meta["source"])]
    if bad or len(pe) != len(src):
        raise DataError(f"{folder}: {split}.pe/.src are not aligned with MLQE {split} (rows {bad[:5]}, "
                        f"{len(pe)} vs {len(src)} lines)")
    return [pe[r.meta["index"]] for r in rows]


def wmt_sft_rows(rows: list[Row], quantile: float) -> list[Row]:
    """SFT targets: the MT outputs humans scored in the top (1 − quantile) share."""
    cut = sorted(r.score for r in rows)[int(quantile * (len(rows) - 1))]
    return [r for r in rows if r.score >= cut]


# ----------------------------------------------------------------------------------------------------
# chat: Anthropic HH-RLHF (Bai et al. 2022), pairs of "\n\nHuman: …\n\nAssistant: …" transcripts that
# share a dialogue and end in a preferred (chosen) and a dispreferred (rejected) assistant answer

HH_COMMIT = "354e5c3cb8960630860dd5774a6ac2a58313bf4d"
HH_FILES = [f"{subset}/test.jsonl.gz" for subset in
            ("harmless-base", "helpful-base", "helpful-online", "helpful-rejection-sampled")]
HH_URLS = {f: f"https://github.com/anthropics/hh-rlhf/raw/{HH_COMMIT}/{f}" for f in HH_FILES}
HH_NOTE = ("chat train/dev/test: an 80/10/10 split, by each conversation's first human turn, of the four "
           "official HH-RLHF TEST files (8552 pairs); no official train data is used")
HH_TURN = re.compile(r"\n\n(Human|Assistant):")
HH_ROLES = {"Human": "user", "Assistant": "assistant"}


def hh_messages(transcript: str) -> list[dict] | None:
    """The chat messages of a transcript; None if text comes before the first turn. Empty turns are dropped
    and adjacent turns of one role merged (some transcripts hold two Assistant turns in a row, or an empty
    one), so roles alternate and the last message is all the assistant said after the last human turn."""
    parts = HH_TURN.split(transcript)
    if parts[0].strip():
        return None
    messages = []
    for name, text in zip(parts[1::2], parts[2::2]):
        role, text = HH_ROLES[name], text.strip()
        if not text:
            continue
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"] += "\n\n" + text
        else:
            messages.append({"role": role, "content": text})
    return messages


def hh_text(messages: list[dict]) -> str:
    """The dialogue as readable text, for judges and samples."""
    return "\n\n".join(f"{'Human' if m['role'] == 'user' else 'Assistant'}: {m['content']}" for m in messages)


def hh_row(rec, where: str) -> Row:
    """prompt = the dialogue before the final assistant answer, shared by both transcripts; response and
    rejected = the two final answers. A pair whose dialogues differ before the final answer is dropped and
    counted, not split at the longest common prefix: that prefix can end inside a turn, and the "answers"
    after it would hold human turns. (Once adjacent assistant turns are merged, none of the 8552 official
    test pairs differ there; the 17 that differ in the raw text all hold two assistant turns in a row.)"""
    need(isinstance(rec, dict) and isinstance(rec.get("chosen"), str) and isinstance(rec.get("rejected"), str),
         "no chosen/rejected transcript")
    a, b = hh_messages(rec["chosen"]), hh_messages(rec["rejected"])
    need(a and b and a[-1]["role"] == "assistant" == b[-1]["role"], "no final assistant answer")
    need(len(a) > 1, "no human turn before the final answer")
    need(a[:-1] == b[:-1], "dialogues differ before the final answer")
    need(a[-1] != b[-1], "same final answer")  # chosen == rejected among them: no preference to learn
    # group: rows of one conversation (later turns, re-sampled answers) share its first human turn
    return Row(hh_text(a[:-1]), a[:-1], a[-1]["content"], rejected=b[-1]["content"],
               meta={"source": where, "group": a[0]["content"]})


def load_chat(split: str, data_dir: str | None) -> list[Row]:
    """HH-RLHF pairs of `split`. Offline only the official test files exist, so train/dev/test are an
    80/10/10 split of those (HH_NOTE); the download fetches the same four files, so the split is the same
    wherever the data came from."""
    folder = find_data(data_dir, "hh-rlhf", HH_FILES,
                       lambda dest: download_files(dest, HH_URLS, "HH-RLHF", "github.com/anthropics/hh-rlhf"),
                       "HH-RLHF test")
    dropped, rows = defaultdict(list), []
    for f in HH_FILES:
        rows += read_jsonl(folder / f, f, hh_row, dropped)
    report_dropped(f"chat (HH-RLHF, {folder})", len(rows), dropped)
    return rows_of_split(rows, split, "chat")


# ----------------------------------------------------------------------------------------------------
# summarize: OpenAI "Learning to summarize from human feedback" (Stiennon et al. 2020), TL;DR comparisons:
# a Reddit post, two summaries and the index of the one a labeller preferred

TLDR_FILES = ["batch13.json", "batch18.json"]
TLDR_URLS = {f: f"https://openaipublic.blob.core.windows.net/summarize-from-feedback/dataset/comparisons/{f}"
             for f in TLDR_FILES}
TLDR_NOTE = ("summarize train/dev/test: an 80/10/10 split, by post id, of comparison batches 13 and 18 "
             "(1771 comparisons), all from the paper's VALIDATION splits (valid1/valid2); no official train "
             "comparisons are used")


def tldr_question(info: dict) -> str:
    """The request: an instruction, then the post laid out as the paper's policies saw it (SUBREDDIT, TITLE,
    POST); a news row (CNN/DM) carries an article instead of a post."""
    if info.get("post"):
        return ("Write a TL;DR of this Reddit post: a summary in a sentence or two.\n\n"
                f"SUBREDDIT: r/{info.get('subreddit', '')}\nTITLE: {info.get('title', '')}\nPOST: {info['post'].strip()}")
    head = "".join(f"{k.upper()}: {info[k]}\n" for k in ("site", "title") if info.get(k))
    return f"Write a TL;DR of this news article: a summary in a sentence or two.\n\n{head}ARTICLE: {info['article'].strip()}"


def tldr_row(rec, where: str) -> Row:
    """One comparison; summary texts are stripped (they begin with the space that followed "TL;DR:")."""
    info = rec.get("info") if isinstance(rec, dict) else None
    need(isinstance(info, dict), "no info")
    body = info.get("post") or info.get("article")
    need(isinstance(body, str) and body.strip(), "no post or article")
    need(isinstance(info.get("id"), str) and info["id"], "no post id")
    summaries, choice = rec.get("summaries"), rec.get("choice")
    need(isinstance(summaries, list) and len(summaries) == 2, "not exactly two summaries")
    need(type(choice) is int and choice in (0, 1), "choice not 0 or 1")
    texts = [s["text"].strip() if isinstance(s, dict) and isinstance(s.get("text"), str) else "" for s in summaries]
    need(all(texts), "empty summary")
    need(texts[0] != texts[1], "same summary twice")
    q = tldr_question(info)
    return Row(q, [{"role": "user", "content": q}], texts[choice], rejected=texts[1 - choice],
               meta={"source": where, "group": info["id"], "upstream_split": rec.get("split")})


def load_summarize(split: str, data_dir: str | None) -> list[Row]:
    """TL;DR comparisons of `split`: an 80/10/10 split by post id (all comparisons of a post on one side) of
    the two batches available offline (TLDR_NOTE); the download fetches the same two batches."""
    folder = find_data(data_dir, "summarize-from-feedback/comparisons", TLDR_FILES,
                       lambda dest: download_files(dest, TLDR_URLS, "summarize-from-feedback",
                                                   "github.com/openai/summarize-from-feedback, dataset/comparisons"),
                       "summarize-from-feedback comparison")
    dropped, rows = defaultdict(list), []
    for f in TLDR_FILES:
        rows += read_jsonl(folder / f, f, tldr_row, dropped)
    report_dropped(f"summarize (TL;DR comparisons, {folder})", len(rows), dropped)
    return rows_of_split(rows, split, "summarize")


# ----------------------------------------------------------------------------------------------------
# The table

@dataclass
class Task:
    name: str
    load: object            # (split, data_dir) -> list[Row]
    splits: dict            # role -> split name: train, dev (selection), test (report)
    reward: str             # "mse" (human scalar scores) or "bt" (preference pairs)
    sft_rows: object        # (train rows, preset) -> rows whose `response` is an SFT target
    presets: dict           # "cpu" / "gpu" -> settings that override zopro.Config and train.py defaults
    note: str = ""          # where the splits come from, when they are not the dataset's official ones
    checks: object = None   # (row, response text) -> {name: value}: sanity checks that expose reward hacking
    references: object = None  # (rows, data_dir) -> one reference text per row, for chrF


COMMON_CPU = dict(  # sized so that `python train.py --task wmt` ends in about 30 minutes on 2 cores
    sft_examples=256, sft_epochs=1, rm_examples=512, rm_dev_examples=128, max_prompt_len=64,
    iterations=3, steps_per_iteration=12, prompts_per_step=8, k=2, micro_batch=16, max_new_tokens=48,
    refine_prompts=32, dev_prompts=32, test_prompts=128, save_every=4,
)
COMMON_GPU = dict(  # close to the paper's settings (PAPER.md §3.1), for one GPU
    lora_r=64, lora_alpha=128, fo_lr=5e-5, rm0_epochs=3, rm_epochs=3, rm_batch=32,
    sft_examples=0, sft_epochs=3, rm_examples=0, rm_dev_examples=0, max_prompt_len=971,
    iterations=10, steps_per_iteration=100, prompts_per_step=32, k=2, micro_batch=32, max_new_tokens=53,
    refine_prompts=512, dev_prompts=256, test_prompts=0, save_every=10,
)

TASKS = {
    "wmt": Task(
        name="wmt", load=load_wmt, splits={"train": "train", "dev": "dev", "test": "test20"}, reward="mse",
        sft_rows=lambda rows, preset: wmt_sft_rows(rows, preset["sft_quantile"]),
        presets={"cpu": dict(COMMON_CPU, sft_quantile=0.7), "gpu": dict(COMMON_GPU, sft_quantile=0.7)},
        checks=metrics.wmt_checks, references=wmt_references,
    ),
    # The preference tasks' prompts are 3-6x longer than wmt's (SmolLM2 template included, median: chat 139
    # tokens over 1-19 turns, summarize 383), and a forward pass costs about B·(P_max + T) tokens at ~600
    # tokens/s on 2 cores; a Bradley–Terry pair is two sequences. So their CPU presets keep every stage but
    # cut the counts to about a third of COMMON_CPU's: 4 prompts a step (8 rollouts), 8 dev and 32 test
    # prompts. A cost model calibrated on a wmt CPU run (its SFT stage and first policy step) puts both at
    # 27-29 min: chat ~27 s a step, summarize ~40 s. max_new_tokens stays 48: it also bounds the answers of
    # the SFT/RM pairs (runs.fit_rows), and 97% of TL;DR pairs fit it.
    "chat": Task(
        name="chat", load=load_chat, splits={"train": "train", "dev": "dev", "test": "test"}, reward="bt",
        sft_rows=chosen_rows, note=HH_NOTE, checks=metrics.text_checks,
        presets={
            # 256 prompt tokens keep 76% of the dialogues (192 would keep 64%, mostly dropping multi-turn
            # ones); with both answers <= 48 tokens 27% of the pairs remain (1865 train), plenty for 192.
            "cpu": dict(COMMON_CPU, max_prompt_len=256, max_new_tokens=48, sft_examples=128, rm_examples=192,
                        rm_dev_examples=48, iterations=3, steps_per_iteration=8, prompts_per_step=4,
                        refine_prompts=16, dev_prompts=8, test_prompts=32),
            # micro_batch 8: a backward over 32 sequences of ~1000 tokens would need ~80 GB of activations
            "gpu": dict(COMMON_GPU, micro_batch=8),
        },
    ),
    "summarize": Task(
        name="summarize", load=load_summarize, splits={"train": "train", "dev": "dev", "test": "test"}, reward="bt",
        sft_rows=chosen_rows, note=TLDR_NOTE, checks=metrics.text_checks,
        presets={
            # Posts are long: 256 prompt tokens would keep 7% of them, 384 keeps half (train 701, dev 75,
            # test 80 comparisons); each sequence then costs ~2x a chat one, hence fewer steps and RM pairs.
            # micro_batch 8: a Bradley–Terry batch of 8 pairs (16 sequences of up to 432 tokens) in one backward
            # peaked at 18 GB resident and was killed on a 24 GB machine shared with another run; 4 pairs a slice.
            "cpu": dict(COMMON_CPU, max_prompt_len=384, max_new_tokens=48, sft_examples=64, rm_examples=64,
                        rm_dev_examples=32, micro_batch=8, iterations=3, steps_per_iteration=6, prompts_per_step=4,
                        refine_prompts=8, dev_prompts=8, test_prompts=32),
            # every post fits 971 tokens; ~1400 train comparisons: 44 steps of 32 prompts is one pass an
            # iteration (the paper's iterations are passes over the train set), not 2+ passes
            "gpu": dict(COMMON_GPU, steps_per_iteration=44, micro_batch=8),  # micro_batch: as chat's
        },
    ),
}
