"""Supervised fine-tuning: chat records in, a fine-tuned model (or LoRA adapter) out.

The trainer is TRL's SFTTrainer. Our part: the data contract, the assistant-only labels (built
here, so TRL receives `input_ids` + `labels` and neither re-tokenizes nor re-masks), the model
in full / LoRA / QLoRA form, resume from the last checkpoint, and the artifacts:

    <out_dir>/model/          the full model, or the LoRA adapter (safetensors) + tokenizer
    <out_dir>/merged/         with `sft.merge: true`: the adapter merged into its base (HF format)
    <out_dir>/data.jsonl      the training records after mixing (normalised chat records)
    <out_dir>/metrics.json    losses, steps, timing, data and mask reports
"""

from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path

from alignloop.config import Recipe
from alignloop.data.masks import build_sft_dataset
from alignloop.data.readers import read_records, write_jsonl
from alignloop.data.splitting import split_dataset
from alignloop.data.sources import format_report, load_sources
from alignloop.hardware import resolve_precision
from alignloop.kernels import fused_head
from alignloop.models.averaging import average_checkpoints
from alignloop.models.loading import load_model, load_tokenizer, lora_config, save_merged
from alignloop.pipeline.context import StageContext
from alignloop.pipeline.errors import StageError
from alignloop.options import LoraOptions
from alignloop.recipe_source import stage_where
from alignloop.training import moe_aux_coef, prepare_moe, save_trained, tensorboard_logs, trl_config

logger = logging.getLogger("alignloop.sft")


def run(cfg: Recipe, ctx: StageContext, out_dir: Path) -> dict:
    """Trains and writes the artifacts above into `out_dir`; returns the metrics.

    Starts from `ctx.policy` (or `ctx.base` with `sft.start: base`). Trains on `sft.data`, the
    rejection-sampled best answers and synthetic examples named in `ctx.inputs`, and the safety
    mix. `ctx.work_dir` keeps the trainer's checkpoints: a run killed mid-training continues from
    the last one.
    """
    with tensorboard_logs(ctx.log_dir):
        return _run(cfg, ctx, out_dir)


def training_records(cfg: Recipe, ctx: StageContext) -> tuple[list[dict], list[dict]]:
    """The chat records this SFT trains on, shuffled, and one report entry per source.

    `sft.data` is mixed with the recipe's seed (the same examples every round); the rounds'
    best samples and synthetic examples come from `ctx.inputs`; safety examples are added so that
    they make up `safety.sft_ratio` of the whole (reference A8).
    """
    loaded = load_sources(cfg.sft.data, "chat", cfg.bad_records, cfg.seed) if cfg.sft.data else None
    records = list(loaded.records) if loaded else []
    report = list(loaded.report) if loaded else []
    for name in ("rs_best", "synthetic"):
        for path in ctx.inputs.get(name, []):
            rows = read_records(path, "chat").records
            records += rows
            report.append({"source": f"{name}:{path}", "read": len(rows), "skipped": 0,
                           "reasons": [], "used": len(rows)})
    if cfg.safety is not None:
        from alignloop.safety.mixing import safety_mix

        safety, safety_report = safety_mix(cfg, "chat", len(records), ctx.seed)
        records += safety
        report.append({"source": "safety", "read": len(safety), "skipped": 0, "reasons": [],
                       "used": len(safety), **safety_report})
    if not records:
        hint = ""
        if ctx.inputs.get("rs_best"):
            hint = ("; rejection sampling kept no sample (its metrics.json 'skipped' says why: "
                    "'all_failed' counts prompts where no sample passed the verifiers, so the "
                    "policy needs more round-0 training, more prompts or samples, or a lower "
                    "rejection_sampling.min_verifier_score)")
        raise StageError(f"{ctx.label}: no training examples (sft.data, rejection sampling and "
                         f"synthetic data are all empty){hint}")
    random.Random(ctx.seed).shuffle(records)
    return records, report


def _run(cfg: Recipe, ctx: StageContext, out_dir: Path) -> dict:
    from accelerate import PartialState
    from alignloop.checkpoints import last_checkpoint
    from trl import SFTTrainer

    start = time.time()
    state = PartialState()
    path = ctx.base if cfg.sft.start == "base" else ctx.policy
    tokenizer = load_tokenizer(cfg.model, path)
    args = trl_config("sft", cfg.sft, seed=cfg.seed, precision=resolve_precision(cfg.precision),
                      output_dir=ctx.work_dir / "checkpoints", model_path=path)

    records, report = training_records(cfg, ctx)
    logger.info("sft data:\n%s", format_report(report))
    train_set, mask_stats, split_stats = sft_dataset(cfg, records, tokenizer, args.max_length)
    eval_set = None
    if cfg.sft.eval_data:
        held_out = load_sources(cfg.sft.eval_data, "chat", cfg.bad_records, cfg.seed)
        eval_set, _, _ = sft_dataset(cfg, held_out.records, tokenizer, args.max_length)

    method = cfg.sft.method
    model = load_model(cfg, path, quantize=method == "qlora", quantization=cfg.sft.quantization)
    fused = fused_head.wanted(cfg.sft.fused_loss, args.max_length, fused_head.vocab_size(model))
    if args.padding_free and not args.packing:
        # the examples are truncated or split above; TRL refuses a max_length it cannot enforce
        args.max_length = None
    # LoRA targets resolved on the model (MoE: attention + experts; docs/moe.md), audited after
    lora = (cfg.sft.lora or LoraOptions()) if method != "full" else None
    where = stage_where(cfg.source, ctx.label)
    peft = lora_config(lora, model=model, key="sft.lora", where=where) if lora else None
    coef = moe_aux_coef(model, cfg.moe, args)
    trainer = SFTTrainer(model=model, args=args, train_dataset=train_set, eval_dataset=eval_set,
                         processing_class=tokenizer, peft_config=peft)
    moe = prepare_moe(trainer, lora, cfg.moe, key="sft.lora", where=where, coef=coef)
    if fused:  # our fused linear + cross-entropy in place of TRL's LM head (docs/long_context.md)
        fused_head.install(trainer.model)
    last = last_checkpoint(args.output_dir)
    if last:
        logger.info("resuming sft from %s", last)
    result = trainer.train(resume_from_checkpoint=last)
    averaged = average_checkpoints(trainer, cfg.sft.average_checkpoints)

    save_trained(trainer, tokenizer, out_dir / "model")
    metrics = {
        "method": method,
        "base_model": path,
        "resumed_from": last,
        "world_size": state.num_processes,
        "train_loss": result.training_loss,
        "steps": result.global_step,
        "losses": [round(e["loss"], 4) for e in trainer.state.log_history if "loss" in e],
        "train_seconds": round(time.time() - start, 1),
        "data": report,
        "averaged": averaged,
        "masks": vars(mask_stats),
        "fused_loss": fused,
        **moe.metrics(trainer),
    }
    if split_stats is not None:
        metrics["split"] = vars(split_stats)
    if args.packing:
        metrics["packing"] = packing_report(trainer.train_dataset)
    if eval_set is not None:
        metrics["eval"] = trainer.evaluate()
    if state.is_main_process:
        write_jsonl(out_dir / "data.jsonl", records)
        if method != "full" and (cfg.sft.merge or ctx.merge):
            save_merged(cfg, out_dir / "model", path, out_dir / "merged", tokenizer)
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
    state.wait_for_everyone()
    return metrics


def sft_dataset(cfg: Recipe, records: list[dict], tokenizer, max_length: int | None):
    """(dataset, MaskStats, SplitStats or None): records tokenized with assistant-only labels,
    long ones truncated to `max_length` or split into windows (`sft.long_examples`)."""
    if cfg.sft.long_examples == "truncate" or max_length is None:
        return (*build_sft_dataset(records, tokenizer, max_length, cfg.sft.empty_mask), None)
    whole, mask_stats = build_sft_dataset(records, tokenizer, None, cfg.sft.empty_mask)
    dataset, split_stats = split_dataset(whole, max_length, cfg.sft.split_overlap)
    if split_stats.skipped_windows:
        logger.info("split %d long example(s) into windows; skipped %d window(s) without an "
                    "assistant token", split_stats.examples_split, split_stats.skipped_windows)
    return dataset, mask_stats, split_stats


def packing_report(packed) -> dict:
    """What TRL's packing made of the examples: sequences, documents and loss tokens in them.

    `label_tokens` must equal the assistant tokens before packing: packing that drops or adds
    loss tokens would change what the model learns.
    """
    documents = sum(len(lengths) for lengths in packed["seq_lengths"])
    labels = sum(sum(token != -100 for token in row) for row in packed["labels"])
    return {"sequences": len(packed), "documents": documents, "label_tokens": labels}
