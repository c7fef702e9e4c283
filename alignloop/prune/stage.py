"""One-shot structured pruning: a Llama checkpoint in, a smaller Llama checkpoint out (the
Llama 3.2 1B/3B method, reference B32; importance as in Minitron, arXiv 2407.14679).

    <out_dir>/model/            a plain HF Llama (LlamaConfig, safetensors, tokenizer)
    <out_dir>/metrics.json      parameters before/after, the shapes, what each axis kept, the
                                importance method, calibration records and tokens, seconds
    <out_dir>/importance.json   every unit's score and the indices kept (alignloop.prune.shape.Kept)

The pruned model has not been trained since; the distill stage recovers what pruning cost.
docs/pruning.md describes the method, the targets and the recipe keys.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from alignloop.config import Recipe
from alignloop.data.sources import format_report, load_sources
from alignloop.models.loading import load_model, load_tokenizer
from alignloop.pipeline.context import StageContext
from alignloop.pipeline.errors import StageError
from alignloop.prune.config import PruneConfig
from alignloop.prune.importance import Importance, from_activations, from_seed, from_weights
from alignloop.prune.shape import Kept, Shape, count, resolve, select
from alignloop.prune.slicing import save

logger = logging.getLogger("alignloop.prune")


def run(cfg: Recipe, ctx: StageContext, out_dir: Path) -> dict:
    """Prunes `ctx.policy` to `prune.target` and writes the artifacts above; returns the metrics.

    Every check that needs the model's config (a target larger than the model, heads that do not
    split into its KV groups, an unreachable parameter budget) raises StageError before anything
    is loaded or written."""
    from transformers import AutoConfig

    start, section = time.time(), cfg.prune
    config = AutoConfig.from_pretrained(ctx.policy, revision=cfg.model.revision)
    if config.model_type != "llama":
        raise StageError(f"{ctx.label}: {ctx.policy} is a {config.model_type!r} checkpoint; the prune "
                         "stage prunes Llama models (model_type 'llama')")
    shape = resolve(section, config, ctx.label)
    source = Shape.of(config)
    tokenizer = load_tokenizer(cfg.model, ctx.policy)
    batches, calibration = [], {}
    if section.importance == "activation":
        batches, calibration = calibration_batches(cfg, section, tokenizer, ctx)

    model = load_model(cfg, ctx.policy).eval()
    if torch.cuda.is_available():
        model.to("cuda")
    window = max(1, source.num_hidden_layers - shape.num_hidden_layers)
    scores = importance(model, section, batches, window, ctx.seed)
    kept = select(scores, source, shape, section)
    pruned = save(model, kept, shape, tokenizer, out_dir / "model")

    params_after = pruned.num_parameters()
    if params_after != count(shape):  # the formula a parameter budget relies on
        raise RuntimeError(f"pruned model has {params_after} parameters, the formula says {count(shape)}")
    metrics = {
        "model": ctx.policy,
        "importance": section.importance,
        "params_before": model.num_parameters(),
        "params_after": params_after,
        "shape_before": source.as_json(),
        "shape_after": shape.as_json(),
        "target": section.target.model_dump(exclude_none=True),
        "kept": kept_summary(kept, source, shape, section),
        "calibration": calibration,
        "seconds": round(time.time() - start, 1),
    }
    metrics["fraction_kept"] = round(metrics["params_after"] / metrics["params_before"], 4)
    (out_dir / "importance.json").write_text(json.dumps({"scores": scores.as_json(),
                                                         "kept": kept.as_json()}))
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
    logger.info("pruned %s: %s -> %s parameters", ctx.policy, f"{metrics['params_before']:,}",
                f"{params_after:,}")
    return metrics


def importance(model, section: PruneConfig, batches: list[dict], window: int, seed: int) -> Importance:
    """Every unit's score by `section.importance` (window: layers dropped as one block)."""
    if section.importance == "activation":
        return from_activations(model, batches, window)
    if section.importance == "magnitude":
        return from_weights(model, window)
    return from_seed(model.config, window, seed)


# ---------------------------------------------------------------------------------------------
# Calibration data


def render(record: dict, kind: str, tokenizer) -> str:
    """A calibration record as text: chat records and prompts through the chat template (a prompt
    ends with the assistant header, where the model starts answering), documents as they are."""
    if kind == "chat":
        return tokenizer.apply_chat_template(record["messages"], tokenize=False)
    if kind == "prompt":
        return tokenizer.apply_chat_template(record["prompt"], tokenize=False, add_generation_prompt=True)
    title = record.get("title")
    return f"{title}\n\n{record['text']}" if title else record["text"]


def calibration_batches(cfg: Recipe, section: PruneConfig, tokenizer,
                        ctx: StageContext) -> tuple[list[dict], dict]:
    """The first `samples` records of `prune.data` (mixed with the stage's seed), tokenized to at
    most `max_length` tokens, in right-padded batches of `batch_size`; and their report."""
    if not section.data:
        raise StageError(f"{ctx.label}: prune.data: importance 'activation' needs calibration records "
                         "(or set prune.importance: magnitude or random)")
    loaded = load_sources(section.data, section.kind, cfg.bad_records, ctx.seed)
    logger.info("prune calibration data:\n%s", format_report(loaded.report))
    records = loaded.records[: section.samples]
    if not records:
        raise StageError(f"{ctx.label}: prune.data gave no {section.kind} records")
    # Chat templates write <|begin_of_text|> themselves; plain documents get the tokenizer's.
    plain = section.kind == "document"
    ids = [tokenizer(render(r, section.kind, tokenizer), add_special_tokens=plain, truncation=True,
                     max_length=section.max_length)["input_ids"] for r in records]
    ids.sort(key=len, reverse=True)  # similar lengths together: less padding
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches = []
    for i in range(0, len(ids), section.batch_size):
        chunk = ids[i: i + section.batch_size]
        width = len(chunk[0])
        input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)  # (B, T)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, seq in enumerate(chunk):
            input_ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        batches.append({"input_ids": input_ids, "attention_mask": mask})
    report = {"records": len(ids), "tokens": sum(map(len, ids)), "kind": section.kind,
              "max_length": section.max_length, "truncated": sum(len(s) == section.max_length for s in ids),
              "data": loaded.report}
    return batches, report


def kept_summary(kept: Kept, source: Shape, shape: Shape, section: PruneConfig) -> dict:
    """Per axis: how many units of how many were kept (the indices are in importance.json)."""
    # Whether the kept RoPE pairs rotate at their original frequencies (docs/pruning.md)
    same = section.rope_pairs == "strided" or shape.head_dim == source.head_dim
    return {
        "layers": kept.layers,
        "layer_selection": section.layers,
        "hidden_size": [shape.hidden_size, source.hidden_size],
        "intermediate_size": [shape.intermediate_size, source.intermediate_size],
        "heads_per_group": [shape.heads_per_group, source.heads_per_group],
        "num_key_value_heads": [shape.num_key_value_heads, source.num_key_value_heads],
        "head_dim": [shape.head_dim, source.head_dim],
        "rope_pairs": section.rope_pairs,
        "rope_frequencies": "original" if same else "regridded",
        "tie_word_embeddings": [shape.tie_word_embeddings, source.tie_word_embeddings],
    }
