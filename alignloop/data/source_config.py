"""Where a dataset comes from: one entry of a recipe's data list (typed, strict)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

OnError = Literal["raise", "skip"]


class SourceConfig(BaseModel):
    """One data source. Exactly one of `path`, `hub` or `builtin` is set.

    - `path`: a local .jsonl / .json / .parquet file, or a directory of them (relative paths are
      resolved against the recipe file's directory by the recipe loader).
    - `hub`: a `datasets` hub name (needs a machine that is online), with `split` and `subset`.
    - `builtin`: a dataset that ships with alignloop (e.g. `arithmetic`), with `split` and `count`.

    Mixing: `weight` multiplies the source's size (0.5 keeps half its records, 2.0 repeats each
    twice); `count` takes exactly that many records instead. Both are deterministic given the seed.
    """

    model_config = ConfigDict(extra="forbid")

    path: Path | None = None
    hub: str | None = None
    builtin: str | None = None
    split: str = "train"
    subset: str | None = None
    weight: float | None = Field(default=None, gt=0)
    count: int | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _one_origin(self) -> "SourceConfig":
        origins = [name for name in ("path", "hub", "builtin") if getattr(self, name) is not None]
        if len(origins) != 1:
            raise ValueError("a data source needs exactly one of 'path', 'hub' or 'builtin'"
                             + (f" (got {', '.join(origins)})" if origins else ""))
        if self.weight is not None and self.count is not None:
            raise ValueError("set 'weight' or 'count' for a data source, not both")
        return self

    @property
    def name(self) -> str:
        """A short human name for reports: the path, hub id or builtin name."""
        if self.path is not None:
            return str(self.path)
        if self.hub is not None:
            return f"hub:{self.hub}[{self.split}]"
        return f"builtin:{self.builtin}[{self.split}]"
