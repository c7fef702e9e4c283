"""Loading a recipe's data list: read each source, validate its records, mix them.

A source is a local path, a hub dataset or a builtin dataset (`alignloop.data.tasks.BUILTIN`);
see `SourceConfig` and docs/data-formats.md. The report says, per source, how many records were
read, skipped (with sample reasons) and used after weighting, for the console and the run report.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from alignloop.data.contracts import check_kind
from alignloop.data.mixing import mix, take_size
from alignloop.data.readers import ReadResult, check_rows, read_hub, read_records
from alignloop.data.source_config import OnError, SourceConfig

logger = logging.getLogger("alignloop.data")


@dataclass
class LoadedData:
    """The mixed, shuffled records and one report entry per source:
    `{"source": name, "read": valid records, "skipped": bad ones, "reasons": [...], "used": n}`."""

    records: list[dict]
    report: list[dict]


def load_sources(sources: list[SourceConfig], kind: str, on_error: OnError = "raise",
                 seed: int = 0) -> LoadedData:
    """Reads every source as records of `kind`, then mixes them (see `mixing.mix`).

    Raises DataError for a bad record (on_error="raise") or an unreadable source, and ValueError
    for an unknown builtin dataset. Skipped records are logged as a warning per source.
    """
    check_kind(kind)
    groups, report = [], []
    for source in sources:
        result = read_source(source, kind, on_error, seed)
        _warn_about(source, result)
        groups.append((result.records, source))
        report.append({"source": source.name, "read": len(result.records),
                       "skipped": result.skipped, "reasons": result.reasons,
                       "used": take_size(len(result.records), source.weight, source.count)})
    return LoadedData(records=mix(groups, seed), report=report)


def read_source(source: SourceConfig, kind: str, on_error: OnError = "raise",
                seed: int = 0) -> ReadResult:
    """The validated records of one source, before weighting."""
    if source.path is not None:
        return read_records(source.path, kind, on_error)
    if source.hub is not None:
        return read_hub(source.hub, source.split, source.subset, kind, on_error)
    return _read_builtin(source, kind, on_error, seed)


def _read_builtin(source: SourceConfig, kind: str, on_error: OnError, seed: int) -> ReadResult:
    from alignloop.data import tasks  # written separately; imported only when a builtin is used

    builtin = getattr(tasks, "BUILTIN", {})
    if source.builtin not in builtin:
        known = ", ".join(sorted(builtin)) or "none are installed"
        raise ValueError(f"unknown builtin dataset {source.builtin!r} (known: {known})")
    rows = builtin[source.builtin](kind=kind, split=source.split, count=source.count, seed=seed)
    return check_rows(enumerate(rows), kind, on_error, file=source.name, unit="row")


def _warn_about(source: SourceConfig, result: ReadResult) -> None:
    if result.skipped:
        logger.warning("%s: skipped %d bad record(s), for example:\n  %s", source.name,
                       result.skipped, "\n  ".join(result.reasons))
    if not result.records:
        logger.warning("%s: no usable records", source.name)


def format_report(report: list[dict]) -> str:
    """A few console lines: one per source, then its sample reasons, then the total used."""
    width = max((len(entry["source"]) for entry in report), default=0)
    lines = []
    for entry in report:
        lines.append(f"  {entry['source']:<{width}}  read {entry['read']:>7,}  "
                     f"skipped {entry['skipped']:>5,}  used {entry['used']:>7,}")
        lines += [f"      {reason}" for reason in entry["reasons"]]
    total = sum(entry["used"] for entry in report)
    return "\n".join([f"data: {total:,} records from {len(report)} source(s)", *lines])
