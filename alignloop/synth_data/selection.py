"""Choosing which parsed pairs become training examples: rule filters, score filters, dedup.

Every function takes candidates and returns (kept, dropped), kept in input order, so that each
step can be tested on crafted pairs without a model. The stage runs them in this order:

    rule_filter -> (scoring) -> score_filter -> deduplicate -> keep_top

Dedup comes before `keep_top` so that the top share is a share of distinct examples (copies of
one good answer would otherwise fill it).
"""

from __future__ import annotations

import hashlib
import math
import re
from collections import Counter, defaultdict
from dataclasses import dataclass

from alignloop.synth_data.seeds import Seed


@dataclass
class Candidate:
    id: str               # <seed id>:<sample>:<pair>
    seed: Seed
    sample: int           # which sample of the seed
    question: str         # the generated question, or the seed prompt's last user turn
    answer: str
    prompt: list[dict]    # the messages before the answer in the written chat row
    scores: dict | None = None  # from score_responses: reward_model, verifiers, total

    @property
    def total(self) -> float:
        return self.scores["total"] if self.scores else 0.0


@dataclass
class Drop:
    candidate: Candidate
    reason: str
    duplicate_of: str | None = None  # the kept candidate's id (duplicates)
    similarity: float | None = None  # Jaccard similarity to it (near duplicates)


def answer_length(answer: str, unit: str) -> int:
    return len(answer.split()) if unit == "words" else len(answer)


def rule_filter(candidates: list[Candidate], min_length: int = 1, max_length: int | None = None,
                unit: str = "words") -> tuple[list[Candidate], list[Drop]]:
    """Drops answers shorter than `min_length` (`too_short`) or longer than `max_length`
    (`too_long`), counted in words (whitespace-separated) or characters."""
    kept, dropped = [], []
    for c in candidates:
        n = answer_length(c.answer, unit)
        reason = "too_short" if n < min_length else \
            "too_long" if max_length is not None and n > max_length else None
        if reason:
            dropped.append(Drop(c, reason))
        else:
            kept.append(c)
    return kept, dropped


def score_filter(candidates: list[Candidate], min_verifier_score: float | None = None,
                 min_score: float | None = None) -> tuple[list[Candidate], list[Drop]]:
    """Drops a candidate when a verifier scores it below `min_verifier_score`
    (`verifier:<name>`, the first such verifier) or its total is below `min_score` (`min_score`)."""
    kept, dropped = [], []
    for c in candidates:
        verifiers = (c.scores or {}).get("verifiers", {})
        failed = [name for name, value in verifiers.items()
                  if min_verifier_score is not None and value < min_verifier_score]
        reason = f"verifier:{failed[0]}" if failed else \
            "min_score" if min_score is not None and c.total < min_score else None
        if reason:
            dropped.append(Drop(c, reason))
        else:
            kept.append(c)
    return kept, dropped


def keep_top(candidates: list[Candidate], fraction: float | None) -> tuple[list[Candidate], list[Drop]]:
    """Keeps the ceil(fraction * n) highest totals (`top_fraction` drops the rest); ties go to
    the earlier candidate. Llama 3 keeps the reward model's top quartile (reference A6)."""
    if fraction is None:
        return list(candidates), []
    n_keep = math.ceil(fraction * len(candidates) - 1e-9)  # 0.3 * 10 is 3.0000000000000004
    order = sorted(range(len(candidates)), key=lambda i: (-candidates[i].total, i))
    chosen = set(order[:n_keep])
    return ([c for i, c in enumerate(candidates) if i in chosen],
            [Drop(c, "top_fraction") for i, c in enumerate(candidates) if i not in chosen])


# ---- dedup ------------------------------------------------------------------------------------

def normalise(text: str) -> str:
    """Case-folded, whitespace collapsed: the text exact duplicates are compared on."""
    return " ".join(text.casefold().split())


def shingles(text: str, size: int) -> set[tuple[str, ...]]:
    """The set of `size`-word windows of `text` (words: runs of letters/digits, case-folded);
    a text shorter than `size` words is one shingle of all its words."""
    words = re.findall(r"\w+", text.casefold())
    if len(words) <= size:
        return {tuple(words)} if words else set()
    return {tuple(words[i:i + size]) for i in range(len(words) - size + 1)}


def deduplicate(candidates: list[Candidate], threshold: float | None = 0.7,
                shingle_size: int = 2) -> tuple[list[Candidate], list[Drop]]:
    """Removes exact and near duplicates of question + answer, keeping the higher-scored one.

    Candidates are visited best total first (ties: earlier first), the greedy order of Llama 3's
    semantic dedup (reference A6): a candidate is kept unless it duplicates one already kept.
    Exact (`exact_duplicate`): the same normalised question and answer. Near (`near_duplicate`):
    the Jaccard similarity |A & B| / |A | B| of the two word-shingle sets reaches `threshold`.

    The similarity is computed exactly, not estimated as MinHash + LSH would (that pays off at
    millions of examples; at thousands, exact is cheap and has no false hits or misses). Only
    candidates that can reach the threshold are compared, by prefix filtering (Chaudhuri et al.
    2006; Bayardo et al. 2007): with shingles ordered rarest first, two sets with Jaccard >= t
    share a shingle among the first |A| - ceil(t |A|) + 1 of each, so only those prefixes are
    indexed and probed, and common shingles ("what is") never fill the index.
    """
    order = sorted(range(len(candidates)), key=lambda i: (-candidates[i].total, i))
    sets = [shingles(f"{c.question}\n{c.answer}", shingle_size) for c in candidates]
    frequency = Counter(shingle for words in sets for shingle in words)
    exact: dict[str, int] = {}
    index: dict[tuple[str, ...], list[int]] = defaultdict(list)  # prefix shingle -> kept candidates
    kept, dropped = set(), []
    for i in order:
        c = candidates[i]
        key = hashlib.sha1(f"{normalise(c.question)}\x1f{normalise(c.answer)}".encode()).hexdigest()
        if key in exact:
            dropped.append(Drop(c, "exact_duplicate", candidates[exact[key]].id, similarity=1.0))
            continue
        prefix = _prefix(sets[i], frequency, threshold)
        if threshold is not None:
            match = _most_similar(sets[i], {j for s in prefix for j in index.get(s, ())}, sets)
            if match is not None and match[1] >= threshold:
                dropped.append(Drop(c, "near_duplicate", candidates[match[0]].id,
                                    similarity=round(match[1], 4)))
                continue
        exact[key] = i
        for shingle in prefix:
            index[shingle].append(i)
        kept.add(i)
    return [c for i, c in enumerate(candidates) if i in kept], dropped


def _prefix(words: set, frequency: Counter, threshold: float | None) -> list:
    """The rarest |A| - ceil(t |A|) + 1 shingles of A (none without a threshold)."""
    if threshold is None:
        return []
    ordered = sorted(words, key=lambda shingle: (frequency[shingle], shingle))
    return ordered[:len(ordered) - math.ceil(threshold * len(ordered) - 1e-9) + 1]


def _most_similar(words: set, others: set[int], sets: list[set]) -> tuple[int, float] | None:
    """(candidate, Jaccard similarity) of the one among `others` most similar to `words`."""
    best = None
    for j in sorted(others):
        shared = len(words & sets[j])
        similarity = shared / (len(words) + len(sets[j]) - shared)
        if best is None or similarity > best[1]:
            best = (j, similarity)
    return best
