"""The `prune` recipe section (docs/pruning.md). Light imports only."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from alignloop.data.source_config import SourceConfig
from alignloop.options import Strict, raise_problems

# The axes of a target shape, as LlamaConfig names them (heads_per_group is ours: query heads per
# KV head, num_attention_heads / num_key_value_heads).
AXES = ("num_hidden_layers", "hidden_size", "num_attention_heads", "heads_per_group", "head_dim",
        "intermediate_size")
_SUFFIXES = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9}


class PruneTarget(Strict):
    """The pruned model's shape. An axis left out keeps the model's value; `params` is a budget
    that the free axes among hidden_size and intermediate_size shrink to meet (docs/pruning.md,
    "Targets"). The key-value heads are always kept, as in Llama 3.2 (8 in 8B, 3B and 1B)."""

    num_hidden_layers: int | None = Field(default=None, gt=0)
    hidden_size: int | None = Field(default=None, gt=0)
    num_attention_heads: int | None = Field(default=None, gt=0)  # or heads_per_group
    heads_per_group: int | None = Field(default=None, gt=0)      # query heads per KV head
    head_dim: int | None = Field(default=None, gt=0)             # even: RoPE rotates pairs
    intermediate_size: int | None = Field(default=None, gt=0)
    # Total parameters (embeddings and, when untied, the output layer included): 1200000000,
    # "1.2B", "350M" or "1.2e9" (YAML reads 1.2e9 without a sign in the exponent as text).
    params: int | None = Field(default=None, gt=0)

    @field_validator("params", mode="before")
    @classmethod
    def _parse_params(cls, value: Any) -> Any:
        return parse_count(value) if isinstance(value, (str, float)) else value

    @model_validator(mode="after")
    def _rules(self) -> "PruneTarget":
        raise_problems(self.problems())
        return self

    def problems(self) -> list[tuple[str, str]]:
        """(key, message) for each rule that needs no model: one way to give the head count,
        an even head_dim, and a free axis for a parameter budget to shrink."""
        problems = []
        if self.num_attention_heads is not None and self.heads_per_group is not None:
            problems.append(("heads_per_group", "give num_attention_heads or heads_per_group, "
                                                "not both"))
        if self.head_dim is not None and self.head_dim % 2:
            problems.append(("head_dim", f"must be even: RoPE rotates channel pairs (i, i + "
                                         f"head_dim/2) (got {self.head_dim})"))
        if self.params is not None and self.hidden_size is not None \
                and self.intermediate_size is not None:
            problems.append(("params", "a parameter budget shrinks hidden_size and/or "
                                       "intermediate_size, but both are given; leave one out"))
        return problems

    def given(self) -> dict[str, int]:
        """The axes this target sets (params excluded)."""
        return {axis: getattr(self, axis) for axis in AXES if getattr(self, axis) is not None}


class PruneConfig(Strict):
    """One-shot structured pruning: importance from calibration data, then a smaller Llama.

    Importance (Minitron, arXiv 2407.14679): `activation` ranks hidden channels, MLP neurons,
    attention heads, head_dim channels and layers by their activations on `data`; `magnitude`
    by weight norms and `random` by a seeded draw (baselines that need no data).
    """

    data: list[SourceConfig] = Field(default_factory=list)  # calibration records
    # What the records are: chat (rendered with the chat template, answers included), prompt
    # (the template with the assistant header after the prompt) or document (plain text).
    kind: Literal["chat", "prompt", "document"] = "chat"
    samples: int = Field(default=512, ge=1)  # calibration records used (Minitron: 1024)
    max_length: int = Field(default=1024, ge=2)  # tokens per record; longer ones are cut
    batch_size: int = Field(default=8, ge=1)
    importance: Literal["activation", "magnitude", "random"] = "activation"
    target: PruneTarget = Field(default_factory=PruneTarget)
    # Which head_dim channels q and k keep, as RoPE pairs (i, i + head_dim/2): "strided" keeps
    # every s-th pair (s = old head_dim / new head_dim), which reproduces the original rotary
    # frequencies exactly (also under llama3 rope scaling); "importance" keeps the best pairs,
    # which then rotate at the new grid's frequencies. v's channels are always ranked.
    rope_pairs: Literal["strided", "importance"] = "strided"
    # Depth: drop one contiguous block of layers (the block whose removal changes the residual
    # stream least, 1 - cos(h_in, h_out)) or the individually least influential layers.
    layers: Literal["contiguous", "any"] = "contiguous"
    # Hidden and intermediate sizes that a parameter budget chooses are multiples of this.
    round_to: int = Field(default=64, ge=1)
    # Share the input embeddings with the output layer (Llama 3.2 1B/3B do); null: as the model.
    tie_embeddings: bool | None = None


def parse_count(value: str | float) -> int:
    """1.2e9, "1.2e9", "1.2B", "350M", "1_000_000" -> an int. Raises ValueError."""
    if isinstance(value, float):
        return round(value)
    match = re.fullmatch(r"\s*([0-9_]*\.?[0-9_]+(?:[eE][-+]?[0-9]+)?)\s*([KMB]?)\s*", value)
    if not match:
        raise ValueError(f"expected a parameter count such as 1200000000, 1.2B or 350M (got {value!r})")
    return round(float(match.group(1).replace("_", "")) * _SUFFIXES[match.group(2)])
