"""Vision rejection sampling (Llama 3 §7.5; the text stage's recipe, reference A3, on images).

    vision_prompt records --(K samples from the vision policy: alignloop.generation.hf)-->
    candidates --(shapes and other verifiers, and/or the vision reward model)--> scores
    --(verified first, then argmax: alignloop.rejection_sampling.selection)--> best, pair

Stage `vision_rejection_sampling`, recipe section `vision.rejection_sampling`. Artifacts in
`out_dir`, as the text stage's (docs/rejection_sampling.md):

    candidates.jsonl  every sample: prompt_id, sample_id, the prompt (image paths), the answer,
                      its scores and what produced it (model, sampling settings)
    best.jsonl        vision_chat records: the prompt + its best answer      (for a later sft)
    pairs.jsonl       vision_preference records: best vs worst answer        (for a later dpo)
    metrics.json      counts, mean scores, skips by reason, throughput

The policy is the previous vision stage's model (or the start model), converted to transformers'
`MllamaForConditionalGeneration` (`to_mllama`, which shares its tensors) and sampled by
`alignloop.generation.hf.sample_batches` over the vision_prompt collator's left-padded batches:
the text stage's hf sampling, with its stop tokens and seeding. Only the hf backend samples
images: vLLM dropped Mllama (docs/vision.md), and the recipe check refuses another
`generation.backend`. The prompts, groups, scoring, selection rule and artifacts are the text
stage's (alignloop/rejection_sampling/selection.py); only the records differ (vision_chat and
vision_preference, the prompt's images by path). Everything that can fail on bad input (no
prompts, an unknown verifier, a missing reward model) fails before the first sample is drawn;
the runner renames `out_dir` into place once this returns.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path

import torch

from alignloop.config import Recipe
from alignloop.generation.common import SamplingSettings
from alignloop.generation.hf import sample_batches
from alignloop.pipeline.context import StageContext
from alignloop.pipeline.errors import StageError
from alignloop.rejection_sampling.selection import (Group, best_row, load_prompts, pair_row,
                                                    resolve_verifiers, sampling_groups,
                                                    score_candidates, select, selection_metrics,
                                                    write_artifacts)

logger = logging.getLogger("alignloop.vision")
KEY = "vision.rejection_sampling"
SOURCE = "vision_rejection_sampling"  # metadata.source of the kept records


def run(cfg: Recipe, ctx: StageContext, out_dir: Path) -> dict:
    """Samples, scores and selects; writes the artifacts above into `out_dir`; returns the metrics."""
    from alignloop.vision.convert import to_mllama
    from alignloop.vision.data import VisionCollator
    from alignloop.vision.loading import image_processor_for, load_vision_model, load_vision_tokenizer

    rs, started = cfg.vision.rejection_sampling, time.time()
    if cfg.generation.backend != "hf":
        raise StageError(f"{ctx.label}: generation.backend {cfg.generation.backend}: vision rejection "
                         "sampling samples with transformers only (vLLM runs Mllama only up to "
                         "v0.10.2, docs/vision.md); set generation.backend: hf")
    records, report, duplicates = load_prompts(
        rs.prompts, "vision_prompt", cfg.bad_records, ctx.seed, ctx.label, f"{KEY}.prompts",
        "vision_prompt records: an image and a question per line")
    resolve_verifiers(rs.scoring, ctx.label, KEY)
    tokenizer = load_vision_tokenizer(cfg, ctx.policy)
    scorer = _reward_scorer(cfg, ctx, tokenizer)  # loaded first: a broken one fails in seconds
    model = load_vision_model(cfg, ctx.policy, tokenizer).eval()
    collator = VisionCollator(tokenizer, image_processor_for(cfg, model), "vision_prompt", rs.max_length)
    policy = to_mllama(model)  # transformers' Mllama, sharing our tensors
    if torch.cuda.is_available():
        policy.to("cuda")

    groups = sampling_groups(rs, ctx.seed)
    candidates, timing = _sample(policy, tokenizer, collator, records, groups, rs, ctx)
    del policy, model
    scored = time.time()
    score_candidates(candidates, records, rs.scoring, scorer, ctx.label)
    timing["scoring_seconds"] = round(time.time() - scored, 2)

    selection = select(candidates, {r["prompt_id"]: r["prompt"] for r in records}, round=ctx.round,
                       min_score=rs.min_score, keep_truncated=rs.keep_truncated, pairs=rs.pairs,
                       min_gap=rs.min_gap, min_verifier_score=rs.min_verifier_score,
                       best_record=best_record, pair_record=pair_record)
    selection.skipped["duplicate_prompt"] += duplicates
    metrics = {"stage": ctx.name, "policy": ctx.policy,
               **selection_metrics(candidates, selection, len(records), scorer, rs.scoring),
               **timing, "data": report, "seconds": round(time.time() - started, 1)}
    write_artifacts(out_dir, candidates, selection, metrics, rs.pairs, ctx.label)
    return metrics


# ---------------------------------------------------------------------------------------------
# Before sampling


def _reward_scorer(cfg: Recipe, ctx: StageContext, tokenizer):
    """The vision reward model that `ctx.reward_model` names (None when its weight is 0)."""
    rs = cfg.vision.rejection_sampling
    if rs.scoring.reward_model == 0:
        return None
    if ctx.reward_model is None:
        raise StageError(f"{ctx.label}: {KEY}.scoring.reward_model has weight "
                         f"{rs.scoring.reward_model:g} but there is no vision reward model: list "
                         f"reward before rejection_sampling in vision.stages, set {KEY}.reward_model, "
                         "or set the weight to 0")
    return VisionRewardScorer(cfg, Path(ctx.reward_model), tokenizer, rs.batch_size,
                              rs.max_length + rs.max_new_tokens, where=ctx.label)


class VisionRewardScorer:
    """A vision_reward stage's model (Mllama + score.safetensors) scoring (prompt, answer) pairs;
    the interface of alignloop.reward.scoring.RewardScorer, so `score_responses` sums it with
    the verifiers. Empty answers get None (they are never kept)."""

    def __init__(self, cfg: Recipe, model_dir: Path, policy_tokenizer, batch_size: int,
                 max_length: int, where: str = KEY):
        from alignloop.reward.scoring import check_same_vocabulary
        from alignloop.vision.data import VisionCollator
        from alignloop.vision.loading import (image_processor_for, is_mllama, load_vision_model,
                                              load_vision_tokenizer)
        from alignloop.vision.reward import SCORE_FILE, load_reward_model

        if not is_mllama(model_dir) or not (model_dir / SCORE_FILE).is_file():
            raise StageError(f"{where}: {model_dir} is not a vision reward model (a vision_reward "
                             f"stage's model/ directory: Mllama config.json and {SCORE_FILE}); "
                             f"check {KEY}.reward_model")
        tokenizer = load_vision_tokenizer(cfg, str(model_dir))
        check_same_vocabulary(tokenizer, policy_tokenizer, where, f"the vision reward model in {model_dir}")
        vision = load_vision_model(cfg, str(model_dir), tokenizer)
        self.model_dir, self.batch_size = model_dir, batch_size
        self.model = load_reward_model(vision, model_dir).eval()
        if torch.cuda.is_available():
            self.model.to("cuda")
        self.collator = VisionCollator(tokenizer, image_processor_for(cfg, vision), "vision_chat", max_length)

    @torch.no_grad()
    def score(self, prompts: list[list[dict]], responses: list[str]) -> list[float | None]:
        """One reward per (prompt messages, answer), in input order; None for an empty answer."""
        rows = [(i, {"id": str(i), "messages": p + [_assistant(r)]})
                for i, (p, r) in enumerate(zip(prompts, responses)) if r.strip()]
        out: list[float | None] = [None] * len(prompts)
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start:start + self.batch_size]
            batch = self.collator([record for _, record in chunk])
            rewards = self.model(**{k: v.to(self.model.device) for k, v in batch.items()})  # (B,)
            for (i, _), reward in zip(chunk, rewards.float().tolist()):
                out[i] = reward
        return out


# ---------------------------------------------------------------------------------------------
# Sampling


def _sample(policy, tokenizer, collator, records: list[dict], groups: list[Group], rs,
            ctx: StageContext) -> tuple[list[dict], dict]:
    """Every candidate row (without scores), in prompt order then sample index; timing. One
    `sample_batches` call per group (batches of `rs.batch_size` prompts), seeded with the group's
    seed."""
    rows: dict[str, list[dict]] = {r["prompt_id"]: [] for r in records}
    seconds = 0.0
    for group in groups:
        settings = SamplingSettings(n=group.n, max_new_tokens=rs.max_new_tokens,
                                    temperature=group.temperature, top_p=rs.top_p, seed=group.seed)
        producer = {"backend": "hf", "model": ctx.policy, **asdict(settings)}
        start = time.time()
        drawn = sample_batches(policy, tokenizer, records, settings, collator, rs.batch_size,
                               progress=False)  # [[Sample] * n] per record
        took = time.time() - start
        seconds += took
        logger.info("%s: T=%g: %d x %d samples in %.1f s", ctx.label, group.temperature,
                    len(records), group.n, took)
        for record, samples in zip(records, drawn):
            rows[record["prompt_id"]] += [_candidate(record, s, group.first_k + j, producer, ctx.round)
                                          for j, s in enumerate(samples)]
    candidates = [row for per_prompt in rows.values() for row in per_prompt]
    return candidates, {"generation_seconds": round(seconds, 2),
                        "samples_per_second": round(len(candidates) / seconds, 2) if seconds else None}


def _candidate(record: dict, sample, k: int, producer: dict, round_: int) -> dict:
    return {"prompt_id": record["prompt_id"], "sample_id": f"{record['prompt_id']}:{k}",
            "prompt": record["prompt"], "completion": sample.text.strip(), "answer": record.get("answer"),
            "temperature": producer["temperature"], "finish_reason": sample.finish_reason,
            "scores": None, "generator": producer, "round": round_}


# ---------------------------------------------------------------------------------------------
# The kept rows: vision records that reference the prompt's image paths


def _assistant(text: str) -> dict:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def best_record(prompt: list[dict], best: dict, round_: int) -> dict:
    """A vision_chat record: the prompt (its images by path) + the best answer."""
    from alignloop.data.vision_records import validate_vision_record

    record = best_row(prompt, best, round_, SOURCE, _assistant)
    return validate_vision_record(record, "vision_chat", check_images=False)


def pair_record(prompt: list[dict], best: dict, worst: dict, round_: int) -> dict:
    """A vision_preference record: best vs worst answer to one stored prompt."""
    from alignloop.data.vision_records import validate_vision_record

    record = pair_row(prompt, best, worst, round_, SOURCE, _assistant)
    return validate_vision_record(record, "vision_preference", check_images=False)
