"""Rejection sampling's shared part (reference A3, A7), for the text stage (stage.py) and vision
rejection sampling (alignloop/vision/rejection_sampling.py): the prompts, the sampling groups,
scoring, the selection rule, the kept records and the artifacts.

    prompts --(groups: system prompt x temperature, seeded)--> candidates (the stage samples them)
            --(score_candidates: reward model and/or verifiers)--> scores
            --(select: verified first, then the highest total)--> Selection: best, pairs, skipped

`select` is a pure function of scored candidate rows and the original prompts: it can re-select
from an existing candidates.jsonl with other thresholds. Candidates are grouped by their explicit
`prompt_id` and ordered by the sample index in their `sample_id`, never by row position
(STYLE.md: open-instruct's `i % n` grouping is what we avoid). The kept records are built by
`chat_record` / `preference_record` (text records); vision passes its own builders, which
validate the same rows (`best_row`, `pair_row`) as vision records.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from alignloop.data.contracts import stable_id, validate_record
from alignloop.data.readers import write_jsonl
from alignloop.manifest import write_json
from alignloop.pipeline.errors import StageError
from alignloop.rejection_sampling.config import group_sizes

logger = logging.getLogger("alignloop.rejection_sampling")

# Skip reasons, all reported in metrics.json (0 when nothing was skipped for that reason).
SKIPS = (
    "duplicate_prompt",    # a prompt_id read twice (e.g. weight > 1): sampled once
    "empty_sample",        # samples with no text: never kept, never in a pair
    "truncated_sample",    # samples cut at max_new_tokens, not allowed as best (keep_truncated)
    "no_complete_sample",  # prompts where no sample could be the best
    "below_min_score",     # prompts whose best scored below min_score: nothing kept
    "all_failed",          # prompts whose samples all failed an applicable verifier: nothing kept
    "pair_none_failed",    # prompts whose samples all passed their verifiers: a best, no pair
    "pair_small_gap",      # prompts whose best - worst <= min_gap: no pair
    "pair_same_text",      # prompts whose best and worst answers are the same text: no pair
)


# ---------------------------------------------------------------------------------------------
# Before sampling: the prompts, the groups, the verifiers


def load_prompts(sources, kind: str, bad_records, seed: int, where: str, key: str,
                 hint: str) -> tuple[list[dict], list[dict], int]:
    """The prompt records of `sources` (`key` in the recipe; records of `kind`), one per
    prompt_id; the data report; how many repeats were dropped (`duplicate_prompt`).

    The round's `seed` picks them, so builtin datasets give new prompts each round. Two different
    prompts under one prompt_id are a StageError, and so are no prompts at all (`hint`: what a
    prompt record looks like).
    """
    from alignloop.data.sources import format_report, load_sources

    loaded = load_sources(sources, kind, bad_records, seed)
    logger.info("%s prompts:\n%s", where, format_report(loaded.report))
    records: dict[str, dict] = {}
    for record in loaded.records:
        seen = records.setdefault(record["prompt_id"], record)
        if seen["prompt"] != record["prompt"]:
            raise StageError(f"{where}: prompt_id {record['prompt_id']!r} names two different "
                             f"prompts in {key}; give them distinct ids")
    if not records:
        names = ", ".join(s.name for s in sources) or "none given"
        raise StageError(f"{where}: no prompts to sample from ({key}: {names}); add {hint}")
    return list(records.values()), list(loaded.report), len(loaded.records) - len(records)


@dataclass
class Group:
    """One generate call: every prompt sampled `n` times under one system prompt and temperature.
    Its samples get indices first_k .. first_k + n - 1 of each prompt's K."""

    index: int
    system_index: int          # position in rejection_sampling.system_prompts
    system_prompt: str | None
    temperature: float
    n: int
    first_k: int
    seed: int

    @property
    def label(self) -> str:
        """`system=none, T=0.8` or `system=1, T=0.8` (the system prompt's index in the recipe)."""
        system = "none" if self.system_prompt is None else self.system_index
        return f"system={system}, T={self.temperature:g}"

    def holds(self, candidate: dict) -> bool:
        return self.first_k <= sample_order(candidate)[1] < self.first_k + self.n


def sampling_groups(rs, seed: int) -> list[Group]:
    """The (system prompt x temperature) groups of `rs` (a RejectionSamplingConfig), system
    prompts outer, with their share of K and a seed derived from the round's seed and the group
    index: the same recipe and round give the same samples, each round new ones."""
    combos = [(i, s, t) for i, s in enumerate(rs.system_prompts) for t in rs.temperatures]
    sizes = group_sizes(rs.num_samples, len(combos))
    groups, first = [], 0
    for g, ((i, system, temperature), n) in enumerate(zip(combos, sizes)):
        group_seed = int(stable_id(["rejection_sampling", seed, g]), 16) % 2**31
        groups.append(Group(g, i, system, temperature, n, first, group_seed))
        first += n
    return [g for g in groups if g.n > 0]


def resolve_verifiers(scoring, where: str, key: str) -> None:
    """Fails (StageError naming `key`.scoring.verifiers) on an unknown or unimportable verifier,
    before anything is sampled."""
    from alignloop.reward.verifiers import resolve_verifier

    for name in scoring.verifiers:
        try:
            resolve_verifier(name)
        except ValueError as err:
            raise StageError(f"{where}: {key}.scoring.verifiers: {err}") from err


# ---------------------------------------------------------------------------------------------
# Scoring


def score_candidates(candidates: list[dict], records: list[dict], scoring, scorer, where: str) -> None:
    """Fills each candidate's `scores` (reward_model, verifiers, total). The answer is scored as
    a reply to the ORIGINAL prompt record: a steering system prompt only shapes sampling, and the
    original prompt + answer is what SFT and DPO train on, so that is the pair to judge."""
    from alignloop.reward.scoring import score_responses

    by_id = {r["prompt_id"]: r for r in records}
    try:
        scores = score_responses([by_id[c["prompt_id"]] for c in candidates],
                                 [c["completion"] for c in candidates], scoring, scorer)
    except ValueError as err:  # a verifier that fails or returns something other than a number
        raise StageError(f"{where}: scoring failed: {err}") from err
    for candidate, score in zip(candidates, scores):
        candidate["scores"] = score


def total(candidate: dict) -> float:
    return candidate["scores"]["total"]


def mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


# ---------------------------------------------------------------------------------------------
# Selection: a pure function of the scored candidates


@dataclass
class Selection:
    best: list[dict]     # chat records, one per prompt that kept an answer
    pairs: list[dict]    # preference records
    skipped: Counter     # reason -> count (SKIPS)


def select(candidates: list[dict], prompts: dict[str, list[dict]], *, round: int,
           min_score: float | None = None, keep_truncated: bool = False, pairs: bool = True,
           min_gap: float = 0.0, min_verifier_score: float | None = 1.0,
           best_record=None, pair_record=None) -> Selection:
    """The best answer (and a best/worst pair) of each prompt in `prompts` (prompt_id ->
    original messages), in that order; candidates may come in any order.

    As Llama 3 selects (reference A7): where a verifier applies to the prompt (scores it, not
    None), a sample passes when every applicable verifier gives at least `min_verifier_score`;
    the best is the highest `scores.total` among the passing samples only, and the pair is that
    best vs the lowest-total failing sample. So a verified answer with a low reward is kept over
    a wrong one the reward model prefers, and a prompt whose samples all fail keeps nothing
    (`all_failed`); one whose samples all pass gives a best but no pair (`pair_none_failed`).
    Where no verifier applies, or with `min_verifier_score` None (verifiers only add to the
    total), the best is the highest total and the worst the lowest.

    Candidates for best are non-empty samples (truncated ones only with `keep_truncated`); for
    worst, any non-empty sample. Ties go to the lowest sample index. A pair needs two different
    texts and, when no verifier decided it, best - worst > min_gap. Raises ValueError for a
    candidate whose prompt_id is not in `prompts`. `best_record(prompt, best, round)` and
    `pair_record(prompt, best, worst, round)` build the kept rows (default: text chat and
    preference records; vision rejection sampling passes its own).
    """
    best_record, pair_record = best_record or chat_record, pair_record or preference_record
    by_prompt: dict[str, list[dict]] = {pid: [] for pid in prompts}
    for candidate in candidates:
        if candidate["prompt_id"] not in by_prompt:
            raise ValueError(f"candidate {candidate['sample_id']!r}: unknown prompt_id "
                             f"{candidate['prompt_id']!r}")
        by_prompt[candidate["prompt_id"]].append(candidate)
    out = Selection([], [], Counter({reason: 0 for reason in SKIPS}))
    for prompt_id, group in by_prompt.items():
        ordered = sorted(group, key=sample_order)
        usable = [c for c in ordered if c["completion"].strip()]
        eligible = [c for c in usable if keep_truncated or c["finish_reason"] != "length"]
        out.skipped["empty_sample"] += len(ordered) - len(usable)
        out.skipped["truncated_sample"] += len(usable) - len(eligible)
        if not eligible:
            out.skipped["no_complete_sample"] += 1
            continue
        verified = min_verifier_score is not None and any(_applies(c) for c in usable)
        if verified:
            passing = [c for c in eligible if _passes(c, min_verifier_score)]
            if not passing:
                out.skipped["all_failed"] += 1
                continue
            rejects = [c for c in usable if not _passes(c, min_verifier_score)]
        else:
            passing, rejects = eligible, usable
        best = max(passing, key=total)  # max keeps the first of equals: the lowest index
        if min_score is not None and total(best) < min_score:
            out.skipped["below_min_score"] += 1
            continue
        out.best.append(best_record(prompts[prompt_id], best, round))
        if not pairs:
            continue
        if not rejects:
            out.skipped["pair_none_failed"] += 1
            continue
        worst = min(rejects, key=total)
        # Verified: the verifier already separates the two (a wrong answer the RM scores higher
        # is still the rejected side), so only the reward-ranked pair needs a score gap.
        reason = _pair_problem(best, worst, None if verified else min_gap)
        if reason:
            out.skipped[reason] += 1
        else:
            out.pairs.append(pair_record(prompts[prompt_id], best, worst, round))
    return out


def _applies(candidate: dict) -> bool:
    """True if some verifier scored this sample (None: the check does not apply to its prompt)."""
    return any(v is not None for v in candidate["scores"]["verifiers"].values())


def _passes(candidate: dict, threshold: float) -> bool:
    return all(v is None or v >= threshold for v in candidate["scores"]["verifiers"].values())


def sample_order(candidate: dict) -> tuple:
    """`prompt:k` sorts by the number k (so :10 comes after :9); other ids by their text."""
    k = candidate["sample_id"].rpartition(":")[2]
    return (0, int(k), "") if k.isdigit() else (1, 0, candidate["sample_id"])


def _pair_problem(best: dict, worst: dict, min_gap: float | None) -> str | None:
    """Why best and worst make no pair (equal scores, the best being the worst included; no gap
    is needed with `min_gap` None), or None."""
    if min_gap is not None and not total(best) - total(worst) > min_gap:
        return "pair_small_gap"
    if best["completion"].strip() == worst["completion"].strip():
        return "pair_same_text"  # e.g. verifiers that read the prompt's metadata, or RM noise
    return None


# ---------------------------------------------------------------------------------------------
# The kept records


def text_turn(text: str) -> dict:
    return {"role": "assistant", "content": text}


def best_row(prompt: list[dict], best: dict, round_: int, source: str, turn=text_turn) -> dict:
    """The chat row of a kept answer (not yet validated): `prompt` + `turn(answer)`; its metadata
    names the sample, its score, the round and `source` (the stage)."""
    return {"id": best["sample_id"], "messages": prompt + [turn(best["completion"])],
            "metadata": {"prompt_id": best["prompt_id"], "sample_id": best["sample_id"],
                         "score": total(best), "round": round_, "source": source}}


def pair_row(prompt: list[dict], best: dict, worst: dict, round_: int, source: str,
             turn=text_turn) -> dict:
    """The preference row of a pair (not yet validated): one stored prompt, best as chosen,
    worst as rejected; its metadata names both samples and scores."""
    return {"prompt_id": best["prompt_id"], "prompt": prompt,
            "chosen": [turn(best["completion"])], "rejected": [turn(worst["completion"])],
            "metadata": {"chosen_sample_id": best["sample_id"], "chosen_score": total(best),
                         "rejected_sample_id": worst["sample_id"], "rejected_score": total(worst),
                         "round": round_, "source": source}}


def chat_record(prompt: list[dict], best: dict, round_: int) -> dict:
    """A text chat record: the original prompt + the best answer."""
    return validate_record(best_row(prompt, best, round_, "rejection_sampling"), "chat")


def preference_record(prompt: list[dict], best: dict, worst: dict, round_: int) -> dict:
    """A text preference record: best vs worst answer."""
    return validate_record(pair_row(prompt, best, worst, round_, "rejection_sampling"), "preference")


# ---------------------------------------------------------------------------------------------
# Metrics and artifacts


def selection_metrics(candidates: list[dict], selection: Selection, prompts: int, scorer,
                      scoring) -> dict:
    """What every rejection-sampling metrics.json reports: counts, mean scores, skips by reason,
    truncated samples, the reward model and the scoring weights."""
    return {
        "prompts": prompts,
        "samples": len(candidates),
        "mean_score": mean([total(c) for c in candidates]),
        "mean_best_score": mean([b["metadata"]["score"] for b in selection.best]),
        "best_kept": len(selection.best),
        "pairs": len(selection.pairs),
        "skipped": dict(selection.skipped),
        "truncated": sum(c["finish_reason"] == "length" for c in candidates),
        "scoring": {"reward_model": str(scorer.model_dir) if scorer else None,
                    "weights": scoring.model_dump()},
    }


def write_artifacts(out_dir: Path, candidates: list[dict], selection: Selection, metrics: dict,
                    pairs: bool, where: str) -> None:
    """candidates.jsonl, best.jsonl, pairs.jsonl (with `pairs`) and metrics.json, last and
    atomically; logs what was kept."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(out_dir / "candidates.jsonl", candidates)
    write_jsonl(out_dir / "best.jsonl", selection.best)
    if pairs:
        write_jsonl(out_dir / "pairs.jsonl", selection.pairs)
    write_json(out_dir / "metrics.json", metrics)
    logger.info("%s: %d prompts, %d samples, %d best kept, %d pairs, skipped %s", where,
                metrics["prompts"], len(candidates), len(selection.best), len(selection.pairs),
                {k: v for k, v in selection.skipped.items() if v} or "nothing")
