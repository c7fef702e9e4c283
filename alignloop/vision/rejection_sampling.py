"""Vision rejection sampling (Llama 3 §7.5; the text stage's recipe, reference A3, on images).

    vision_prompt records --(K samples from the vision policy: Mllama generate, do_sample)-->
    candidates --(shapes and other verifiers, and/or the vision reward model)--> scores
    --(argmax, alignloop.rejection_sampling.stage.select)--> best (vision_chat), best/worst pair

Stage `vision_rejection_sampling`, recipe section `vision.rejection_sampling`. Artifacts in
`out_dir`, as the text stage's (docs/rejection_sampling.md):

    candidates.jsonl  every sample: prompt_id, sample_id, the prompt (image paths), the answer,
                      its scores and what produced it (model, sampling settings)
    best.jsonl        vision_chat records: the prompt + its best answer      (for a later sft)
    pairs.jsonl       vision_preference records: best vs worst answer        (for a later dpo)
    metrics.json      counts, mean scores, skips by reason, throughput

The policy is the previous vision stage's model (or the start model), converted to transformers'
`MllamaForConditionalGeneration` (`to_mllama`, which shares its tensors) and sampled with its
`generate` over the vision_prompt collator's left-padded batches. The selection and the scoring
sum are the text stage's (`select`, `score_responses`); only the records differ. Everything that
can fail on bad input (no prompts, an unknown verifier, a missing reward model) fails before the
first sample is drawn; the runner renames `out_dir` into place once this returns.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from alignloop.config import Recipe
from alignloop.data.sources import format_report, load_sources
from alignloop.pipeline.context import StageContext
from alignloop.pipeline.errors import StageError
from alignloop.rejection_sampling.stage import (Group, _mean, _resolve_verifiers, _score, _total,
                                                _write, sampling_groups, select)

logger = logging.getLogger("alignloop.vision")
KEY = "vision.rejection_sampling"


def run(cfg: Recipe, ctx: StageContext, out_dir: Path) -> dict:
    """Samples, scores and selects; writes the artifacts above into `out_dir`; returns the metrics."""
    from alignloop.vision.convert import to_mllama
    from alignloop.vision.data import VisionCollator
    from alignloop.vision.stage import image_processor_for, load_vision_model, load_vision_tokenizer

    rs, started = cfg.vision.rejection_sampling, time.time()
    _check_section(rs, ctx)
    records, report, duplicates = _prompts(cfg, ctx)
    _resolve_verifiers(rs.scoring, ctx)
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
    _score(candidates, records, rs.scoring, scorer, ctx)
    timing["scoring_seconds"] = round(time.time() - scored, 2)

    selection = select(candidates, {r["prompt_id"]: r["prompt"] for r in records}, round=ctx.round,
                       min_score=rs.min_score, keep_truncated=rs.keep_truncated, pairs=rs.pairs,
                       min_gap=rs.min_gap, min_verifier_score=rs.min_verifier_score,
                       best_record=best_record, pair_record=pair_record)
    selection.skipped["duplicate_prompt"] += duplicates
    metrics = {
        "stage": ctx.name, "policy": ctx.policy, "prompts": len(records), "samples": len(candidates),
        "mean_score": _mean([_total(c) for c in candidates]),
        "mean_best_score": _mean([b["metadata"]["score"] for b in selection.best]),
        "best_kept": len(selection.best), "pairs": len(selection.pairs),
        "skipped": dict(selection.skipped),
        "truncated": sum(c["finish_reason"] == "length" for c in candidates),
        "scoring": {"reward_model": str(scorer.model_dir) if scorer else None,
                    "weights": rs.scoring.model_dump()},
        **timing, "data": report, "seconds": round(time.time() - started, 1),
    }
    _write(out_dir, candidates, selection, metrics, rs.pairs, ctx.label, len(records))
    return metrics


# ---------------------------------------------------------------------------------------------
# Before sampling


def _check_section(rs, ctx: StageContext) -> None:
    """What the recipe loader also checks, for callers that build a config by hand."""
    if rs.pairs and rs.num_samples < 2:
        raise StageError(f"{ctx.label}: best/worst pairs need at least 2 samples per prompt "
                         f"({KEY}.num_samples is {rs.num_samples}); raise it or set pairs: false")
    if rs.system_prompts != [None]:
        raise StageError(f"{ctx.label}: {KEY}.system_prompts is not supported for vision prompts yet")


def _prompts(cfg: Recipe, ctx: StageContext) -> tuple[list[dict], list[dict], int]:
    """The vision_prompt records, one per prompt_id; the data report; how many repeats were dropped."""
    rs = cfg.vision.rejection_sampling
    loaded = load_sources(rs.prompts, "vision_prompt", cfg.bad_records, ctx.seed)
    logger.info("%s prompts:\n%s", ctx.label, format_report(loaded.report))
    records: dict[str, dict] = {}
    for record in loaded.records:
        seen = records.setdefault(record["prompt_id"], record)
        if seen["prompt"] != record["prompt"]:
            raise StageError(f"{ctx.label}: prompt_id {record['prompt_id']!r} names two different "
                             f"prompts in {KEY}.prompts; give them distinct ids")
    if not records:
        raise StageError(f"{ctx.label}: no prompts to sample from ({KEY}.prompts); add vision_prompt "
                         "records: an image and a question per line")
    return list(records.values()), list(loaded.report), len(loaded.records) - len(records)


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
        from alignloop.vision.reward import SCORE_FILE, load_reward_model
        from alignloop.vision.stage import (image_processor_for, is_mllama, load_vision_model,
                                            load_vision_tokenizer)

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
    """Every candidate row (without scores), in prompt order then sample index; timing."""
    rows: dict[str, list[dict]] = {r["prompt_id"]: [] for r in records}
    seconds = 0.0
    for group in groups:
        settings = {"n": group.n, "temperature": group.temperature, "top_p": rs.top_p,
                    "max_new_tokens": rs.max_new_tokens, "seed": group.seed}
        producer = {"backend": "transformers", "model": ctx.policy, **settings}
        start = time.time()
        for first in range(0, len(records), rs.batch_size):
            chunk = records[first:first + rs.batch_size]
            with torch.random.fork_rng(devices=[]):  # the same samples on a rerun, whatever ran before
                torch.manual_seed(group.seed + first)
                drawn = generate_samples(policy, tokenizer, collator(chunk), group.n,
                                         group.temperature, rs.top_p, rs.max_new_tokens)
            for record, samples in zip(chunk, drawn):
                rows[record["prompt_id"]] += [
                    _candidate(record, text, finish, group.first_k + j, producer, ctx.round)
                    for j, (text, finish) in enumerate(samples)]
        took = time.time() - start
        seconds += took
        logger.info("%s: T=%g: %d x %d samples in %.1f s", ctx.label, group.temperature,
                    len(records), group.n, took)
    candidates = [row for per_prompt in rows.values() for row in per_prompt]
    return candidates, {"generation_seconds": round(seconds, 2),
                        "samples_per_second": round(len(candidates) / seconds, 2) if seconds else None}


@torch.no_grad()
def generate_samples(policy, tokenizer, batch: dict, n: int, temperature: float, top_p: float,
                     max_new_tokens: int) -> list[list[tuple[str, str]]]:
    """`n` answers to each prompt of a left-padded vision_prompt batch through
    `MllamaForConditionalGeneration.generate` -> per prompt [(text, finish_reason)] * n, the
    reason "stop" (an end-of-turn token) or "length" (cut at max_new_tokens)."""
    batch = {k: v.to(policy.device) for k, v in batch.items() if k != "labels"}
    eos = policy.generation_config.eos_token_id or tokenizer.eos_token_id
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else \
        dict(do_sample=False, temperature=None, top_p=None)
    out = policy.generate(**batch, **sampling, num_return_sequences=n, max_new_tokens=max_new_tokens,
                          eos_token_id=eos, pad_token_id=tokenizer.pad_token_id, top_k=None)
    new = out[:, batch["input_ids"].shape[1]:].tolist()  # (B * n, new): prompt b's are rows b*n..
    eos_ids = set([eos] if isinstance(eos, int) else eos)
    answers = []
    for row in new:
        end = next((i for i, t in enumerate(row) if t in eos_ids), None)
        text = tokenizer.decode(row[:end] if end is not None else row, skip_special_tokens=True)
        answers.append((text.strip(), "stop" if end is not None else "length"))
    return [answers[b * n:(b + 1) * n] for b in range(len(new) // n)]


def _candidate(record: dict, text: str, finish: str, k: int, producer: dict, round_: int) -> dict:
    return {"prompt_id": record["prompt_id"], "sample_id": f"{record['prompt_id']}:{k}",
            "prompt": record["prompt"], "completion": text, "answer": record.get("answer"),
            "temperature": producer["temperature"], "finish_reason": finish, "scores": None,
            "generator": producer, "round": round_}


# ---------------------------------------------------------------------------------------------
# The kept rows: vision records that reference the prompt's image paths


def _assistant(text: str) -> dict:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def best_record(prompt: list[dict], best: dict, round_: int) -> dict:
    """A vision_chat record: the prompt (its images by path) + the best answer."""
    from alignloop.data.vision_records import validate_vision_record

    record = {"id": best["sample_id"], "messages": prompt + [_assistant(best["completion"])],
              "metadata": {"prompt_id": best["prompt_id"], "sample_id": best["sample_id"],
                           "score": _total(best), "round": round_, "source": "vision_rejection_sampling"}}
    return validate_vision_record(record, "vision_chat", check_images=False)


def pair_record(prompt: list[dict], best: dict, worst: dict, round_: int) -> dict:
    """A vision_preference record: best vs worst answer to one stored prompt."""
    from alignloop.data.vision_records import validate_vision_record

    record = {"prompt_id": best["prompt_id"], "prompt": prompt,
              "chosen": [_assistant(best["completion"])], "rejected": [_assistant(worst["completion"])],
              "metadata": {"chosen_sample_id": best["sample_id"], "chosen_score": _total(best),
                           "rejected_sample_id": worst["sample_id"], "rejected_score": _total(worst),
                           "round": round_, "source": "vision_rejection_sampling"}}
    return validate_vision_record(record, "vision_preference", check_images=False)
