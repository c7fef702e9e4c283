"""The `reward` recipe section: reward-model training (reference A2)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from alignloop.data.source_config import SourceConfig
from alignloop.options import LoraOptions, TrainerSection


class RewardStageConfig(TrainerSection):
    """Our keys below; any other key is a TRL RewardConfig option (e.g. center_rewards_coefficient)."""

    method: Literal["full", "lora"] = "full"
    lora: LoraOptions | None = None
    # What the reward model starts from: "base" (the recipe's model: Llama 3 trains the RM on the
    # pre-trained checkpoint), "policy" (the policy entering this round), or a checkpoint path.
    init: str = "base"
    # Preference pairs and rankings (edited > chosen > rejected is expanded to its 3 pairs).
    data: list[SourceConfig] = Field(default_factory=list)
    eval_data: list[SourceConfig] = Field(default_factory=list)
    eval_fraction: float = Field(default=0.1, ge=0, lt=1)  # held out of `data` when no eval_data
    # Also train on the best/worst pairs of earlier rounds' rejection sampling: "the preference
    # data so far" (reference A2).
    round_pairs: bool = True
    # Llama 2's margin term: the name of a numeric field in each record's `metadata`; None (the
    # Llama 3 default) trains without a margin.
    margin_field: str | None = None
