"""Errors for bad data records: where the record is (file, line or row), which field, and why.

A `DataError` prints as `path/to/file.jsonl:12: messages.1.role: unknown role 'bot' (...)`,
or `file.parquet: row 7: chosen: ...` for row-based sources (parquet, hub, builtin datasets),
so that a person can open the file at the right place (STYLE.md, habit 11).
"""

from __future__ import annotations

from typing import Literal

Unit = Literal["line", "row"]


class FieldError(ValueError):
    """One field of one record breaks its contract. `field` is a dotted path or None (the record).

    Raised by `alignloop.data.contracts.validate_record`, which knows nothing about files;
    the readers catch it and add the file and line as a `DataError`.
    """

    def __init__(self, field: str | None, reason: str):
        self.field, self.reason = field, reason
        super().__init__(f"{field}: {reason}" if field else reason)

    def under(self, prefix: str) -> "FieldError":
        """The same error with `prefix.` in front of the field (for nested validation)."""
        return FieldError(f"{prefix}.{self.field}" if self.field else prefix, self.reason)


class DataError(ValueError):
    """A data record (or a whole data file) that cannot be used.

    - `file`: the path or source name (`hub:name[split]`), or None.
    - `line`: 1-based line for .jsonl / .json files (for a JSON array, the line where the element
      starts), or the 0-based row index for row-based sources; None for the whole file.
    - `unit`: "line" or "row"; when not given, "row" for .parquet files and `hub:` / `builtin:`
      sources, else "line".
    - `field`: dotted path inside the record (`messages.2.content`), or None.
    - `reason`: what is wrong, in words.
    """

    def __init__(self, reason: str, *, file: str | None = None, line: int | None = None,
                 field: str | None = None, unit: Unit | None = None):
        self.file = None if file is None else str(file)
        self.line, self.field, self.reason = line, field, reason
        self.unit: Unit = unit or _unit_for(self.file)
        super().__init__(self._format())

    def _format(self) -> str:
        if self.line is None:
            where = self.file
        elif self.unit == "row":
            where = f"{self.file}: row {self.line}" if self.file else f"row {self.line}"
        else:
            where = f"{self.file}:{self.line}" if self.file else f"line {self.line}"
        parts = [part for part in (where, self.field, self.reason) if part]
        return ": ".join(parts)


def _unit_for(file: str | None) -> Unit:
    if file and (file.endswith(".parquet") or file.startswith(("hub:", "builtin:"))):
        return "row"
    return "line"
