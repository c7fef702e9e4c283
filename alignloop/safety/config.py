"""The `safety` recipe section: safety data mixing and the safety classifier (reference A8)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from alignloop.data.source_config import SourceConfig
from alignloop.options import Strict


class SafetyConfig(Strict):
    data: list[SourceConfig] = Field(default_factory=list)       # training safety records
    eval_data: list[SourceConfig] = Field(default_factory=list)  # held-out, for VR and FRR
    sft_ratio: float = Field(default=0.1, ge=0, lt=1)  # safety share of the SFT mix
    dpo_ratio: float = Field(default=0.1, ge=0, lt=1)  # safety share of the DPO pairs
    borderline_fraction: float = Field(default=0.5, ge=0, le=1)  # borderline share of safety data
    classifier: Literal["rules", "llama_guard"] = "rules"
    llama_guard: str | None = None  # a local Llama Guard 3 checkpoint for classifier: llama_guard
