"""The `dpo` recipe section (reference A5)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from alignloop.data.source_config import SourceConfig
from alignloop.options import LoraOptions, QuantizationOptions, TrainerSection


class DPOStageConfig(TrainerSection):
    """Our keys below; any other key is a TRL DPOConfig option (beta defaults to 0.1 as in Llama 3)."""

    learning_rate: float = 1e-5  # DPOConfig's, with Llama 3's value (reference A5); TRL's is 1e-6
    method: Literal["full", "lora", "qlora"] = "full"
    lora: LoraOptions | None = None
    quantization: QuantizationOptions | None = None
    merge: bool = False
    data: list[SourceConfig] = Field(default_factory=list)  # preference pairs / rankings of the user
    # Which rounds' rejection-sampling pairs join `data`: Llama 3 uses the latest batches only.
    pairs: Literal["newest", "all"] = "newest"
    # Weight of the NLL term on the chosen response (Llama 3: 0.2; 0 turns it off).
    nll_weight: float = Field(default=0.2, ge=0)
    # How the NLL term averages: "sequence" divides each chosen response's NLL by its own length,
    # then averages over pairs (Pang et al. 2024, which Llama 3 follows); "token" averages over
    # all chosen tokens of the micro-batch (TRL's "sft" term), so long answers weigh more.
    nll_normalization: Literal["sequence", "token"] = "sequence"
    # Mask header and end-of-turn tokens out of the loss in chosen and rejected (Llama 3).
    mask_formatting_tokens: bool = True
    # Reference log-probs computed once before training: "auto" does so when it saves time
    # (more than one epoch, or a full fine-tune that would otherwise keep a reference copy).
    precompute_ref_log_probs: Literal["auto"] | bool = "auto"
    # Fused linear + cross-entropy for the policy's and reference's per-token log-probs
    # (alignloop.kernels.fused_loss). "auto": on when max_length >= 4096; false: TRL's own head.
    fused_loss: Literal["auto"] | bool = "auto"

    def problems(self) -> list[tuple[str, str]]:
        problems, options = super().problems(), self.trainer_options
        if options.get("padding_free") is True:
            problems.append(("padding_free", "TRL 1.16's DPOTrainer has no padding-free mode (it "
                                             "would fall back to padding); remove the key"))
        if self.fused_loss is True and options.get("use_weighting") is True:
            problems.append(("fused_loss", "the fused loss does not compute what WPO weighting "
                                           "(use_weighting) needs; set one of them to false"))
        return problems
