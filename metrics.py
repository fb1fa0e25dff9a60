"""Pure metric functions for evaluate.py: uncertainty, win rate, chrF, and task sanity checks that expose
reward hacking (copying the source, answering in the wrong language, repeating itself).

Plain Python on lists of numbers and strings. sacrebleu (for chrF) is optional and imported only when
chrF is asked for; nothing here touches a model.
"""
import math
import random
import re


def mean_stderr(xs: list[float]) -> tuple[float, float]:
    n = len(xs)
    m = sum(xs) / n
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1)) if n > 1 else float("nan")
    return m, sd / math.sqrt(n)


CHRF_PIP = "sacrebleu==2.6.0"


class MissingDependency(RuntimeError):
    pass


def require(module: str, pip_spec: str):
    """Imports an optional dependency, or raises MissingDependency saying how to install it."""
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingDependency(f"{module} is not installed (pip install {pip_spec})") from e


# ----------------------------------------------------------------------------------------------------
# Uncertainty and paired comparison

def bootstrap_ci(values: list[float], n_resamples: int = 1000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values`: resample with replacement `n_resamples`
    times (seeded), take the (1−level)/2 and (1+level)/2 quantiles of the resampled means."""
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(rng.choices(values, k=n)) / n for _ in range(n_resamples))
    lo = int((1 - level) / 2 * (n_resamples - 1) + 0.5)
    return means[lo], means[n_resamples - 1 - lo]


def win_outcomes(a_better: list[bool], tie: list[bool]) -> list[float]:
    """Per item: 1 if a won, 0 if b won, ½ on a tie (equal scores, or identical outputs, which no judge
    can tell apart however its scores jitter)."""
    return [0.5 if t else float(w) for w, t in zip(a_better, tie)]


def win_rate(outcomes: list[float], seed: int = 0) -> dict:
    """Mean of win_outcomes (the share of wins, ties counting ½) with its stderr, a 95% percentile-bootstrap
    interval, the counts and n."""
    m, se = mean_stderr(outcomes)
    return {"rate": m, "stderr": se, "ci95": list(bootstrap_ci(outcomes, seed=seed)), "wins": outcomes.count(1.0),
            "ties": outcomes.count(0.5), "losses": outcomes.count(0.0), "n": len(outcomes)}


# ----------------------------------------------------------------------------------------------------
# chrF (Popović 2015) via sacrebleu

def chrf(hypotheses: list[str], references: list[str], n_bootstrap: int = 1000) -> dict:
    """Corpus chrF (sacrebleu's defaults: character 6-grams, β = 2, whitespace ignored, case kept) of the
    hypotheses against one reference each, 0–100, with sacrebleu's 95% bootstrap interval over sentences
    (seed $SACREBLEU_SEED, default 12345), n and the signature. Raises MissingDependency without sacrebleu."""
    sacrebleu = require("sacrebleu", CHRF_PIP)
    metric = sacrebleu.metrics.CHRF()
    score = metric.corpus_score(hypotheses, [references], n_bootstrap=n_bootstrap)
    out = {"score": score.score, "n": len(hypotheses), "signature": str(metric.get_signature())}
    if n_bootstrap > 1:  # sacrebleu 2.6 keeps the bootstrap mean and half-width in these two fields only
        out["ci95"] = [float(score._mean - score._ci), float(score._mean + score._ci)]
    return out


# ----------------------------------------------------------------------------------------------------
# Task sanity checks: one function per task, (row, output) -> {check: value}

COPY_THRESHOLD = 0.5

# Frequent function words that belong to one language only (words of both, e.g. in/an/was/will/also/
# so/man/war/am, are left out), so a count says which language a sentence is in.
GERMAN_WORDS = frozenset("""der die das den dem des ein eine einen einem einer eines und ist sind nicht kein keine
zu zum zur mit sich auf für von vom im sie es er ich wir ihr ihm ihn ihnen uns mir dir wird werden wurde
wurden auch als bei nach aus oder aber wie nur noch über durch hat haben kann dass daß wenn um bis diese dieser
dieses diesem unter zwischen gegen ohne sehr schon hier dort jedoch dann denn weil sowie sein seine seiner
seinen seinem ihre ihrer ihren welche welcher vor seit während wieder""".split())
ENGLISH_WORDS = frozenset("""the a and of to is are were be been being has have had that this these those with
for on by from it its they them their he she his her which who whom what when where would can could should not
or but as at there into about than then more most other some such only over after before while during between
against without very both each many""".split())


def words(text: str) -> list[str]:
    """Runs of letters (no digits or punctuation), case kept."""
    return re.findall(r"[^\W\d_]+", text)


def source_coverage(source: str, output: str) -> float:
    """Share of the source's common words that reappear in the output (case-insensitive). Common words
    are the lower-case ones of ≥ 3 letters: names, capitalised in English, survive a real translation,
    and short words (in, an, so) are German too. 0 when the source has no such word (cannot tell)."""
    common = [w for w in words(source) if w[0].islower() and len(w) >= 3]
    seen = {w.lower() for w in words(output)}
    return sum(w.lower() in seen for w in common) / len(common) if common else 0.0


def copies_source(source: str, output: str) -> bool:
    """The output copies or mostly copies the source: source_coverage ≥ COPY_THRESHOLD (0.5). On WMT20
    test20 the human MT itself is flagged 2.3% of the time (titles and names left in English)."""
    return source_coverage(source, output) >= COPY_THRESHOLD


def not_german(text: str) -> bool:
    """More English-only than German-only function words. A text with neither (empty, a bare name) is
    not flagged: the heuristic cannot tell, and empty outputs are counted apart."""
    w = [x.lower() for x in words(text)]
    return sum(x in ENGLISH_WORDS for x in w) > sum(x in GERMAN_WORDS for x in w)


def repetition(text: str, n: int = 4) -> float:
    """Share of the text's word n-grams that repeat an earlier one: 1 − distinct/total (0 if fewer
    than n words). A degenerate loop ("the the the ...") tends to 1."""
    w = text.lower().split()
    grams = [tuple(w[i:i + n]) for i in range(len(w) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def wmt_checks(row, output: str) -> dict:
    """row.meta["source"]: the English sentence (tasks.read_mlqe)."""
    return {"copies_source": float(copies_source(row.meta["source"], output)), "not_german": float(not_german(output))}


def text_checks(row, output: str) -> dict:
    return {"repetition": repetition(output)}

