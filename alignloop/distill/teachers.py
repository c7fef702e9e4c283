"""The teachers: which checkpoints, the vocabulary check, loading, their last hidden states and
LM heads, and Minitron's teacher correction.

A teacher teaches through its last hidden states and LM-head weight (the fused loss projects
them chunk by chunk); the student gives its hidden states through the model's own forward, so
that distributed wrappers (DDP) see the call, with `logits_to_keep` empty so that no logits are
formed there.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import torch

from alignloop.kernels.fused_head import check_head, unwrap
from alignloop.models.vocabulary import vocabulary_difference
from alignloop.pipeline.errors import StageError

logger = logging.getLogger("alignloop.distill")


def teacher_paths(cfg, ctx) -> list[tuple[str, float]]:
    """(resolved path, weight normalised to sum 1) per teacher; none listed: the recipe's model."""
    from alignloop.models.loading import resolve_path

    listed = cfg.distill.teachers
    if not listed:
        return [(ctx.base, 1.0)]
    total = sum(t.weight for t in listed)
    return [(resolve_path(cfg.model.model_copy(update={"path": t.path, "tokenizer": None})),
             t.weight / total) for t in listed]


def check_vocabulary(label: str, teacher: str, teacher_tokenizer, student: str, student_tokenizer) -> None:
    """StageError naming both models unless they share one vocabulary: the same tokens with the
    same ids, and LM heads of the same size (the logits are compared token by token)."""
    from alignloop.models.memory import model_config

    vocab_t, vocab_s = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    difference = vocabulary_difference(vocab_t, vocab_s, "the teacher's", "the student's")
    rows = [getattr(c.get_text_config(), "vocab_size", None) if c is not None else None
            for c in (model_config(teacher), model_config(student))]
    if difference is None and rows[0] != rows[1] and None not in rows:
        difference = f"LM heads of {rows[0]} and {rows[1]} rows"
    if difference is None:
        return
    raise StageError(
        f"{label}: the teacher {teacher} ({len(vocab_t)} tokens) and the student {student} "
        f"({len(vocab_s)} tokens) have different vocabularies ({difference}). Distillation "
        "compares their next-token distributions token by token, so both need one tokenizer: "
        "take a teacher of the student's family (Llama 3.x models share one 128,256-token "
        "vocabulary), or prune the student from the teacher")


def load_teacher(cfg, path: str, device) -> torch.nn.Module:
    """A frozen teacher in evaluation mode on `device`."""
    from alignloop.models.loading import load_model

    model = load_model(cfg, path)
    problem = check_head(model)
    if problem:
        raise StageError(f"distill: the teacher {path}: {problem}")
    model.requires_grad_(False).eval()
    return model.to(device)


def backbone(model) -> torch.nn.Module:
    base = unwrap(model)
    return getattr(base, base.base_model_prefix)


def head_weight(model) -> torch.Tensor:
    """The LM head's weight (V, H), gathered whole under FSDP2."""
    from torch.distributed.tensor import DTensor

    weight = unwrap(model).get_output_embeddings().weight
    return weight.full_tensor() if isinstance(weight, DTensor) else weight


@torch.no_grad()
def teacher_hidden(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The teacher's last hidden states (B, L, Ht), after its final norm."""
    return backbone(model)(input_ids=input_ids, attention_mask=attention_mask,
                           use_cache=False).last_hidden_state


def student_hidden(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   unwrapped=None, router_logits: list | None = None) -> torch.Tensor:
    """The student's last hidden states (B, L, H), through the (possibly wrapped) model's forward
    with no logits formed: the backbone of `unwrapped` (the model under DDP's wrapper, default
    `model`) has its output caught by a hook. With a `router_logits` list, an MoE student's
    router logits (one (tokens, E) tensor per sparse layer) are appended to it."""
    caught = []
    catch = lambda module, args, out: caught.append(out)  # noqa: E731
    handle = backbone(unwrapped or model).register_forward_hook(catch)
    extra = {"output_router_logits": True} if router_logits is not None else {}
    try:
        none = torch.empty(0, dtype=torch.long, device=input_ids.device)
        model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=none, use_cache=False,
              **extra)
    finally:
        handle.remove()
    if router_logits is not None:
        router_logits.append(caught[-1].router_logits)
    return caught[-1].last_hidden_state


def correct_teacher(cfg, path: str, rows: list[dict], pad_id: int, tokenizer, out: Path) -> tuple[str, dict]:
    """Minitron's teacher correction: `distill.teacher_correction.steps` steps of next-token
    loss on the distillation examples, saved in `out` (renamed into place when complete, so a
    killed run corrects again and a finished correction is reused). Every process calls it (the
    Trainer trains data-parallel); the main one saves. Returns (path, metrics)."""
    from transformers import Trainer, TrainingArguments

    from alignloop.distill.data import Collator, Rows
    from alignloop.hardware import cuda_available, resolve_precision
    from alignloop.models.loading import load_model

    if (out / "config.json").is_file():
        logger.info("teacher correction of %s: reusing %s", path, out)
        return str(out), {"teacher": path, "corrected": str(out), "reused": True}
    opts, precision = cfg.distill.teacher_correction, resolve_precision(cfg.precision)
    work = out.with_name(out.name + ".work")
    args = TrainingArguments(output_dir=str(work), max_steps=opts.steps, learning_rate=opts.learning_rate,
                             per_device_train_batch_size=opts.batch_size, save_strategy="no",
                             report_to="none", seed=cfg.seed, logging_steps=max(1, opts.steps // 10),
                             bf16=precision == "bf16", fp16=precision == "fp16",
                             use_cpu=not cuda_available(), remove_unused_columns=False,
                             disable_tqdm=True)
    model = load_model(cfg, path)
    trainer = Trainer(model=model, args=args, train_dataset=Rows(rows),
                      data_collator=Collator(pad_id, with_index=False))
    result = trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    if trainer.is_world_process_zero():
        tmp = out.with_name(f".{out.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        trainer.save_model(str(tmp))
        (tmp / "training_args.bin").unlink(missing_ok=True)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, out)
        shutil.rmtree(work, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    logger.info("teacher correction of %s: %d steps, loss %s -> %s", path, result.global_step,
                losses[:1], losses[-1:])
    return str(out), {"teacher": path, "corrected": str(out), "steps": result.global_step,
                      "losses": [round(x, 4) for x in losses]}

