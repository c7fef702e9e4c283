"""DPO as in Llama 3 (reference A5): preference pairs in, a refined policy (or LoRA adapter) out.

The trainer is TRL's DPOTrainer: sigmoid loss with beta 0.1 plus an NLL term on the chosen
response (weight `dpo.nll_weight`, 0.2 in Llama 3; TRL loss types ["sigmoid", "sft"], set by
`alignloop.training.trl_config`). Our part: the pairs (the user's pairs and rankings, the round's
rejection-sampling pairs, safety pairs), the formatting-token mask (`alignloop.dpo.masking`, applied
in `alignloop.dpo.trainer`), the reference model (the model DPO starts from), resume, and:

    <out_dir>/model/          the full model, or the LoRA adapter (safetensors) + tokenizer
    <out_dir>/merged/         with `dpo.merge` (or when a later stage starts from it): adapter merged
    <out_dir>/data.jsonl      the preference pairs trained on
    <out_dir>/metrics.json    losses and their terms, rewards / margins / accuracies from TRL's
                              logs, chosen and rejected log-probs before and after, steps, timing
"""

from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path

from alignloop.config import Recipe
from alignloop.data.contracts import ranking_to_pairs
from alignloop.data.readers import read_records, write_jsonl
from alignloop.data.sources import format_report, load_sources
from alignloop.dpo.masking import formatting_ids, formatting_positions
from alignloop.hardware import resolve_precision
from alignloop.models.averaging import average_checkpoints
from alignloop.pipeline.context import StageContext
from alignloop.pipeline.errors import StageError
from alignloop.options import LoraOptions
from alignloop.recipe_source import stage_where
from alignloop.training import prepare_moe, save_trained, tensorboard_logs, trl_config

logger = logging.getLogger("alignloop.dpo")

# What metrics.json keeps of each of TRL's training log entries.
LOGGED = ("loss", "loss/dpo", "loss/nll", "rewards/chosen", "rewards/rejected", "rewards/margins",
          "rewards/accuracies", "logps/chosen", "logps/rejected", "learning_rate", "aux_loss",
          "moe/load_cv")
PROBE_PAIRS = 64  # pairs whose log-probs are measured before and after training


def run(cfg: Recipe, ctx: StageContext, out_dir: Path) -> dict:
    """Trains from `ctx.policy` and writes the artifacts above into `out_dir`; returns the metrics.

    Raises StageError, before writing anything, when there are no pairs or the tokenizer has no
    formatting tokens to mask. `ctx.work_dir` keeps the checkpoints: a killed run resumes.
    """
    with tensorboard_logs(ctx.log_dir):
        return _run(cfg, ctx, out_dir)


def preference_pairs(cfg: Recipe, ctx: StageContext) -> tuple[list[dict], list[dict]]:
    """The preference records DPO trains on, shuffled, and one report entry per source.

    `dpo.data` is read as rankings (a preference record is a ranking of two; Llama 3's
    edited > chosen > rejected gives three pairs); the rejection-sampling pairs that the pipeline
    chose for this round (`dpo.pairs`) come from `ctx.inputs`; safety pairs are mixed in last.
    """
    records, report = [], []
    if cfg.dpo.data:
        loaded = load_sources(cfg.dpo.data, "ranking", cfg.bad_records, cfg.seed)
        records = [pair for ranking in loaded.records for pair in ranking_to_pairs(ranking)]
        report = list(loaded.report)
    for path in ctx.inputs.get("rs_pairs", []):
        read = read_records(path, "preference", cfg.bad_records)
        records += read.records
        report.append({"source": f"rs_pairs:{path}", "read": len(read.records),
                       "skipped": read.skipped, "reasons": read.reasons, "used": len(read.records)})
    if cfg.safety is not None:
        from alignloop.safety.mixing import safety_mix  # only recipes with a safety section need it

        safety, safety_report = safety_mix(cfg, kind="preference", main_count=len(records),
                                           seed=ctx.seed)
        records += safety
        report.append({"source": "safety", "read": len(safety), "skipped": 0, "reasons": [],
                       "used": len(safety), **safety_report})
    if not records:
        raise StageError(f"{ctx.label}: no preference pairs (dpo.data, the rejection-sampling "
                         "pairs and the safety pairs are all empty); add dpo.data or a "
                         "rejection_sampling stage with pairs before dpo")
    random.Random(ctx.seed).shuffle(records)
    return records, report


def pairs_dataset(records: list[dict], work_dir: Path):
    """prompt/chosen/rejected conversations as a `datasets.Dataset` backed by a file in work_dir.

    A file-backed dataset has a fingerprint that every process computes alike, which TRL's
    precomputed reference log-probs need to share one cache file across processes.
    """
    from accelerate import PartialState
    from datasets import load_dataset

    state, path = PartialState(), work_dir / "pairs.jsonl"
    if state.is_main_process:
        write_jsonl(path, ({k: r[k] for k in ("prompt", "chosen", "rejected")} for r in records))
    state.wait_for_everyone()
    with state.main_process_first():
        return load_dataset("json", data_files=str(path), split="train",
                            cache_dir=str(work_dir / "datasets"))


def _run(cfg: Recipe, ctx: StageContext, out_dir: Path) -> dict:
    from accelerate import PartialState
    from alignloop.checkpoints import last_checkpoint

    from alignloop.dpo.trainer import completion_log_probs, make_trainer
    from alignloop.kernels import fused_head
    from alignloop.models.loading import load_tokenizer, save_merged

    start, state, section = time.time(), PartialState(), cfg.dpo
    records, report = preference_pairs(cfg, ctx)
    logger.info("dpo pairs:\n%s", format_report(report))
    tokenizer = load_tokenizer(cfg.model, ctx.policy)
    if section.mask_formatting_tokens and formatting_ids(tokenizer).empty:
        raise StageError(f"{ctx.label}: the tokenizer of {ctx.policy} has none of the Llama 3 "
                         "or ChatML formatting tokens (<|start_header_id|>, <|eot_id|>, "
                         "<|im_start|>, <|im_end|>, ...) to mask; set "
                         "dpo.mask_formatting_tokens: false for another chat format")
    ctx.work_dir.mkdir(parents=True, exist_ok=True)
    args = trl_config("dpo", section, seed=cfg.seed, precision=resolve_precision(cfg.precision),
                      output_dir=ctx.work_dir / "checkpoints", model_path=ctx.policy)
    where = stage_where(cfg.source, ctx.label)
    trainer = make_trainer(cfg, ctx.policy, tokenizer, pairs_dataset(records, ctx.work_dir), args, where)
    lora = (section.lora or LoraOptions()) if section.method != "full" else None
    moe = prepare_moe(trainer, lora, cfg.moe, key="dpo.lora", where=where,
                      coef=args.router_aux_loss_coef)
    if len(trainer.train_dataset) == 0:
        raise StageError(f"{ctx.label}: every prompt is longer than dpo.max_length="
                         f"{args.max_length}; raise it or shorten the prompts")

    before = completion_log_probs(trainer, trainer.train_dataset, PROBE_PAIRS)
    last = last_checkpoint(args.output_dir)
    if last:
        logger.info("resuming dpo from %s", last)
    result = trainer.train(resume_from_checkpoint=last)
    averaged = average_checkpoints(trainer, section.average_checkpoints)
    after = completion_log_probs(trainer, trainer.train_dataset, PROBE_PAIRS)

    history = trainer.state.log_history
    metrics = {
        "method": section.method,
        "policy": ctx.policy,
        "resumed_from": last,
        "world_size": state.num_processes,
        "pairs": len(records),
        "loss_type": args.loss_type,
        "loss_weights": args.loss_weights,
        "beta": args.beta,
        "precompute_ref_log_probs": args.precompute_ref_log_probs,
        "fused_loss": fused_head.installed(trainer.model),
        "train_loss": result.training_loss,
        "steps": result.global_step,
        "losses": [round(e["loss"], 4) for e in history if "loss" in e],
        "log": [{"step": e["step"], **{k: e[k] for k in LOGGED if k in e}}
                for e in history if "loss" in e],
        "log_probs": {"before": before, "after": after, "pairs": min(PROBE_PAIRS, len(records))},
        "masks": mask_report(trainer.train_dataset, tokenizer, section.mask_formatting_tokens),
        "averaged": averaged,
        "train_seconds": round(time.time() - start, 1),
        "data": report,
        **moe.metrics(trainer),
    }

    save_trained(trainer, tokenizer, out_dir / "model")
    if state.is_main_process:
        write_jsonl(out_dir / "data.jsonl", records)
        if section.method != "full" and (section.merge or ctx.merge):
            save_merged(cfg, out_dir / "model", ctx.policy, out_dir / "merged", tokenizer)
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
    state.wait_for_everyone()
    return metrics


def mask_report(dataset, tokenizer, masked: bool) -> dict:
    """Response tokens in the prepared pairs and how many of them are formatting tokens (left out
    of the loss when `masked`). Every response ends in one (its <|eot_id|>), so a zero is suspect."""
    fmt = formatting_ids(tokenizer)
    tokens = formatting = 0
    for row in dataset:
        for key in ("chosen_ids", "rejected_ids"):
            flags = formatting_positions(row["prompt_ids"] + row[key], fmt)[len(row["prompt_ids"]):]
            tokens += len(flags)
            formatting += sum(flags)
    return {"response_tokens": tokens, "formatting_tokens": formatting, "masked": masked}
