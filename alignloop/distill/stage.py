"""Knowledge distillation: a student (the policy, e.g. a pruned model) learns a teacher's
next-token distributions (Llama 3.2 1B/3B from 8B and 70B logits; Minitron, arXiv 2407.14679 and
2408.11796). docs/pruning.md, "Distillation".

Top to bottom: the teachers (the recipe's model unless `distill.teachers` lists others), checked
to share the student's vocabulary before anything runs; the examples (`distill.data`, chat or
documents); optionally Minitron's teacher correction; with `distill.cache` each teacher's top-k
targets computed once into sharded files; then transformers' Trainer with the fused distillation
loss (alignloop/distill/trainer.py), resumed from the last checkpoint in `ctx.work_dir`.

    <out_dir>/model/          the student (or its LoRA adapter): safetensors + tokenizer
    <out_dir>/merged/         with method lora and merge: true, the adapter merged in
    <out_dir>/metrics.json    losses, KD and CE terms, steps, seconds, data, cache use
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from alignloop.config import Recipe
from alignloop.data.sources import format_report
from alignloop.distill.cache import TeacherCache
from alignloop.distill.data import Collator, Rows, build_examples
from alignloop.distill.teachers import (check_vocabulary, correct_teacher, load_teacher,
                                        teacher_paths)
from alignloop.distill.trainer import CachedTeacher, DistillTrainer, LiveTeacher, LossSettings
from alignloop.hardware import resolve_precision
from alignloop.kernels.fused_head import check_head
from alignloop.models.loading import load_model, load_tokenizer, lora_config, save_merged
from alignloop.options import LoraOptions
from alignloop.pipeline.context import StageContext
from alignloop.pipeline.errors import StageError
from alignloop.recipe_source import stage_where
from alignloop.training import (moe_aux_coef, prepare_moe, save_trained, tensorboard_logs,
                                training_arguments)

logger = logging.getLogger("alignloop.distill")


def run(cfg: Recipe, ctx: StageContext, out_dir: Path) -> dict:
    """Distils the teachers into `ctx.policy`; writes the artifacts above; returns the metrics."""
    with tensorboard_logs(ctx.log_dir):
        return _run(cfg, ctx, out_dir)


def _run(cfg: Recipe, ctx: StageContext, out_dir: Path) -> dict:
    from accelerate import PartialState

    from alignloop.checkpoints import last_checkpoint

    start, state, section = time.time(), PartialState(), cfg.distill
    tokenizer = load_tokenizer(cfg.model, ctx.policy)
    teachers = teacher_paths(cfg, ctx)
    for path, _ in teachers:  # before any data or model is loaded: a wrong teacher fails in seconds
        check_vocabulary(ctx.label, path, load_tokenizer(cfg.model, path), ctx.policy, tokenizer)
    if not section.data:
        raise StageError(f"{ctx.label}: no distillation data (set distill.data)")
    examples = build_examples(section, tokenizer, cfg.bad_records, cfg.seed)
    if not examples.rows:
        raise StageError(f"{ctx.label}: no example is left of distill.data after tokenizing")
    logger.info("distill data:\n%s", format_report(examples.report))

    precision = resolve_precision(cfg.precision)
    args = training_arguments(section, seed=cfg.seed, precision=precision,
                              output_dir=ctx.work_dir / "checkpoints")
    args.activation_checkpointing = _checkpointing(section, args, ctx.policy, precision)
    corrections = []
    if section.teacher_correction is not None:
        teachers, corrections = _corrected(cfg, ctx, teachers, examples.rows, tokenizer)
    trained_teachers, cache_report = _teachers(cfg, ctx, teachers, examples.rows, tokenizer, args.device)

    model = load_model(cfg, ctx.policy)
    where, coef = stage_where(cfg.source, ctx.label), moe_aux_coef(model, cfg.moe)
    problem = check_head(model)
    if problem:
        raise StageError(f"{ctx.label}: the student {ctx.policy}: {problem}")
    lora = (section.lora or LoraOptions()) if section.method == "lora" else None
    if lora:
        from peft import get_peft_model

        model.enable_input_require_grads()  # activation checkpointing with frozen embeddings
        model = get_peft_model(model, lora_config(lora, model=model, key="distill.lora", where=where))
    settings = LossSettings(section.loss, section.beta, section.temperature, section.alpha,
                            section.top_k, section.fused_loss, section.kernel)
    trainer = DistillTrainer(model=model, args=args, train_dataset=Rows(examples.rows),
                             data_collator=Collator(tokenizer.pad_token_id), teachers=trained_teachers,
                             loss=settings, aux_loss_coef=coef)
    moe = prepare_moe(trainer, lora, cfg.moe, key="distill.lora", where=where, coef=coef)
    last = last_checkpoint(args.output_dir)
    if last:
        logger.info("resuming distill from %s", last)
    result = trainer.train(resume_from_checkpoint=last)
    save_trained(trainer, tokenizer, out_dir / "model")
    history = trainer.state.log_history
    metrics = {
        "student": ctx.policy,
        "teachers": [{"path": p, "weight": w} for p, w in teachers],
        "loss": section.loss, "temperature": section.temperature, "alpha": section.alpha,
        "top_k": section.top_k, "method": section.method,
        "resumed_from": last,
        "train_loss": result.training_loss,
        "steps": result.global_step,
        "losses": [round(e["loss"], 4) for e in history if "loss" in e],
        "kd": [e["kd"] for e in history if "kd" in e],
        "ce": [e["ce"] for e in history if "ce" in e],
        "train_seconds": round(time.time() - start, 1),
        "data": examples.report,
        "examples": examples.stats,
        "cache": cache_report,
        "teacher_correction": corrections,
        **moe.metrics(trainer),
    }
    if state.is_main_process:
        if section.method == "lora" and section.merge:
            save_merged(cfg, out_dir / "model", ctx.policy, out_dir / "merged", tokenizer)
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
    state.wait_for_everyone()
    return metrics


def _corrected(cfg: Recipe, ctx: StageContext, teachers, rows, tokenizer):
    """Each teacher after Minitron's correction, kept in ctx.work_dir/corrected_teachers/<j>."""
    out, reports = [], []
    for j, (path, weight) in enumerate(teachers):
        target = ctx.work_dir / "corrected_teachers" / str(j)
        target.parent.mkdir(parents=True, exist_ok=True)
        corrected, report = correct_teacher(cfg, path, rows, tokenizer.pad_token_id, tokenizer, target)
        out.append((corrected, weight))
        reports.append(report)
    return out, reports


def _teachers(cfg: Recipe, ctx: StageContext, teachers, rows, tokenizer, device):
    """LiveTeacher per teacher, or with `distill.cache` a CachedTeacher whose shards are built
    here first (on the main process; one teacher in memory at a time). Returns (teachers, the
    cache report)."""
    from accelerate import PartialState

    section, state = cfg.distill, PartialState()
    if not section.cache:
        return [LiveTeacher(load_teacher(cfg, path, device), w) for path, w in teachers], None
    cache_dir = Path(section.cache_dir).expanduser() if section.cache_dir else ctx.work_dir / "teacher_cache"
    out, report = [], []
    for path, weight in teachers:
        cache = TeacherCache(cache_dir, teacher=path, rows=rows, tokenizer=tokenizer, k=section.top_k,
                             max_length=section.max_length, shard_examples=section.cache_shard_examples)
        with state.main_process_first():
            if state.is_main_process and cache.missing():
                model = load_teacher(cfg, path, device)
                kernel = section.kernel if section.kernel != "auto" else (
                    "triton" if model.device.type == "cuda" else "torch")
                built = cache.build(model, rows, tokenizer.pad_token_id, backend=kernel)
                del model  # one teacher in memory at a time
                _free_memory()
            else:
                built = {"shards": cache.shards, "reused": cache.shards - len(cache.missing()), "built": 0}
        report.append({"teacher": path, "key": cache.key, "dir": str(cache.root), **built})
        out.append(CachedTeacher(cache, weight))
    return out, report


def _free_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _checkpointing(section, args, model_path: str, precision: str) -> bool:
    """`activation_checkpointing`: as set, or for auto on when the student's activations for a
    micro-batch of max_length tokens would not fit comfortably (alignloop.models.memory)."""
    if section.activation_checkpointing != "auto":
        return bool(section.activation_checkpointing)
    from alignloop.models.memory import model_config, needs_checkpointing, parameter_count

    config = model_config(model_path)
    if config is None:
        return True
    dtype_bytes = 2 if precision in ("bf16", "fp16") else 4
    full = section.method == "full"
    weights = parameter_count(config) * (dtype_bytes + (12 if full else 0))
    return needs_checkpointing(config, args.per_device_train_batch_size * section.max_length,
                               dtype_bytes, lora=not full, fused_head=True, weights_bytes=weights)
