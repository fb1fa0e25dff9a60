"""The task table: datasets, prompt formats and presets. zopro.py knows nothing of tasks.

Every loader returns rows of one shape (`Row`), so train.py and evaluate.py have no task-specific branch
beyond the table: a task is a loader per split, a reward-model kind ("mse" on human scores or "bt" on
preference pairs), a rule for the SFT targets, and CPU/GPU presets.
"""
import csv
import gzip
import hashlib
import json
import os
import tarfile
import urllib.request
import warnings
from dataclasses import dataclass, field
from pathlib import Path

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
        raise DataError(f"no {what} files ({', '.join(files)}) in {' or '.join(map(str, candidates))}")
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
    return read_mlqe(find_mlqe(data_dir) / MLQE_SPLITS[split])


def wmt_sft_rows(rows: list[Row], quantile: float) -> list[Row]:
    """SFT targets: the MT outputs humans scored in the top (1 − quantile) share."""
    cut = sorted(r.score for r in rows)[int(quantile * (len(rows) - 1))]
    return [r for r in rows if r.score >= cut]


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


COMMON_CPU = dict(  # sized so that `python train.py --task wmt` ends in about 30 minutes on 2 cores
    sft_examples=256, sft_epochs=1, rm_examples=512, rm_dev_examples=128, max_prompt_len=64,
    iterations=3, steps_per_iteration=12, prompts_per_step=8, k=2, micro_batch=16, max_new_tokens=48,
    refine_prompts=32, dev_prompts=32, test_prompts=128, save_every=4,
)
COMMON_GPU = dict(  # close to the paper's settings (PAPER.md §3.1), for one GPU
    sft_examples=0, sft_epochs=3, rm_examples=0, rm_dev_examples=0, max_prompt_len=971,
    iterations=10, steps_per_iteration=100, prompts_per_step=32, k=2, micro_batch=32, max_new_tokens=53,
    refine_prompts=512, dev_prompts=256, test_prompts=0, save_every=10,
)

TASKS = {
    "wmt": Task(
        name="wmt", load=load_wmt, splits={"train": "train", "dev": "dev", "test": "test20"}, reward="mse",
        sft_rows=lambda rows, preset: wmt_sft_rows(rows, preset["sft_quantile"]),
        presets={"cpu": dict(COMMON_CPU, sft_quantile=0.7), "gpu": dict(COMMON_GPU, sft_quantile=0.7)},
    ),
}
