"""The `rejection_sampling` recipe section (reference A3)."""

from __future__ import annotations

from pydantic import Field

from alignloop.data.source_config import SourceConfig
from alignloop.options import ScoringConfig, Strict


class RejectionSamplingConfig(Strict):
    prompts: list[SourceConfig] = Field(default_factory=list)  # prompt records (an `answer` feeds verifiers)
    num_samples: int = Field(default=10, ge=1)  # K per prompt (10-30 in Llama 3)
    # The K samples are spread evenly over every (system prompt, temperature) combination.
    temperatures: list[float] = Field(default_factory=lambda: [0.8], min_length=1)
    system_prompts: list[str | None] = Field(default_factory=lambda: [None], min_length=1)
    max_new_tokens: int = Field(default=256, gt=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    scoring: ScoringConfig = Field(default_factory=ScoringConfig)
    # A reward-model checkpoint for rounds without a `reward` stage.
    reward_model: str | None = None
    # Keep the best and the worst candidate as a preference pair for DPO when their scores differ
    # by more than `min_gap`.
    pairs: bool = True
    min_gap: float = Field(default=0.0, ge=0)
