"""The vision training stages: adapter pretraining, vision SFT, the vision reward model and
vision DPO (Llama 3 §7.4-7.5, reference C1). One entry function per stage, with the pipeline's
stage contract `run(cfg, ctx, out_dir) -> metrics` (alignloop.pipeline.runner runs them like
the text stages; rejection sampling is alignloop.vision.rejection_sampling.run):

    adapter   vision.adapter   image-text or vision chat data; the language model stays frozen
    sft       vision.sft       vision chat data (+ what rejection sampling kept, ctx.inputs["rs_best"])
    reward    vision.reward    preference pairs -> a score head (alignloop.vision.reward)
    dpo       vision.dpo       preference pairs (+ ctx.inputs["rs_pairs"]), reference = the start

Each writes:

    <out_dir>/model/         the model in HF Mllama format (+ tokenizer, image processor; the
                             reward model also score.safetensors; Llama 3-V its own layout)
    <out_dir>/data.jsonl     the records trained on
    <out_dir>/metrics.json   losses, steps, timing, what was trained

The trainer is transformers' `Trainer` (alignloop.vision.trainer); our part is the model
(loaded, frozen, LoRA: alignloop.vision.loading), the data (alignloop.vision.data's collator)
and the artifacts. `ctx.policy` is an Mllama checkpoint, or for the first stage of a
`start: new` recipe the text model, which gets a fresh adapter.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from alignloop.config import Recipe
from alignloop.data.readers import write_jsonl
from alignloop.data.sources import format_report, load_sources
from alignloop.hardware import resolve_precision
from alignloop.pipeline.context import StageContext
from alignloop.pipeline.errors import StageError
from alignloop.training import tensorboard_logs, training_arguments
from alignloop.vision.config import VisionTrainSection
from alignloop.vision.loading import (image_processor_for, is_llama3v_model, load_vision_model,
                                      load_vision_tokenizer, save_vision_model)
from alignloop.vision.trainer import (AdapterTrainer, VisionDPOTrainer, VisionRewardTrainer, WithReference,
                                      finish_training, prepare_for_training, with_reference_logprobs)

logger = logging.getLogger("alignloop.vision")


def adapter(cfg: Recipe, ctx: StageContext, out_dir: Path) -> dict:
    """Adapter pretraining (`vision.adapter`): encoder, projector, cross-attention layers and the
    image token's rows train on image-text pairs while the language model stays frozen."""
    return _supervised(cfg, ctx, cfg.vision.adapter, out_dir)


def sft(cfg: Recipe, ctx: StageContext, out_dir: Path) -> dict:
    """Vision SFT (`vision.sft`) on vision chat records and the samples rejection sampling kept."""
    return _supervised(cfg, ctx, cfg.vision.sft, out_dir)


def dpo(cfg: Recipe, ctx: StageContext, out_dir: Path) -> dict:
    """Vision DPO (`vision.dpo`): the sigmoid loss plus the NLL term on the chosen answers, the
    reference being the model the stage starts from (its log-probs computed once, before
    training)."""
    section, started = cfg.vision.dpo, time.time()
    with tensorboard_logs(ctx.log_dir):
        parts, records, report = _start(cfg, ctx, section)
        tokenizer, model, processor = parts
        trained = prepare_for_training(model, section, ctx.seed)
        args = training_arguments(section, seed=cfg.seed, precision=resolve_precision(cfg.precision),
                                  output_dir=ctx.work_dir / "checkpoints")
        collator, cached = _collator(cfg, section, parts, records)
        records = with_reference_logprobs(model, records, collator, args.per_device_train_batch_size)
        trainer = VisionDPOTrainer(model=model, args=args, train_dataset=records,
                                   data_collator=WithReference(collator), beta=section.beta,
                                   nll_weight=section.nll_weight,
                                   nll_normalization=section.nll_normalization)
        result, last = _train(trainer, ctx)
        model = finish_training(model)
        _save(parts, model, out_dir, [{k: v for k, v in r.items() if k != "_reference"} for r in records])
        return _metrics(out_dir, ctx, trainer, result, last, started, report,
                        {"trained": trained, **cached})


def reward(cfg: Recipe, ctx: StageContext, out_dir: Path) -> dict:
    """The vision reward model (`vision.reward`): a score head with the encoder and cross-attention
    layers training (self-attention frozen); model/ gets score.safetensors beside the Mllama
    weights, and metrics.json the held-out pairwise accuracy before and after training
    (`eval_data`, else the first 256 training pairs)."""
    from alignloop.vision.data import VisionCollator
    from alignloop.vision.reward import (VisionRewardModel, load_text_reward_model, pairwise_accuracy,
                                         save_score)

    section, started = cfg.vision.reward, time.time()
    with tensorboard_logs(ctx.log_dir):
        parts, records, report = _start(cfg, ctx, section)
        tokenizer, vision, processor = parts
        model = VisionRewardModel(vision)
        if section.text_reward_model:
            load_text_reward_model(model, section.text_reward_model)
        trained = prepare_for_training(vision, section, ctx.seed)
        if "score" in section.train:
            model.score.weight.requires_grad_(True)
            trained["score"] = model.score.weight.numel()
        args = training_arguments(section, seed=cfg.seed, precision=resolve_precision(cfg.precision),
                                  output_dir=ctx.work_dir / "checkpoints")
        collator = VisionCollator(tokenizer, processor, "vision_preference", section.max_length)
        held_out = (list(load_sources(section.eval_data, "vision_preference", cfg.bad_records,
                                      ctx.seed).records) if section.eval_data else records[:256])
        before = pairwise_accuracy(model, held_out, collator, args.per_device_eval_batch_size)
        trainer = VisionRewardTrainer(model=model, args=args, train_dataset=records,
                                      data_collator=collator, penalty=section.penalty)
        result, last = _train(trainer, ctx)
        after = pairwise_accuracy(model, held_out, collator, args.per_device_eval_batch_size)
        finish_training(vision)
        _save(parts, vision, out_dir, records)
        save_score(model, out_dir / "model")
        return _metrics(out_dir, ctx, trainer, result, last, started, report, {
            "accuracy_before": before, "accuracy": after, "eval_pairs": len(held_out),
            "held_out": bool(section.eval_data), "trained": trained})


def _supervised(cfg: Recipe, ctx: StageContext, section: VisionTrainSection, out_dir: Path) -> dict:
    """adapter and sft: next-token loss on the answers (or captions), frozen LM unless `lora`."""
    started = time.time()
    with tensorboard_logs(ctx.log_dir):
        parts, records, report = _start(cfg, ctx, section)
        model = parts[1]
        trained = prepare_for_training(model, section, ctx.seed)
        args = training_arguments(section, seed=cfg.seed, precision=resolve_precision(cfg.precision),
                                  output_dir=ctx.work_dir / "checkpoints")
        collator, cached = _collator(cfg, section, parts, records)
        trainer = AdapterTrainer(model=model, args=args, train_dataset=records, data_collator=collator)
        result, last = _train(trainer, ctx)
        model = finish_training(model)
        _save(parts, model, out_dir, records)
        return _metrics(out_dir, ctx, trainer, result, last, started, report,
                        {"trained": trained, **cached})


# ---------------------------------------------------------------------------------------------
# The steps every vision stage takes


def _start(cfg: Recipe, ctx: StageContext, section):
    """((tokenizer, model, image processor) of `ctx.policy`, the training records, their report)."""
    tokenizer = load_vision_tokenizer(cfg, ctx.policy)
    model = load_vision_model(cfg, ctx.policy, tokenizer)
    processor = image_processor_for(cfg, model)
    records, report = _records(cfg, section, ctx)
    logger.info("%s data:\n%s", ctx.label, format_report(report))
    return (tokenizer, model, processor), records, report


def _records(cfg: Recipe, section: VisionTrainSection, ctx: StageContext) -> tuple[list[dict], list]:
    """The section's data, plus what vision rejection sampling kept for this stage (`ctx.inputs`:
    "rs_best" vision_chat records for sft, "rs_pairs" vision_preference records for dpo)."""
    from alignloop.data.readers import read_records

    records, report = [], []
    if section.data:
        loaded = load_sources(section.data, section.kind, cfg.bad_records, ctx.seed)
        records, report = list(loaded.records), list(loaded.report)
    name = {"vision_chat": "rs_best", "vision_preference": "rs_pairs"}.get(section.kind)
    for path in ctx.inputs.get(name, []) if name else []:
        rows = read_records(path, section.kind).records
        records += rows
        report.append({"source": f"{name}:{path}", "read": len(rows), "skipped": 0, "reasons": [],
                       "used": len(rows)})
    if not records:
        phase = ctx.name.removeprefix("vision_")
        raise StageError(f"{ctx.label}: no training data (vision.{phase}.data is empty or every "
                         "record was skipped, and rejection sampling kept nothing for it)")
    return records, report


def _collator(cfg: Recipe, section: VisionTrainSection, parts, records: list[dict]):
    """(the batches for `section`, what the Llama 3-V feature cache did)."""
    from alignloop.vision.data import VisionCollator

    tokenizer, model, processor = parts
    if is_llama3v_model(model):
        return llama3v_collator(cfg, section, parts, records)
    return VisionCollator(tokenizer, processor, section.kind, section.max_length), {}


def llama3v_collator(cfg: Recipe, section: VisionTrainSection, parts, records: list[dict]):
    """The Llama 3-V batches for `section`, and what the feature cache did. With
    `vision.llama3v.cache_features` the frozen encoder's features of every image in `records`
    are computed once into the cache (images already there are not encoded again, e.g. in the
    stage after the adapter stage) and batches carry them as `image_features`: training never
    runs the encoder."""
    from alignloop.data.vision_records import image_paths
    from alignloop.vision.llama3v import CachedFeatures, FeatureCache, Llama3VCollator

    tokenizer, model, processor = parts
    options = cfg.vision.llama3v
    collator = Llama3VCollator(tokenizer, processor, model.image_tokens, section.kind,
                               section.max_length, pixels=not options.cache_features)
    if not options.cache_features:  # live pixel_values; the model takes no image_keys
        return lambda records: {k: v for k, v in collator(records).items() if k != "image_keys"}, {}
    cache = FeatureCache(options.cache_dir or Path(cfg.output_dir) / "feature_cache", model.encoder,
                         processor)
    paths = [path for record in records for path in image_paths(record)]
    started = time.time()
    computed = cache.precompute(paths)
    logger.info("feature cache %s: %d image(s) encoded, %d already there (%.1f s)", cache.dir,
                computed, len(set(paths)) - computed, time.time() - started)
    return CachedFeatures(collator, cache), {
        "feature_cache": str(cache.dir), "features_computed": computed,
        "features_seconds": round(time.time() - started, 1)}


def _train(trainer, ctx: StageContext):
    """Trains, resuming from the newest complete checkpoint in ctx.work_dir; (result, that checkpoint)."""
    from alignloop.checkpoints import last_checkpoint

    last = last_checkpoint(trainer.args.output_dir)
    if last:
        logger.info("resuming %s from %s", ctx.label, last)
    return trainer.train(resume_from_checkpoint=last), last


def _save(parts, model, out_dir: Path, records: list[dict]) -> None:
    tokenizer, _, processor = parts
    out_dir.mkdir(parents=True, exist_ok=True)
    save_vision_model(model, tokenizer, processor, out_dir / "model")
    write_jsonl(out_dir / "data.jsonl", records)


def _metrics(out_dir: Path, ctx: StageContext, trainer, result, last, started: float, report,
             extra: dict) -> dict:
    metrics = {
        "stage": ctx.name, "start_model": ctx.policy, "resumed_from": last,
        "train_loss": result.training_loss, "steps": result.global_step,
        "losses": [round(e["loss"], 4) for e in trainer.state.log_history if "loss" in e],
        **extra, "train_seconds": round(time.time() - started, 1), "data": report,
    }
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
    return metrics
