"""MLQE en-de parsing on the real files, and clear errors on bad ones."""
import csv

import pytest

import tasks
from conftest import DATA

MLQE = DATA / "wmt20-mlqe-en-de"


def split_lines(path):
    """An independent parse: plain tab splitting, no csv module."""
    lines = path.read_text(encoding="utf-8").split("\n")
    return [ln.split("\t") for ln in lines[1:] if ln]


@pytest.mark.parametrize("split,n", [("train", 7000), ("dev", 1000), ("test20", 1000)])
def test_mlqe_rows_match_an_independent_parse(split, n):
    rows = tasks.load_wmt(split, str(DATA))
    raw = split_lines(MLQE / tasks.MLQE_SPLITS[split])
    assert len(rows) == len(raw) == n
    for r, f in zip(rows, raw):
        assert len(f) == 8
        assert (r.meta["source"], r.response, r.score) == (f[1].strip(), f[2].strip(), float(f[6]))
        assert r.meta["source"] in r.question and r.messages == [{"role": "user", "content": r.question}]


def test_default_csv_quoting_would_have_broken_rows():
    # why quoting is off: the default csv dialect merges or splits the rows that contain quote characters
    with open(MLQE / "train.ende.df.short.tsv", encoding="utf-8", newline="") as f:
        default = list(csv.reader(f, delimiter="\t"))[1:]
    raw = split_lines(MLQE / "train.ende.df.short.tsv")
    broken = len(raw) - sum(a == b for a, b in zip(default, raw))
    assert broken >= 8
    assert all(len(r.response) > 0 for r in tasks.load_wmt("train", str(DATA)))


def test_sft_rows_are_the_top_scored_translations():
    rows = tasks.load_wmt("dev", str(DATA))
    top = tasks.wmt_sft_rows(rows, 0.7)
    cut = sorted(r.score for r in rows)[int(0.7 * 999)]
    assert len(top) == sum(r.score >= cut for r in rows) and min(r.score for r in top) >= cut


def write_tsv(path, body):
    path.write_text("\t".join(tasks.MLQE_COLUMNS) + "\n" + body, encoding="utf-8")


def test_malformed_mlqe_files_give_clear_errors(tmp_path):
    f = tmp_path / "x.tsv"
    write_tsv(f, "0\tHello\tHallo\t[1]\t1\t[1]\t0.5\t0\n1\tonly\tfour\tfields\n")
    with pytest.raises(tasks.DataError, match=r"x.tsv:3: expected 8"):
        tasks.read_mlqe(f)
    write_tsv(f, "0\tHello\tHallo\t[1]\t1\t[1]\tnan\t0\n")
    with pytest.raises(tasks.DataError, match="NaN"):
        tasks.read_mlqe(f)
    write_tsv(f, "0\tHello\t \t[1]\t1\t[1]\t0.5\t0\n")
    with pytest.raises(tasks.DataError, match="empty"):
        tasks.read_mlqe(f)
    f.write_text("a\tb\n")
    with pytest.raises(tasks.DataError, match="header"):
        tasks.read_mlqe(f)


def test_missing_data_folder_says_where_to_point(tmp_path):
    with pytest.raises(tasks.DataError, match="no MLQE en-de files"):
        tasks.load_wmt("train", str(tmp_path))
