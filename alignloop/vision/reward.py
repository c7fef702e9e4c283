"""The vision reward model of Llama 3 §7.5 (reference C1): a scalar head on a VisionLlama.

    reward(prompt with images, answer) = score(h_last)     h_last: the final hidden state of the
                                                            last real token, (B, D) -> (B,)

Initialised from the vision model (vision SFT) and, optionally, a text reward model whose
transformer and score head replace the language model's (the paper starts from the language
RM). Trained with the pairwise loss plus a penalty on squared rewards (`reward_loss`). Saved as
the vision model in HF Mllama format plus `score.safetensors` beside it.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

SCORE_FILE = "score.safetensors"


class VisionRewardModel(nn.Module):
    def __init__(self, vision, score: nn.Linear | None = None):
        super().__init__()
        self.vision = vision
        hidden = vision.config.hidden_size
        self.score = score or nn.Linear(hidden, 1, bias=False, dtype=vision.dtype)
        if score is None:
            nn.init.normal_(self.score.weight, std=vision.config.initializer_range)

    @property
    def device(self) -> torch.device:
        return self.vision.device

    def forward(self, input_ids, attention_mask, pixel_values=None, aspect_ratio_ids=None,
                aspect_ratio_mask=None, cross_attention_mask=None, **ignored) -> torch.Tensor:
        """Mllama-format batch, right-padded -> rewards (B,)."""
        vision = self.vision
        states = None
        if pixel_values is not None:
            states = vision.encode_images(pixel_values, aspect_ratio_ids, aspect_ratio_mask)
        lm = vision.language_model
        lm = lm.get_base_model() if hasattr(lm, "get_base_model") else lm  # under LoRA: a PeftModel
        hidden = lm.model(
            inputs_embeds=vision.embed(input_ids), attention_mask=attention_mask,
            **vision.vision_inputs(states, cross_attention_mask)).last_hidden_state  # (B, L, D)
        last = attention_mask.long().sum(-1) - 1                                     # (B,)
        return self.score(hidden[torch.arange(len(last), device=hidden.device), last]).squeeze(-1)


def reward_loss(chosen: torch.Tensor, rejected: torch.Tensor, penalty: float) -> torch.Tensor:
    """-log sigmoid(r_c - r_r) averaged, + penalty x mean of the squared rewards; inputs (B,)."""
    pairwise = -F.logsigmoid(chosen - rejected).mean()
    return pairwise + penalty * torch.cat([chosen, rejected]).pow(2).mean()


def load_text_reward_model(model: VisionRewardModel, path: str) -> None:
    """Copies a LlamaForSequenceClassification's transformer into the language model and its
    score head into ours (a LoRA reward model must be merged first)."""
    from transformers import AutoModelForSequenceClassification

    text = AutoModelForSequenceClassification.from_pretrained(path, dtype=model.vision.dtype)
    if text.config.num_labels != 1:
        raise ValueError(f"{path}: a reward model has one score; this one has {text.config.num_labels}")
    transformer = model.vision.language_model.model
    missing, unexpected = transformer.load_state_dict(text.model.state_dict(), strict=False)
    if unexpected or missing:
        raise ValueError(f"{path}: its transformer does not match the vision model's language model "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.score.weight.data.copy_(text.score.weight.data)


def save_score(model: VisionRewardModel, out: Path) -> None:
    from safetensors.torch import save_file

    save_file({"weight": model.score.weight.detach().contiguous()}, str(Path(out) / SCORE_FILE))


def load_reward_model(vision, model_dir: Path) -> VisionRewardModel:
    """The vision model (already loaded from `model_dir`) with the score head saved beside it."""
    from safetensors.torch import load_file

    score = nn.Linear(vision.config.hidden_size, 1, bias=False, dtype=vision.dtype)
    score.weight.data.copy_(load_file(str(Path(model_dir) / SCORE_FILE))["weight"])
    return VisionRewardModel(vision, score)


@torch.no_grad()
def pairwise_accuracy(model: VisionRewardModel, records: list[dict], collator, batch_size: int) -> float:
    """Share of preference records whose chosen answer scores above the rejected one."""
    was_training = model.training
    model.eval()
    right = 0
    for i in range(0, len(records), batch_size):
        batch = collator(records[i:i + batch_size])
        chosen = model(**{k: v.to(model.device) for k, v in batch["chosen"].items()})
        rejected = model(**{k: v.to(model.device) for k, v in batch["rejected"].items()})
        right += int((chosen > rejected).sum())
    model.train(was_training)
    return right / max(len(records), 1)
