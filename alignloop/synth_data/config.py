"""The `synth_data` recipe section: synthetic Q&A generation, filtering and dedup."""

from __future__ import annotations

from pydantic import Field

from alignloop.data.source_config import SourceConfig
from alignloop.options import ScoringConfig, Strict


class SynthDataConfig(Strict):
    # The model that writes: "policy" (the policy entering this round) or a checkpoint path.
    generator: str = "policy"
    documents: list[SourceConfig] = Field(default_factory=list)  # seed documents
    prompts: list[SourceConfig] = Field(default_factory=list)    # seed prompts
    samples_per_seed: int = Field(default=1, ge=1)
    temperature: float = Field(default=0.8, ge=0)
    max_new_tokens: int = Field(default=256, gt=0)
    scoring: ScoringConfig = Field(default_factory=lambda: ScoringConfig(reward_model=0.0))
