"""Checkpoint averaging: the stage's final weights replaced by the mean of its last N checkpoints.

Llama 3 averages models from runs with different data or hyperparameters at the RM, SFT and DPO
stages (reference A1, paper §4.1.5). Averaging the last checkpoints of one run is the cheap form of
the same idea (weight averaging along the trajectory). Only the trained weights are averaged: the
full model, or the LoRA adapter (plus modules_to_save).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

logger = logging.getLogger("alignloop.models")


def _step(path: Path) -> int:
    match = re.search(r"checkpoint-(\d+)$", path.name)
    return int(match.group(1)) if match else -1


def average_checkpoints(trainer, n: int | None) -> dict | None:
    """Replaces `trainer.model`'s trained weights by the mean of the final weights and the
    `n - 1` latest saved checkpoints before them. Returns {"averaged": [steps]} or None when off.

    The stage's `save_total_limit` must keep at least n - 1 checkpoints (alignloop.training.trl_config
    sees to it).
    """
    if not n:
        return None
    peft = hasattr(trainer.model, "peft_config")
    current = _trained_state(trainer.model, peft)  # name -> tensor (the final weights)
    final_step = trainer.state.global_step
    saved = sorted((p for p in Path(trainer.args.output_dir).glob("checkpoint-*")
                    if _step(p) < final_step), key=_step)[-(n - 1):]
    if not saved:
        logger.warning("average_checkpoints: no earlier checkpoint to average with; kept the final weights")
        return {"averaged": [final_step]}
    if len(saved) < n - 1:
        logger.warning("average_checkpoints: asked for %d checkpoints, found only %d (the final "
                       "weights included); averaging those", n, len(saved) + 1)
    total = {k: v.detach().float().clone() for k, v in current.items()}
    for ckpt in saved:
        state = _load_saved(ckpt, peft)
        for name in total:
            key = _saved_key(name, state)
            total[name] += state[key].to(total[name].device, torch.float32)  # disk -> model's device
    count = len(saved) + 1
    averaged = {k: (v / count).to(current[k].dtype) for k, v in total.items()}
    _load_trained_state(trainer.model, averaged, peft)
    steps = [_step(p) for p in saved] + [final_step]
    logger.info("averaged the weights of steps %s", steps)
    return {"averaged": steps}


def _load_saved(ckpt: Path, peft: bool) -> dict[str, torch.Tensor]:
    """A checkpoint's trained weights: the adapter file, or every shard of the model
    (`model.safetensors`, or `model-0000k-of-0000n.safetensors` for large models)."""
    from safetensors.torch import load_file

    files = [ckpt / "adapter_model.safetensors"] if peft else sorted(ckpt.glob("model*.safetensors"))
    if not files or not files[0].is_file():
        raise FileNotFoundError(f"average_checkpoints: no safetensors weights in {ckpt}")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(str(file)))
    return state


def _trained_state(model, peft: bool) -> dict[str, torch.Tensor]:
    if peft:
        from peft import get_peft_model_state_dict

        return get_peft_model_state_dict(model)
    return {k: v for k, v in model.state_dict().items()}


def _saved_key(name: str, state: dict) -> str:
    """A state-dict name as saved on disk (tied weights are saved once, under either name)."""
    if name in state:
        return name
    if name == "lm_head.weight" and "model.embed_tokens.weight" in state:
        return "model.embed_tokens.weight"
    if name == "model.embed_tokens.weight" and "lm_head.weight" in state:
        return "lm_head.weight"
    raise KeyError(f"{name} is not in the saved checkpoint")


def _load_trained_state(model, state: dict[str, torch.Tensor], peft: bool) -> None:
    if peft:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, state)
    else:
        model.load_state_dict(state, strict=False)
