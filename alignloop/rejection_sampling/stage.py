"""Rejection sampling (reference A3): K answers per prompt from the policy, scored, the best kept.

    prompts --(K samples over system prompts x temperatures)--> candidates
            --(reward model and/or verifiers)--> scores --(verified first, then argmax)--> best, pair

Artifacts in `out_dir` (docs/architecture.md, docs/rejection_sampling.md):

    candidates.jsonl  every sample with its prompt_id, sample_id, scores and what produced it
    best.jsonl        chat records: the original prompt + the best answer (for SFT)
    pairs.jsonl       preference records: best vs worst answer (for DPO and the reward model)
    metrics.json      counts, mean scores, per-group means, skips by reason, throughput

This file samples (through alignloop.generation's backends, `generation.backend`); the prompts,
groups, scoring, the selection rule and the records it keeps are selection.py's, shared with
vision rejection sampling. Everything that can fail on bad input (no prompts, a reward model
with another tokenizer, an unknown verifier) fails before the first sample is drawn, and nothing
is written until the end.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path

from alignloop.config import Recipe
from alignloop.generation.backends import open_generator
from alignloop.models.loading import dtype_name, weights_dtype
from alignloop.pipeline.context import StageContext
from alignloop.pipeline.errors import StageError
from alignloop.rejection_sampling.selection import (Group, load_prompts, mean,
                                                    resolve_verifiers, sampling_groups,
                                                    score_candidates, select, selection_metrics,
                                                    total, write_artifacts)

logger = logging.getLogger("alignloop.rejection_sampling")
KEY = "rejection_sampling"


def run(cfg: Recipe, ctx: StageContext, out_dir: Path) -> dict:
    """Samples, scores and selects; writes the artifacts above into `out_dir`; returns the metrics.

    Raises StageError (before generating, and before `out_dir` exists) when there are no prompts,
    when the reward model's tokenizer is not the policy's, or when a verifier cannot be loaded.
    """
    rs, started = cfg.rejection_sampling, time.time()
    records, data_report, duplicates = load_prompts(
        rs.prompts, "prompt", cfg.bad_records, ctx.seed, ctx.label, f"{KEY}.prompts",
        'prompt records, e.g. {"prompt": "..."} per line')
    scorer = _reward_scorer(cfg, ctx)
    resolve_verifiers(rs.scoring, ctx.label, KEY)
    groups = sampling_groups(rs, ctx.seed)

    candidates, timing = _sample(cfg, ctx, records, groups)
    scored = time.time()
    score_candidates(candidates, records, rs.scoring, _scorer_on_accelerator(scorer), ctx.label)
    timing["scoring_seconds"] = round(time.time() - scored, 2)

    originals = {r["prompt_id"]: r["prompt"] for r in records}
    selection = select(candidates, originals, round=ctx.round, min_score=rs.min_score,
                       keep_truncated=rs.keep_truncated, pairs=rs.pairs, min_gap=rs.min_gap,
                       min_verifier_score=rs.min_verifier_score)
    selection.skipped["duplicate_prompt"] += duplicates
    metrics = {**selection_metrics(candidates, selection, len(records), scorer, rs.scoring),
               "by_group": _by_group(candidates, groups), **timing, "data": data_report,
               "seconds": round(time.time() - started, 1)}
    write_artifacts(out_dir, candidates, selection, metrics, rs.pairs, ctx.label)
    return metrics


# ---------------------------------------------------------------------------------------------
# Before generating: everything that can be wrong with the input


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
    """The loaded RewardScorer (or None), its tokenizer checked against the policy's, before
    anything is generated."""
    rm_dir = _reward_model_dir(cfg, ctx)
    if rm_dir is None:
        return None
    from alignloop.reward.scoring import RewardScorer

    return RewardScorer.for_policy(rm_dir, ctx.policy, weights_dtype(cfg), ctx.label)


def _scorer_on_accelerator(scorer):
    """The reward model waits on the CPU while the generator holds the GPU; it scores on the GPU
    once the generator has let go of it."""
    import torch

    if scorer is not None and torch.cuda.is_available():
        scorer.model.to("cuda")
    return scorer


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
# Sampling


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
    with open_generator(cfg.generation, ctx.policy, dtype=dtype_name(weights_dtype(cfg))) as gen:
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


def _by_group(candidates: list[dict], groups: list[Group]) -> dict:
    """Samples and mean score per (system prompt x temperature) group, by the group's label."""
    out = {}
    for group in groups:
        totals = [total(c) for c in candidates if group.holds(c)]
        out[group.label] = {"system_prompt": group.system_prompt, "temperature": group.temperature,
                            "samples": len(totals), "mean_score": mean(totals)}
    return out
