"""Rejection sampling (reference A3): K answers per prompt from the policy, scored, the best kept.

    prompts --(K samples over system prompts x temperatures)--> candidates
            --(reward model and/or verifiers)--> scores --(verified first, then argmax)--> best, pair

Artifacts in `out_dir` (docs/architecture.md, docs/rejection_sampling.md):

    candidates.jsonl  every sample with its prompt_id, sample_id, scores and what produced it
    best.jsonl        chat records: the original prompt + the best answer (for SFT)
    pairs.jsonl       preference records: best vs worst answer (for DPO and the reward model)
    metrics.json      counts, mean scores, per-group means, skips by reason, throughput

Candidates are grouped by their explicit `prompt_id` and ordered by the sample index in their
`sample_id`, never by row position (STYLE.md: open-instruct's `i % n` grouping is what we avoid).
Everything that can fail on bad input (no prompts, a reward model with another tokenizer, an
unknown verifier) fails before the first sample is drawn, and nothing is written until the end.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from alignloop.config import Recipe, resolved_precision
from alignloop.data.contracts import stable_id, validate_record
from alignloop.manifest import write_json
from alignloop.data.readers import write_jsonl
from alignloop.data.sources import format_report, load_sources
from alignloop.generation.backends import open_generator
from alignloop.pipeline.context import StageContext
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
        return self.first_k <= _sample_order(candidate)[1] < self.first_k + self.n


@dataclass
class Selection:
    best: list[dict]     # chat records, one per prompt that kept an answer
    pairs: list[dict]    # preference records
    skipped: Counter     # reason -> count (SKIPS)


def run(cfg: Recipe, ctx: StageContext, out_dir: Path) -> dict:
    """Samples, scores and selects; writes the artifacts above into `out_dir`; returns the metrics.

    Raises StageError (before generating, and before `out_dir` exists) when there are no prompts,
    when the reward model's tokenizer is not the policy's, or when a verifier cannot be loaded.
    """
    rs, started = cfg.rejection_sampling, time.time()
    _check_section(rs, ctx)
    records, data_report, duplicates = _prompts(cfg, ctx)
    scorer = _reward_scorer(cfg, ctx)
    _resolve_verifiers(rs.scoring, ctx)
    groups = sampling_groups(rs, ctx.seed)

    candidates, timing = _sample(cfg, ctx, records, groups)
    scored = time.time()
    _score(candidates, records, rs.scoring, _scorer_on_accelerator(scorer), ctx)
    timing["scoring_seconds"] = round(time.time() - scored, 2)

    originals = {r["prompt_id"]: r["prompt"] for r in records}
    selection = select(candidates, originals, round=ctx.round, min_score=rs.min_score,
                       keep_truncated=rs.keep_truncated, pairs=rs.pairs, min_gap=rs.min_gap,
                       min_verifier_score=rs.min_verifier_score)
    selection.skipped["duplicate_prompt"] += duplicates
    metrics = _metrics(candidates, selection, groups, records, timing, scorer, cfg)
    metrics["data"] = data_report
    metrics["seconds"] = round(time.time() - started, 1)
    _write(out_dir, candidates, selection, metrics, rs.pairs, ctx.label, len(records))
    return metrics


# ---------------------------------------------------------------------------------------------
# Before generating: everything that can be wrong with the input


def _check_section(rs, ctx: StageContext) -> None:
    """What the recipe loader also checks, for callers that build a config by hand."""
    if rs.pairs and rs.num_samples < 2:
        raise StageError(f"{ctx.label}: best/worst pairs need at least 2 samples per prompt "
                         f"(rejection_sampling.num_samples is {rs.num_samples}); raise it or set "
                         "pairs: false")
    groups = len(rs.temperatures) * len(rs.system_prompts)
    if rs.num_samples < groups:
        raise StageError(f"{ctx.label}: {rs.num_samples} samples per prompt cannot cover "
                         f"{len(rs.system_prompts)} system prompt(s) x {len(rs.temperatures)} "
                         "temperature(s); raise rejection_sampling.num_samples")


def _prompts(cfg: Recipe, ctx: StageContext) -> tuple[list[dict], list[dict], int]:
    """The round's prompt records, one per prompt_id; the data report; how many repeats were dropped.

    The round's seed picks them, so builtin datasets give new prompts each round.
    """
    loaded = load_sources(cfg.rejection_sampling.prompts, "prompt", cfg.bad_records, ctx.seed)
    logger.info("rejection_sampling prompts:\n%s", format_report(loaded.report))
    records: dict[str, dict] = {}
    for record in loaded.records:
        seen = records.setdefault(record["prompt_id"], record)
        if seen["prompt"] != record["prompt"]:
            raise StageError(f"{ctx.label}: prompt_id {record['prompt_id']!r} names two different "
                             "prompts in rejection_sampling.prompts; give them distinct ids")
    if not records:
        sources = ", ".join(s.name for s in cfg.rejection_sampling.prompts) or "none given"
        raise StageError(f"{ctx.label}: no prompts to sample from (rejection_sampling.prompts: "
                         f"{sources}); add prompt records, e.g. {{\"prompt\": \"...\"}} per line")
    return list(records.values()), loaded.report, len(loaded.records) - len(records)


def _reward_model_dir(cfg: Recipe, ctx: StageContext) -> str | None:
    """This round's reward model (the reward stage's), else rejection_sampling.reward_model."""
    if cfg.rejection_sampling.scoring.reward_model == 0:
        return None
    chosen = ctx.reward_model or cfg.rejection_sampling.reward_model
    if chosen is None:
        raise StageError(f"{ctx.label}: scoring.reward_model has weight "
                         f"{cfg.rejection_sampling.scoring.reward_model} but there is no reward "
                         "model: add a reward stage to the round, set rejection_sampling."
                         "reward_model, or set the weight to 0")
    return str(chosen)


def _reward_scorer(cfg: Recipe, ctx: StageContext):
    """The loaded RewardScorer (or None), its tokenizer checked against the policy's.

    Loading it here, before generating, also means that a broken checkpoint fails in seconds
    rather than after the samples are drawn.
    """
    rm_dir = _reward_model_dir(cfg, ctx)
    if rm_dir is None:
        return None
    from transformers import AutoTokenizer

    from alignloop.reward.scoring import RewardScorer

    try:
        policy_tokenizer = AutoTokenizer.from_pretrained(ctx.policy)
    except (OSError, ValueError) as err:
        raise StageError(f"{ctx.label}: cannot load the policy's tokenizer from {ctx.policy}: {err}") from err
    try:
        scorer = RewardScorer(rm_dir, dtype=_torch_dtype(cfg))
    except (OSError, ValueError) as err:
        raise StageError(f"{ctx.label}: cannot load the reward model {rm_dir} (a reward stage's "
                         f"model/ directory: sequence classification, one score): {err}") from err
    scorer.check_tokenizer(policy_tokenizer, where=f"{ctx.label} (policy {ctx.policy})")
    return scorer


def _torch_dtype(cfg: Recipe):
    import torch

    return getattr(torch, _dtype(cfg))


def _scorer_on_accelerator(scorer):
    """The reward model waits on the CPU while the generator holds the GPU; it scores on the GPU
    once the generator has let go of it."""
    import torch

    if scorer is not None and torch.cuda.is_available():
        scorer.model.to("cuda")
    return scorer


def _resolve_verifiers(scoring, ctx: StageContext) -> None:
    from alignloop.reward.verifiers import resolve_verifier

    for name in scoring.verifiers:
        try:
            resolve_verifier(name)
        except ValueError as err:
            raise StageError(f"{ctx.label}: rejection_sampling.scoring.verifiers: {err}") from err


def sampling_groups(rs, seed: int) -> list[Group]:
    """The (system prompt x temperature) groups, system prompts outer, with their share of K
    and a seed derived from the round's seed and the group index."""
    combos = [(i, s, t) for i, s in enumerate(rs.system_prompts) for t in rs.temperatures]
    sizes = group_sizes(rs.num_samples, len(combos))
    groups, first = [], 0
    for g, ((i, system, temperature), n) in enumerate(zip(combos, sizes)):
        group_seed = int(stable_id(["rejection_sampling", seed, g]), 16) % 2**31
        groups.append(Group(g, i, system, temperature, n, first, group_seed))
        first += n
    return [g for g in groups if g.n > 0]


def with_system(prompt: list[dict], system: str | None) -> list[dict]:
    """The messages sampled from: `prompt` as is, or steered by a system message.

    A prompt that has its own system message keeps it (it is part of what the user asked, e.g.
    steerability data, reference A7) and gets the steering text after it, past a blank line.
    """
    if system is None:
        return prompt
    if prompt[0]["role"] == "system":
        merged = {"role": "system", "content": f"{prompt[0]['content']}\n\n{system}"}
        return [merged, *prompt[1:]]
    return [{"role": "system", "content": system}, *prompt]


# ---------------------------------------------------------------------------------------------
# Sampling and scoring


def _sample(cfg: Recipe, ctx: StageContext, records: list[dict], groups: list[Group]):
    """Every candidate row (without scores), in prompt order then sample index; timing.

    With generation.check_logprobs, `open_generator` wraps the generator in its log-prob guard
    (alignloop.generation.logprobs), which stops the stage when the generator samples from other
    weights than the policy's; its reports go into metrics.json.
    """
    from alignloop.generation import SamplingSettings

    rs = cfg.rejection_sampling
    rows: dict[str, list[dict]] = {r["prompt_id"]: [] for r in records}
    seconds = 0.0
    with open_generator(cfg.generation, ctx.policy, dtype=_dtype(cfg)) as gen:
        described = gen.describe()
        for group in groups:
            settings = SamplingSettings(n=group.n, max_new_tokens=rs.max_new_tokens,
                                        temperature=group.temperature, top_p=rs.top_p, seed=group.seed)
            prompts = [with_system(r["prompt"], group.system_prompt) for r in records]
            start = time.time()
            try:
                samples = gen.generate(prompts, settings)  # [[Sample] * n] per prompt
            except StageError as err:  # the log-prob guard, or a generator that stopped answering
                raise StageError(f"{ctx.label}: {err}") from err
            took = time.time() - start
            seconds += took
            logger.info("%s: group %s: %d x %d samples in %.1f s (%.1f samples/s)", ctx.label,
                        group.label, len(prompts), group.n, took, len(prompts) * group.n / max(took, 1e-9))
            producer = {**described, **asdict(settings)}
            for record, prompt, drawn in zip(records, prompts, samples):
                rows[record["prompt_id"]] += [
                    _candidate(record, prompt, sample, group, group.first_k + j, producer, ctx.round)
                    for j, sample in enumerate(drawn)]
        checks = getattr(gen, "checks", None)
        start_seconds = getattr(gen, "start_seconds", None)
    candidates = [row for per_prompt in rows.values() for row in per_prompt]
    timing = {"generation_seconds": round(seconds, 2),
              "samples_per_second": round(len(candidates) / seconds, 2) if seconds else None,
              "generator_start_seconds": start_seconds, "generator": described}
    if checks is not None:
        timing["logprob_check"] = checks
    return candidates, timing


def _candidate(record, prompt, sample, group: Group, k: int, producer: dict, round_: int) -> dict:
    return {"prompt_id": record["prompt_id"], "sample_id": f"{record['prompt_id']}:{k}",
            "prompt": prompt, "completion": sample.text, "system_prompt": group.system_prompt,
            "temperature": group.temperature, "finish_reason": sample.finish_reason,
            "scores": None, "generator": producer, "round": round_}


def _dtype(cfg: Recipe) -> str:
    """The generator's weights dtype: bf16 for bf16 runs, else fp32 (as training loads them)."""
    return "bfloat16" if resolved_precision(cfg) == "bf16" else "float32"


def _score(candidates: list[dict], records: list[dict], scoring, scorer, ctx: StageContext) -> None:
    """Fills each candidate's `scores`. The answer is scored as a reply to the ORIGINAL prompt:
    the steering system prompt only shapes sampling, and the original prompt + answer is what
    SFT and DPO train on, so that is the pair the reward model must judge."""
    from alignloop.reward.scoring import score_responses

    by_id = {r["prompt_id"]: r for r in records}
    try:
        scores = score_responses([by_id[c["prompt_id"]] for c in candidates],
                                 [c["completion"] for c in candidates], scoring, scorer)
    except ValueError as err:  # a verifier that fails or returns something other than a number
        raise StageError(f"{ctx.label}: scoring failed: {err}") from err
    for candidate, score in zip(candidates, scores):
        candidate["scores"] = score


# ---------------------------------------------------------------------------------------------
# Selection: a pure function of the scored candidates


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
    texts and, when no verifier decided it, best - worst > min_gap. Raises ValueError for a candidate whose prompt_id
    is not in `prompts`. `best_record(prompt, best, round)` and `pair_record(prompt, best,
    worst, round)` build the kept rows (default: text chat and preference records; vision
    rejection sampling passes its own).
    """
    best_record, pair_record = best_record or _best_record, pair_record or _pair_record
    by_prompt: dict[str, list[dict]] = {pid: [] for pid in prompts}
    for candidate in candidates:
        if candidate["prompt_id"] not in by_prompt:
            raise ValueError(f"candidate {candidate['sample_id']!r}: unknown prompt_id "
                             f"{candidate['prompt_id']!r}")
        by_prompt[candidate["prompt_id"]].append(candidate)
    out = Selection([], [], Counter({reason: 0 for reason in SKIPS}))
    for prompt_id, group in by_prompt.items():
        ordered = sorted(group, key=_sample_order)
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
        best = max(passing, key=_total)  # max keeps the first of equals: the lowest index
        if min_score is not None and _total(best) < min_score:
            out.skipped["below_min_score"] += 1
            continue
        out.best.append(best_record(prompts[prompt_id], best, round))
        if not pairs:
            continue
        if not rejects:
            out.skipped["pair_none_failed"] += 1
            continue
        worst = min(rejects, key=_total)
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


def _total(candidate: dict) -> float:
    return candidate["scores"]["total"]


def _sample_order(candidate: dict) -> tuple:
    """`prompt:k` sorts by the number k (so :10 comes after :9); other ids by their text."""
    k = candidate["sample_id"].rpartition(":")[2]
    return (0, int(k), "") if k.isdigit() else (1, 0, candidate["sample_id"])


def _pair_problem(best: dict, worst: dict, min_gap: float | None) -> str | None:
    """Why best and worst make no pair (equal scores, the best being the worst included; no gap
    is needed with `min_gap` None), or None."""
    if min_gap is not None and not _total(best) - _total(worst) > min_gap:
        return "pair_small_gap"
    if best["completion"].strip() == worst["completion"].strip():
        return "pair_same_text"  # e.g. verifiers that read the prompt's metadata, or RM noise
    return None


def _best_record(prompt: list[dict], best: dict, round_: int) -> dict:
    record = {"id": best["sample_id"],
              "messages": prompt + [{"role": "assistant", "content": best["completion"]}],
              "metadata": {"prompt_id": best["prompt_id"], "sample_id": best["sample_id"],
                           "score": _total(best), "round": round_, "source": "rejection_sampling"}}
    return validate_record(record, "chat")


def _pair_record(prompt: list[dict], best: dict, worst: dict, round_: int) -> dict:
    record = {"prompt_id": best["prompt_id"], "prompt": prompt,
              "chosen": best["completion"], "rejected": worst["completion"],
              "metadata": {"chosen_sample_id": best["sample_id"], "chosen_score": _total(best),
                           "rejected_sample_id": worst["sample_id"], "rejected_score": _total(worst),
                           "round": round_, "source": "rejection_sampling"}}
    return validate_record(record, "preference")


# ---------------------------------------------------------------------------------------------
# Metrics and artifacts


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _metrics(candidates, selection: Selection, groups: list[Group], records, timing, scorer,
             cfg: Recipe) -> dict:
    by_group = {}
    for group in groups:
        totals = [_total(c) for c in candidates if group.holds(c)]
        by_group[group.label] = {"system_prompt": group.system_prompt, "temperature": group.temperature,
                                 "samples": len(totals), "mean_score": _mean(totals)}
    scoring = cfg.rejection_sampling.scoring
    return {
        "prompts": len(records),
        "samples": len(candidates),
        "mean_score": _mean([_total(c) for c in candidates]),
        "mean_best_score": _mean([b["metadata"]["score"] for b in selection.best]),
        "best_kept": len(selection.best),
        "pairs": len(selection.pairs),
        "skipped": dict(selection.skipped),
        "by_group": by_group,
        "truncated": sum(c["finish_reason"] == "length" for c in candidates),
        "scoring": {"reward_model": str(scorer.model_dir) if scorer else None,
                    "weights": scoring.model_dump()},
        **timing,
    }


def _write(out_dir: Path, candidates, selection: Selection, metrics: dict, pairs: bool,
           label: str, prompts: int) -> None:
    """Writes the stage's files (metrics.json last, atomically) and logs what was kept."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(out_dir / "candidates.jsonl", candidates)
    write_jsonl(out_dir / "best.jsonl", selection.best)
    if pairs:
        write_jsonl(out_dir / "pairs.jsonl", selection.pairs)
    write_json(out_dir / "metrics.json", metrics)
    logger.info("%s: %d prompts, %d samples, %d best kept, %d pairs, skipped %s", label, prompts,
                len(candidates), len(selection.best), len(selection.pairs),
                {k: v for k, v in selection.skipped.items() if v} or "nothing")
