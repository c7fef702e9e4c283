"""The `sft` recipe section."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from alignloop.data.source_config import SourceConfig
from alignloop.options import LoraOptions, QuantizationOptions, TrainerSection


class SFTStageConfig(TrainerSection):
    """The `sft` section: our keys below; any other key is an SFTConfig option."""

    method: Literal["full", "lora", "qlora"] = "full"
    lora: LoraOptions | None = None
    quantization: QuantizationOptions | None = None
    merge: bool = False  # also save the LoRA-merged model (HF format, safetensors)
    data: list[SourceConfig] = Field(default_factory=list)
    eval_data: list[SourceConfig] = Field(default_factory=list)
    # Tokens per example (an SFTConfig option, declared here: the split rule below reads it).
    # None: no limit.
    max_length: int | None = Field(default=1024, gt=0)
    # An example whose loss mask is empty after truncation: stop with an error, or skip and count it.
    empty_mask: Literal["error", "skip"] = "error"
    # Examples longer than max_length: "truncate" keeps the first max_length tokens; "split" cuts
    # them into windows of max_length tokens, each starting `split_overlap` tokens before the
    # previous one ended (those tokens are context only: every label is trained once). A window
    # without an assistant token is skipped and counted (docs/long_context.md).
    long_examples: Literal["truncate", "split"] = "truncate"
    split_overlap: int = Field(default=0, ge=0)
    # Fused linear + cross-entropy (alignloop.kernels.fused_loss): the loss without the tokens x
    # vocabulary logits. "auto": on when max_length >= 4096; false: TRL's own chunked LM head.
    fused_loss: Literal["auto"] | bool = "auto"
    # In the loop: where each round's SFT starts. "previous": the policy so far; "base": the
    # recipe's model, as Llama 3 fine-tunes the pre-trained checkpoint every round (reference A1).
    start: Literal["previous", "base"] = "previous"
    # Which rounds' rejection-sampled best answers and synthetic examples join `data`.
    rejection_sampled: Literal["all", "newest"] = "all"
    synthetic: Literal["all", "newest"] = "all"

    def problems(self) -> list[tuple[str, str]]:
        problems = super().problems()
        if self.long_examples == "split" and self.max_length is not None \
                and self.split_overlap >= self.max_length:
            problems.append(("split_overlap", f"must be smaller than max_length ({self.max_length}); "
                                              "windows advance by max_length - split_overlap"))
        return problems
