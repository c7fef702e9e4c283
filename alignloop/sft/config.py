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
    # An example whose loss mask is empty after truncation: stop with an error, or skip and count it.
    empty_mask: Literal["error", "skip"] = "error"
    # In the loop: where each round's SFT starts. "previous": the policy so far; "base": the
    # recipe's model, as Llama 3 fine-tunes the pre-trained checkpoint every round (reference A1).
    start: Literal["previous", "base"] = "previous"
    # Which rounds' rejection-sampled best answers and synthetic examples join `data`.
    rejection_sampled: Literal["all", "newest"] = "all"
    synthetic: Literal["all", "newest"] = "all"
