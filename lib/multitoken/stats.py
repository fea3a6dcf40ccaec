"""Bootstrap confidence intervals and the verdicts drawn from them.

Every interval here is a percentile bootstrap over the *units that vary* (problems for accuracy, BLEU and
perplexity; prompts for decoding speed), resampled with replacement. Paired comparisons resample the same units
for both sides, so what is shared (an easy problem, a long prompt) cancels. A verdict is drawn from an interval,
never from two point estimates: "no detectable difference" when the interval covers the null value.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

N_BOOT = 2000


@dataclass(frozen=True)
class CI:
    """A point estimate with its (1 - alpha) bootstrap interval."""

    value: float
    lo: float
    hi: float

    def covers(self, x: float) -> bool:
        return self.lo <= x <= self.hi

    def fmt(self, digits: int = 3) -> str:
        return f"{self.value:.{digits}f} [{self.lo:.{digits}f}, {self.hi:.{digits}f}]"

    def as_dict(self) -> dict:
        return asdict(self)


def ci(d: dict) -> CI:
    """A stored interval (``{value, lo, hi}``, as in quality.json) as a CI."""
    return CI(d["value"], d["lo"], d["hi"])


def bootstrap(stat, *columns, n_boot: int = N_BOOT, alpha: float = 0.05, seed: int = 0) -> CI:
    """``stat(*columns)`` with a percentile interval; the columns are paired (resampled by the same indices)."""
    cols = [np.asarray(c, dtype=float) for c in columns]
    n = len(cols[0])
    if n == 0:
        raise ValueError("bootstrap needs at least one unit")
    if any(len(c) != n for c in cols):
        raise ValueError(f"paired columns differ in length: {[len(c) for c in cols]}")
    idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    draws = np.array([stat(*(c[i] for c in cols)) for i in idx])
    lo, hi = np.quantile(draws, [alpha / 2, 1 - alpha / 2])
    return CI(float(stat(*cols)), float(lo), float(hi))


def mean_ci(x, **kw) -> CI:
    """Mean (e.g. accuracy over problems: x is 0/1 per problem)."""
    return bootstrap(np.mean, x, **kw)


def perplexity_ci(nll, ntok, **kw) -> CI:
    """Token-weighted perplexity exp(sum nll / sum tokens), resampling examples."""
    return bootstrap(perplexity_of, nll, ntok, **kw)


def speedup_ci(tokens, seconds, base_tokens, base_seconds, **kw) -> CI:
    """(tokens/s of a method) / (tokens/s of its baseline), resampling prompts (paired)."""
    return bootstrap(lambda n, t, m, b: (n.sum() / t.sum()) / (m.sum() / b.sum()),
                     tokens, seconds, base_tokens, base_seconds, **kw)


def bleu_stats(predictions, references) -> np.ndarray:
    """sacrebleu's sufficient statistics per sentence, (N, 2 + 2 * 4): corpus BLEU of any subset is the BLEU of the
    summed rows, so a bootstrap needs no re-tokenisation."""
    from sacrebleu.metrics import BLEU

    return np.asarray(BLEU()._extract_corpus_statistics(list(predictions), [list(references)]), dtype=float)


def corpus_bleu_from_stats(stats) -> float:
    from sacrebleu.metrics import BLEU

    return BLEU()._compute_score_from_stats(np.asarray(stats).sum(0).astype(int).tolist()).score


def bleu_of_columns(*columns) -> float:
    """Corpus BLEU from the columns of :func:`bleu_stats` (the form :func:`bootstrap` resamples)."""
    return corpus_bleu_from_stats(np.stack(columns, 1))


def bleu_ci(predictions, references, **kw) -> CI:
    return bootstrap(bleu_of_columns, *bleu_stats(predictions, references).T, **kw)


def perplexity_of(nll, ntok) -> float:
    return float(np.exp(np.sum(nll) / np.sum(ntok)))


def paired_difference(stat, a_columns, b_columns, **kw) -> CI:
    """stat(a) - stat(b) over the same units (e.g. MTP - NTP accuracy on the same problems)."""
    k = len(a_columns)
    return bootstrap(lambda *c: stat(*c[:k]) - stat(*c[k:]), *a_columns, *b_columns, **kw)


def speed_verdict(ci: CI, claimed: float) -> str:
    """A measured speedup's interval against a claimed one. An interval that holds 1x supports no speedup, whatever
    else it holds: 'no detectable speedup' (naming the claim when the interval holds it too); otherwise 'consistent
    with', 'faster than' or 'faster, but below' the claim, or 'slower'."""
    if ci.covers(1.0):
        also = f" (the interval holds {claimed}x too)" if ci.covers(claimed) and claimed != 1 else ""
        return "no detectable speedup" + also
    if ci.hi < 1.0:
        return "slower"
    if ci.covers(claimed):
        return f"consistent with the claimed {claimed}x"
    return f"faster than the claimed {claimed}x" if ci.lo > claimed else f"faster, but below the claimed {claimed}x"


def verdict(ci: CI, null: float = 0.0, higher: str = "higher", lower: str = "lower") -> str:
    """'higher' / 'lower' when the interval excludes ``null``, else 'no detectable difference'."""
    if ci.lo > null:
        return higher
    if ci.hi < null:
        return lower
    return "no detectable difference"
