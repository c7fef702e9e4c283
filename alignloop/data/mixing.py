"""Mixing data sources: resize each source by `weight` or `count`, then shuffle them together.

Everything is deterministic given the seed. Each source draws from its own `random.Random`,
seeded by (seed, position, name), so that changing one source does not change which records
another one contributes.
"""

from __future__ import annotations

import math
import random
from typing import Sequence, TypeVar

from alignloop.data.source_config import SourceConfig

T = TypeVar("T")


def take_size(n: int, weight: float | None = None, count: int | None = None) -> int:
    """How many records `take` returns from `n`: floor(weight * n), `count`, or n."""
    if weight is not None and count is not None:
        raise ValueError("set 'weight' or 'count', not both")
    if n == 0:
        return 0
    if weight is not None:
        if weight <= 0:
            raise ValueError(f"weight must be > 0, got {weight}")
        return math.floor(weight * n + 1e-9)  # 0.29 * 100 is 28.999999999999996 in floats
    if count is not None:
        if count <= 0:
            raise ValueError(f"count must be > 0, got {count}")
        return count
    return n


def take(records: Sequence[T], weight: float | None = None, count: int | None = None, *,
         rng: random.Random) -> list[T]:
    """Resizes `records` to `take_size(len(records), weight, count)` records.

    Every record is repeated `size // n` times, then `size % n` more are drawn without
    replacement with `rng` (kept in their original order). So weight 2.5 on 10 records gives
    each record twice plus 5 sampled ones; count 3 gives 3 sampled ones; an empty list stays empty.
    """
    n = len(records)
    size = take_size(n, weight, count)
    if size == 0:
        return []
    repeats, remainder = divmod(size, n)
    sampled = sorted(rng.sample(range(n), remainder))
    return list(records) * repeats + [records[i] for i in sampled]


def mix(groups: list[tuple[Sequence[T], SourceConfig]], seed: int) -> list[T]:
    """Resizes each (records, source) group by its source's weight / count, concatenates them
    and shuffles the result with `random.Random(seed)`."""
    out: list[T] = []
    for position, (records, source) in enumerate(groups):
        rng = random.Random(f"{seed}:{position}:{source.name}")
        out += take(records, source.weight, source.count, rng=rng)
    random.Random(seed).shuffle(out)
    return out
