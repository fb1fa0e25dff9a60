"""The task table: datasets, prompt formats and presets. zopro.py knows nothing of tasks.

Every loader returns rows of one shape (`Row`), so train.py and evaluate.py have no task-specific branch
beyond the table: a task is a loader per split, a reward-model kind ("mse" on human scores or "bt" on
preference pairs), a rule for the SFT targets, and CPU/GPU presets.
"""
import csv
import os
import tarfile
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from models import cache_dir


class DataError(RuntimeError):
    pass


@dataclass
class Row:
    question: str                   # the request as plain text (shown to judges and in samples)
    messages: list[dict]            # the chat messages before the answer: the prompt
    response: str = ""              # a human-scored answer (wmt: the MT) or the preferred one (pairs)
    score: float | None = None      # human score of `response` (wmt: DA z_mean)
    rejected: str | None = None     # the dispreferred answer of a preference pair
    meta: dict = field(default_factory=dict)


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
    """The folder holding the MLQE TSVs: --data-dir / $ZOPRO_DATA_DIR (the folder itself or its parent),
    else the download cache, downloading the public release there if needed."""
    base = data_dir or os.environ.get("ZOPRO_DATA_DIR")
    if base:
        for cand in (Path(base), Path(base) / "wmt20-mlqe-en-de"):
            if (cand / MLQE_SPLITS["train"]).exists():
                return cand
        raise DataError(f"no MLQE en-de files ({MLQE_SPLITS['train']}, ...) in {base} or {base}/wmt20-mlqe-en-de")
    cache = cache_dir() / "data" / "wmt20-mlqe-en-de"
    if not (cache / MLQE_SPLITS["test20"]).exists():
        download_mlqe(cache)
    return cache


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
