"""Synthetic Q&A: a generator writes questions and answers from seed documents or prompts, which
are parsed, filtered by rules and quality, and deduplicated (reference A6, A7; docs/synth_data.md).

    documents --qa_from_document--> "Q: ... / A: ..." --parse_qa-----> (question, answer) pairs
    prompts   --answer_prompt-----> an answer ---------parse_answer--> (seed prompt, answer)
    pairs -> rule_filter -> scoring (reward model, verifiers) -> score_filter -> deduplicate
          -> keep_top -> chat records

Artifacts in `out_dir`:

    data.jsonl     chat records {"id", "messages", "metadata": {"provenance": {source, sample,
                   generator, template, scores, scorer, round}}}: what SFT reads as "synthetic"
    dropped.jsonl  every output or pair that was not kept: category (malformed, filtered,
                   duplicate), reason, the seed it came from and its text
    metrics.json   seeds, generated, parsed, malformed {reason: n}, filtered {reason: n},
                   duplicates {exact, near}, kept, the seed sources, the generator, timing

Nothing is written until everything is decided: a StageError (no seeds, no reward model to score
with, nothing kept) leaves `out_dir` untouched; metrics.json is written last.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

from alignloop.config import Recipe
from alignloop.data.readers import write_jsonl
from alignloop.generation.backends import SamplingSettings, open_generator
from alignloop.manifest import write_json
from alignloop.pipeline.context import StageContext
from alignloop.pipeline.errors import StageError
from alignloop.synth_data.config import SynthDataConfig
from alignloop.synth_data.parsing import parse_answer, parse_qa
from alignloop.synth_data.seeds import Seed, load_seeds
from alignloop.synth_data.selection import (Candidate, Drop, deduplicate, keep_top, rule_filter,
                                            score_filter)
from alignloop.synth_data.templates import Template, resolve_template

logger = logging.getLogger("alignloop.synth_data")


def run(cfg: Recipe, ctx: StageContext, out_dir: Path) -> dict:
    """Generates, selects and writes the artifacts above into `out_dir`; returns the metrics."""
    start = time.time()
    section = cfg.synth_data
    seeds, report = load_seeds(section.documents, section.prompts, cfg.bad_records, ctx.seed)
    if not seeds:
        raise StageError(f"{ctx.label}: no seeds: synth_data.documents and synth_data.prompts gave "
                         f"no usable records ({_sources(report)})")
    scorer = _reward_scorer(cfg, ctx)  # loaded before generating: a bad one fails early
    _check_verifiers(section, ctx)
    templates = {kind: resolve_template(getattr(section, f"{kind}_template"), kind)
                 for kind in ("document", "prompt")}
    settings = SamplingSettings(n=section.samples_per_seed, max_new_tokens=section.max_new_tokens,
                                temperature=section.temperature, top_p=section.top_p, seed=ctx.seed)
    requests = [generator_messages(seed, templates[seed.kind], section) for seed in seeds]
    outputs, generator = _generate(cfg, ctx, requests, settings)

    candidates, malformed = parse_outputs(seeds, outputs, section)
    parsed = len(candidates)
    candidates, short = rule_filter(candidates, section.min_answer_length,
                                    section.max_answer_length, section.length_unit)
    _score(candidates, section, scorer, ctx)
    candidates, low = score_filter(candidates, section.min_verifier_score, section.min_score)
    candidates, duplicates = deduplicate(candidates, section.near_duplicate_threshold,
                                         section.shingle_size)
    kept, below = keep_top(candidates, section.top_fraction)

    drops = short + low + below
    metrics = {
        "seeds": len(seeds), "generated": sum(len(group) for group in outputs), "parsed": parsed,
        "malformed": dict(Counter(row["reason"] for row in malformed)),
        "filtered": dict(Counter(d.reason for d in drops)),
        "duplicates": {"exact": sum(d.reason == "exact_duplicate" for d in duplicates),
                       "near": sum(d.reason == "near_duplicate" for d in duplicates)},
        "kept": len(kept),
        "data": report, "generator": generator,
        "templates": {kind: t.name for kind, t in templates.items()},
    }
    if not kept:
        raise StageError(f"{ctx.label}: no synthetic example was kept: {_counts(metrics)}. "
                         f"For example: {_examples(malformed, drops + duplicates)}. Raise "
                         "max_new_tokens, loosen the filters, or use a generator that follows the "
                         "template")
    provenance = {"generator": generator, "scorer": _scorer(section, ctx), "round": ctx.round}
    rows = [chat_row(c, templates[c.seed.kind], provenance) for c in kept]
    dropped = malformed + [dropped_row(d, category) for category, group in
                           (("filtered", drops), ("duplicate", duplicates)) for d in group]
    metrics["seconds"] = round(time.time() - start, 1)
    logger.info("synth_data: %s", _counts(metrics))

    out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(out_dir / "data.jsonl", rows)
    write_jsonl(out_dir / "dropped.jsonl", dropped)
    write_json(out_dir / "metrics.json", metrics)
    return metrics


def generator_messages(seed: Seed, template: Template, section: SynthDataConfig) -> list[dict]:
    """The chat prompt the generator sees for one seed.

    A document fills the template's {document}, {title} and {n}; a prompt's last user turn
    fills {prompt}, after its earlier turns. `system_prompt` replaces a seed's own system
    message for generation (the written row keeps the seed's).
    """
    system = [{"role": "system", "content": section.system_prompt}] if section.system_prompt else []
    record = seed.record
    if seed.kind == "document":
        content = template.render(document=record["text"], title=record.get("title", ""),
                                  n=section.pairs_per_document)
        return system + [{"role": "user", "content": content}]
    turns = [m for m in record["prompt"] if not (system and m["role"] == "system")]
    return system + turns[:-1] + [{"role": "user", "content": template.render(prompt=turns[-1]["content"])}]


def parse_outputs(seeds: list[Seed], outputs: list[list], section: SynthDataConfig
                  ) -> tuple[list[Candidate], list[dict]]:
    """Candidates from each seed's samples (objects with `text` and `finish_reason`), and one
    dropped.jsonl row per malformed piece.

    A seed listed twice (a source weight > 1, or one id in two sources) numbers its samples on
    from its first listing, so candidate ids `<seed id>:<sample>:<pair>` stay unique.
    """
    candidates, malformed, listed = [], [], Counter()
    for seed, samples in zip(seeds, outputs, strict=True):
        first = listed[seed.id] * section.samples_per_seed
        listed[seed.id] += 1
        parse = parse_qa if seed.kind == "document" else parse_answer
        for k, sample in enumerate(samples, start=first):
            pairs, problems = parse(sample.text, sample.finish_reason, section.answer_pattern)
            malformed += [{"category": "malformed", "reason": reason, "seed": _seed_ref(seed),
                           "sample": k, "text": text} for reason, text in problems]
            for j, (question, answer) in enumerate(pairs):
                candidates.append(_candidate(seed, k, j, question, answer, section))
    return candidates, malformed


def _candidate(seed: Seed, sample: int, pair: int, question: str | None, answer: str,
               section: SynthDataConfig) -> Candidate:
    if seed.kind == "prompt":  # the answer to the seed prompt as it is
        prompt = seed.record["prompt"]
        question = prompt[-1]["content"]
    else:
        content = f"{seed.record['text']}\n\n{question}" if section.include_document else question
        prompt = [{"role": "user", "content": content}]
    return Candidate(id=f"{seed.id}:{sample}:{pair}", seed=seed, sample=sample, question=question,
                     answer=answer, prompt=prompt)


def chat_row(c: Candidate, template: Template, provenance: dict) -> dict:
    """A kept candidate as a chat record, with what produced it."""
    return {"id": f"synth-r{provenance['round']}:{c.id}",
            "messages": c.prompt + [{"role": "assistant", "content": c.answer}],
            "metadata": {"provenance": {"source": _seed_ref(c.seed), "sample": c.sample,
                                        "template": template.name, "scores": c.scores,
                                        **provenance}}}


def dropped_row(d: Drop, category: str) -> dict:
    c = d.candidate
    row = {"category": category, "reason": d.reason, "id": c.id, "seed": _seed_ref(c.seed),
           "sample": c.sample, "question": c.question, "answer": c.answer, "scores": c.scores}
    if d.duplicate_of is not None:
        row.update(duplicate_of=d.duplicate_of, similarity=d.similarity)
    return row


def _generate(cfg: Recipe, ctx: StageContext, requests: list[list[dict]],
              settings: SamplingSettings) -> tuple[list[list], dict]:
    """The generator's samples per request, and what produced them (backend, model, sampling)."""
    from alignloop.models.loading import dtype_name, weights_dtype

    section = cfg.synth_data
    model_dir = ctx.policy if section.generator == "policy" else section.generator
    with open_generator(cfg.generation, model_dir, dtype=dtype_name(weights_dtype(cfg))) as gen:
        outputs = gen.generate(requests, settings)
        generator = {**gen.describe(), "sampling": asdict(settings)}
    if len(outputs) != len(requests):
        raise StageError(f"{ctx.label}: the generator returned {len(outputs)} groups of samples "
                         f"for {len(requests)} prompts")
    return outputs, generator


def _reward_scorer(cfg: Recipe, ctx: StageContext):
    """The round's reward model as a RewardScorer (on the CPU until the generator is done), its
    tokenizer checked against the policy's, or None when `scoring.reward_model` has no weight.
    StageError when there is none, or it fails."""
    if cfg.synth_data.scoring.reward_model == 0:
        return None
    if ctx.reward_model is None:
        raise StageError(f"{ctx.label}: synth_data.scoring.reward_model has a weight but this round "
                         "has no reward model (add a reward stage, or set the weight to 0)")
    from alignloop.models.loading import weights_dtype
    from alignloop.reward.scoring import RewardScorer

    return RewardScorer.for_policy(ctx.reward_model, ctx.policy, weights_dtype(cfg), ctx.label)


def _check_verifiers(section: SynthDataConfig, ctx: StageContext) -> None:
    from alignloop.reward.verifiers import resolve_verifier

    for name in section.scoring.verifiers:
        try:
            resolve_verifier(name)
        except ValueError as err:
            raise StageError(f"{ctx.label}: synth_data.scoring.verifiers: {err}") from err


def _score(candidates: list[Candidate], section: SynthDataConfig, scorer, ctx: StageContext) -> None:
    """Sets each candidate's scores: the reward model's and the verifiers' (score_responses),
    judged on the prompt of the row that will be written."""
    import torch

    from alignloop.reward.scoring import score_responses

    if not candidates:
        return
    if scorer is not None and torch.cuda.is_available():
        scorer.model.to("cuda")  # the generator has let go of the GPU
    records = [{"prompt_id": c.seed.id, "prompt": c.prompt,
                **{k: c.seed.record[k] for k in ("answer", "metadata") if k in c.seed.record}}
               for c in candidates]
    try:
        scores = score_responses(records, [c.answer for c in candidates], section.scoring, scorer)
    except ValueError as err:  # a verifier that fails or returns something other than a number
        raise StageError(f"{ctx.label}: scoring synthetic answers: {err}") from err
    for c, score in zip(candidates, scores):
        c.scores = score


def _scorer(section: SynthDataConfig, ctx: StageContext) -> dict:
    return {"reward_model": str(ctx.reward_model) if section.scoring.reward_model > 0 else None,
            "weights": section.scoring.model_dump()}


def _seed_ref(seed: Seed) -> dict:
    return {"kind": seed.kind, "name": seed.source, "id": seed.id}


def _sources(report: list[dict]) -> str:
    return "; ".join(f"{e['source']}: read {e['read']}, skipped {e['skipped']}" for e in report) \
        or "no sources"


def _counts(metrics: dict) -> str:
    return (f"{metrics['seeds']} seeds, {metrics['generated']} outputs, {metrics['parsed']} pairs "
            f"parsed, malformed {metrics['malformed']}, filtered {metrics['filtered']}, "
            f"duplicates {metrics['duplicates']}, kept {metrics['kept']}")


def _examples(malformed: list[dict], drops: list[Drop], limit: int = 3) -> str:
    shown = [f"{row['reason']} ({row['text'][:60]!r})" for row in malformed[:limit]]
    shown += [f"{d.reason} ({d.candidate.answer[:60]!r})" for d in drops[:limit - len(shown)]]
    return "; ".join(shown)


