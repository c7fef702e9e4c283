"""Intervals for the report: a paired bootstrap for the change of a rate between two
evaluations over the same prompts, and a Wilson interval for one rate.

A difference of two rounds is paired: both rounds answer the same held-out prompts, so most
prompts keep their outcome and only the prompts that flip carry the change. The standard error of
one proportion ignores that pairing (and overstates the noise of a difference when most prompts
agree, understates it when flips cancel out).

    pairs = pair_answers(base_rows, round_rows)
    change = paired_bootstrap([a["correct"] for a, _ in pairs], [b["correct"] for _, b in pairs])
    change.difference, change.low, change.high, change.gained, change.lost
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

RESAMPLES = 10_000
SEED = 0


@dataclass(frozen=True)
class PairedChange:
    """b - a over the `n` prompts where both outcomes apply, with its percentile interval.

    gained: prompts with a = 0, b = 1; lost: a = 1, b = 0 (for VR a "gained" prompt is a new
    violation). difference == (gained - lost) / n exactly.
    """

    difference: float
    low: float
    high: float
    n: int
    gained: int
    lost: int
    level: float
    resamples: int
    seed: int


def paired_bootstrap(a: list, b: list, resamples: int = RESAMPLES, seed: int = SEED,
                     level: float = 0.95) -> PairedChange | None:
    """The change of a 0/1 rate from outcomes `a` to outcomes `b` of the same prompts.

    a, b: aligned lists (position i is the same prompt) of 0/1 or bools, None where the outcome
    does not apply (no extractable answer, an unparseable verdict); a pair with a None on either
    side is dropped. Returns None when no pair is left.

    The bootstrap resamples the n prompts with replacement `resamples` times (seeded: the same
    inputs give the same interval) and takes the (1 - level)/2 and (1 + level)/2 quantiles of the
    resampled differences. The difference of a resample depends only on how many gained and lost
    prompts it drew, so the draws are made as multinomial counts of (gained, lost, unchanged)
    instead of (resamples, n) indices: the same distribution, in O(resamples) memory.
    """
    if len(a) != len(b):
        raise ValueError(f"paired outcomes must align: {len(a)} vs {len(b)}")
    pairs = [(int(x), int(y)) for x, y in zip(a, b) if x is not None and y is not None]
    n = len(pairs)
    if n == 0:
        return None
    gained = sum(1 for x, y in pairs if (x, y) == (0, 1))
    lost = sum(1 for x, y in pairs if (x, y) == (1, 0))
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(n, [gained / n, lost / n, (n - gained - lost) / n], size=resamples)  # (B, 3)
    diffs = (counts[:, 0] - counts[:, 1]) / n  # (B,)
    low, high = np.quantile(diffs, [(1 - level) / 2, (1 + level) / 2])
    return PairedChange(difference=(gained - lost) / n, low=float(low), high=float(high), n=n,
                        gained=gained, lost=lost, level=level, resamples=resamples, seed=seed)


@dataclass(frozen=True)
class MeanChange:
    """mean(b) - mean(a) of a continuous paired measure (a held-out loss per record) over the n
    records, with its percentile interval."""

    difference: float
    low: float
    high: float
    n: int
    level: float
    resamples: int
    seed: int


def paired_mean_bootstrap(a: list[float], b: list[float], resamples: int = RESAMPLES, seed: int = SEED,
                          level: float = 0.95) -> MeanChange:
    """The change of a per-record measure from `a` to `b` over the same records (position i is
    the same record in both): the mean of the n differences b_i - a_i and the (1 - level)/2,
    (1 + level)/2 quantiles of that mean over `resamples` bootstrap resamples of the records
    (seeded). For 0/1 outcomes use paired_bootstrap, which also counts gained and lost prompts."""
    if len(a) != len(b):
        raise ValueError(f"paired measures must align: {len(a)} vs {len(b)}")
    if not a:
        raise ValueError("no records to compare")
    diffs = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)  # (n,)
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for start in range(0, resamples, 1000):  # (1000, n) indices at a time
        stop = min(start + 1000, resamples)
        means[start:stop] = diffs[rng.integers(0, len(diffs), size=(stop - start, len(diffs)))].mean(axis=1)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return MeanChange(difference=float(diffs.mean()), low=float(low), high=float(high), n=len(diffs),
                      level=level, resamples=resamples, seed=seed)


def wilson_interval(successes: int, n: int, level: float = 0.95) -> tuple[float, float] | None:
    """Wilson score interval of one rate successes / n (None when n == 0).

    Unlike the normal interval p +- z * sqrt(p(1-p)/n) it stays inside [0, 1] and does not
    collapse to a point at 0 or 1 (0 refusals of 65 prompts: [0, 0.056], not [0, 0]).
    Wilson (1927), "Probable inference, the law of succession, and statistical inference".
    """
    if n == 0:
        return None
    from statistics import NormalDist

    z = NormalDist().inv_cdf((1 + level) / 2)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def pair_answers(a: list[dict], b: list[dict], names: tuple[str, str] = ("a", "b")
                 ) -> list[tuple[dict, dict]]:
    """Rows of two evaluations' answers.jsonl that answer the same prompt, keyed by
    (kind, prompt_id) (never by row position), in the order of `a`. Prompts only one side
    answered are left out. A key twice in one evaluation is an error: the pairing would be a guess.
    """
    index = [_index(rows, name) for rows, name in zip((a, b), names)]
    return [(row, index[1][key]) for key, row in index[0].items() if key in index[1]]


def _index(rows: list[dict], name: str) -> dict[tuple, dict]:
    out: dict[tuple, dict] = {}
    for line, row in enumerate(rows, 1):
        key = (row.get("kind"), row.get("prompt_id"))
        if key in out:
            raise ValueError(f"{name}: answer {line} repeats kind {key[0]!r}, prompt_id {key[1]!r}; "
                             f"each prompt is answered once per evaluation")
        out[key] = row
    return out
