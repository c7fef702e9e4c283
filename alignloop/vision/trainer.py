"""What trains in a vision stage, and the trainers (transformers' `Trainer`) that train it.

The language model stays frozen; the encoder, projector, cross-attention layers and the image
token's rows train (`train` picks among them); `lora` adds LoRA adapters on the language model,
merged into it when the stage saves. Trainer checkpoints hold only the trainable tensors (the
frozen LM is reloaded from the start model), so resuming a killed run reloads them on top of it.
Vision DPO computes its loss with the maths text DPO shares (alignloop.losses: summed response
log-probs, the sigmoid term, Llama 3's NLL term normalised per sequence or per token).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import Trainer

from alignloop.losses import chosen_nll, sigmoid_dpo, token_log_probs
from alignloop.vision.config import VisionTrainSection


def prepare_for_training(model, section: VisionTrainSection, seed: int = 0) -> dict:
    """Freezes the language model, unfreezes the parts in `section.train`, adds LoRA on the
    language model with `section.lora` (initialised from `seed`, so that a run does not depend on
    what drew random numbers before it). Returns counts of trainable parameters by part."""
    parts = [part for part in section.train if part != "score"]  # the reward model's head: its own
    model.requires_grad_(False)
    for p in model.adapter_parameters(parts):
        p.requires_grad_(True)
    counts = {part: sum(p.numel() for p in model.adapter_parameters([part])) for part in parts}
    if section.lora is not None:
        from peft import get_peft_model

        from alignloop.models.loading import lora_config

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model.language_model = get_peft_model(model.language_model, lora_config(section.lora))
        counts["lm_lora"] = sum(p.numel() for n, p in model.language_model.named_parameters()
                                if p.requires_grad)
    model.train()
    return counts


def finish_training(model):
    """Merges LoRA adapters into the language model (the saved model is a plain Mllama)."""
    from peft import PeftModel

    if isinstance(model.language_model, PeftModel):
        model.language_model = model.language_model.merge_and_unload()
    return model.eval()


class AdapterTrainer(Trainer):
    """`Trainer` whose checkpoints hold only the trainable tensors (a non-PreTrainedModel would
    otherwise be saved whole, and tied embeddings refuse to save as safetensors); resuming loads
    them non-strictly over the start model, as Trainer does for such models."""

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        from safetensors.torch import save_file

        output_dir = output_dir or self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        trainable = {name: p.detach().contiguous().cpu() for name, p in self.model.named_parameters()
                     if p.requires_grad}
        save_file(trainable, os.path.join(output_dir, "model.safetensors"), metadata={"format": "pt"})
        (Path(output_dir) / "training_args.json").write_text(self.args.to_json_string())

    def _issue_warnings_after_load(self, load_result) -> None:
        """The frozen tensors are missing from our checkpoints by design; a trainable one must not be."""
        trainable = {name for name, p in self.model.named_parameters() if p.requires_grad}
        lost = sorted(trainable & set(load_result.missing_keys))
        if lost or load_result.unexpected_keys:
            raise RuntimeError(f"checkpoint does not match the model being trained: missing {lost[:3]}, "
                               f"unexpected {load_result.unexpected_keys[:3]} (was it written under "
                               "another `train` or `lora` setting?)")


# ---------------------------------------------------------------------------------------------
# Vision DPO (Llama 3 §7.5; the loss as reference A5: sigmoid DPO + NLL on the chosen answer)


def _pair_forward(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward over [chosen; rejected] -> (per-token log-probs (2B, L-1), their mask)."""
    both = {k: torch.cat([batch["chosen"][k], batch["rejected"][k]]) for k in batch["chosen"]}
    labels = both.pop("labels")
    return token_log_probs(model(**both).logits, labels)


@torch.no_grad()
def with_reference_logprobs(model, records: list[dict], collator, batch_size: int) -> list[dict]:
    """Copies of the records with `_reference` = [log p_ref(chosen), log p_ref(rejected)] under
    the model as the stage starts (the DPO reference, computed once)."""
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, len(records), batch_size):
        chunk = records[i:i + batch_size]
        batch = collator(chunk)
        batch = {side: {k: v.to(model.device) for k, v in part.items()} for side, part in batch.items()}
        chosen, rejected = _pair_forward(model, batch)[0].sum(dim=-1).chunk(2)  # (B,), (B,)
        out += [{**r, "_reference": [c, j]} for r, c, j in zip(chunk, chosen.tolist(), rejected.tolist())]
    model.train(was_training)
    return out


class WithReference:
    """A collator's batch plus the records' reference log-probs as `reference` (B, 2)."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, records: list[dict]) -> dict:
        return {**self.collator(records), "reference": torch.tensor([r["_reference"] for r in records])}


class VisionDPOTrainer(AdapterTrainer):
    """The sigmoid DPO loss against precomputed reference log-probs, plus `nll_weight` x the
    NLL of the chosen answers (`nll_normalization`: sequence, as Llama 3, or token)."""

    def __init__(self, *args, beta: float, nll_weight: float, nll_normalization: str = "sequence",
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.beta, self.nll_weight, self.nll_normalization = beta, nll_weight, nll_normalization

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        reference = inputs.pop("reference")  # (B, 2)
        log_probs, mask = _pair_forward(model, inputs)  # (2B, L-1) each
        chosen, rejected = log_probs.sum(dim=-1).chunk(2)
        loss = sigmoid_dpo(chosen, rejected, reference[:, 0], reference[:, 1], self.beta)
        if self.nll_weight > 0:
            loss = loss + self.nll_weight * chosen_nll(log_probs, mask, self.nll_normalization)
        return (loss, None) if return_outputs else loss


# ---------------------------------------------------------------------------------------------
# The vision reward model (Llama 3 §7.5; the model and its loss: alignloop.vision.reward)


class VisionRewardTrainer(AdapterTrainer):
    def __init__(self, *args, penalty: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.penalty = penalty

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        from alignloop.vision.reward import reward_loss

        loss = reward_loss(model(**inputs["chosen"]), model(**inputs["rejected"]), self.penalty)
        return (loss, None) if return_outputs else loss
