"""Reading records from .jsonl / .json / .parquet files, directories and the hub; writing .jsonl.

Every record passes `validate_record`; a bad one becomes a `DataError` that names the file, the
line (or parquet / hub row), the field and the reason. With `on_error="raise"` the first one is
raised; with `"skip"` bad records are counted and up to MAX_REASONS of them kept as samples.
Problems with a whole file (not found, unsupported type, a .json file that does not parse) are
raised in both modes: skipping a whole file silently would hide a broken recipe.
"""

from __future__ import annotations

import codecs
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from alignloop.data.contracts import VISION_KINDS, check_kind, validate_record
from alignloop.data.errors import DataError, FieldError, Unit
from alignloop.data.source_config import OnError
from alignloop.data.vision_records import ImageLimits, validate_vision_record
from alignloop.manifest import atomic_path

SUFFIXES = (".jsonl", ".json", ".parquet")
MAX_REASONS = 5
_WHITESPACE = re.compile(r"[ \t\n\r]*")


@dataclass
class ReadResult:
    """Valid, normalised records; how many were skipped; up to MAX_REASONS sample errors."""

    records: list[dict]
    skipped: int = 0
    reasons: list[str] = field(default_factory=list)

    def reject(self, error: DataError, on_error: OnError) -> None:
        """Raises `error` (on_error="raise") or counts it and keeps it as a sample ("skip")."""
        if on_error == "raise":
            raise error
        self.skipped += 1
        if len(self.reasons) < MAX_REASONS:
            self.reasons.append(str(error))

    def extend(self, other: "ReadResult") -> None:
        self.records += other.records
        self.skipped += other.skipped
        self.reasons += other.reasons[: MAX_REASONS - len(self.reasons)]


def read_records(path: str | Path, kind: str, on_error: OnError = "raise", *,
                 check_images: bool = True, limits: ImageLimits | None = None) -> ReadResult:
    """Reads and validates every record of `kind` in a file, or in a directory (recursively,
    sorted; hidden files and folders are ignored). Raises DataError for bad records (unless
    on_error="skip") and for files that cannot be read at all. Vision kinds: image paths are
    resolved against each data file's folder, and each image is checked (`check_images`, against
    `limits`) unless told not to."""
    check_kind(kind)
    result = ReadResult([])
    for file in data_files(path):
        rows = read_rows(file)
        unit: Unit = "row" if file.suffix == ".parquet" else "line"
        validate = _vision_validator(kind, file.parent, check_images, limits) \
            if kind in VISION_KINDS else validate_record
        result.extend(check_rows(rows, kind, on_error, file=str(file), unit=unit, validate=validate))
    return result


def _vision_validator(kind: str, base_dir: Path, check_images: bool, limits: ImageLimits | None):
    """Validates vision records with their image paths resolved against the data file's folder."""
    def validate(obj, _kind):
        return validate_vision_record(obj, kind, base_dir, check_images=check_images,
                                      limits=limits or ImageLimits())
    return validate


def data_files(path: str | Path) -> list[Path]:
    """`path` itself, or the supported files under a directory in sorted order."""
    path = Path(path)
    if not path.exists():
        raise DataError("no such file or directory", file=str(path))
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not files:
            raise DataError("no .jsonl, .json or .parquet files in this directory", file=str(path))
        return files
    if path.suffix not in SUFFIXES:
        raise DataError(f"unsupported file type {path.suffix or '(no extension)'!r} "
                        "(expected .jsonl, .json or .parquet)", file=str(path))
    return [path]


def read_rows(file: Path) -> Iterator[tuple[int, Any]]:
    """(line or row, parsed object or DataError) pairs of one .jsonl / .json / .parquet file."""
    return _READERS[file.suffix](file)


def check_rows(rows: Iterable[tuple[int, Any]], kind: str, on_error: OnError, *,
               file: str, unit: Unit = "line", validate=validate_record) -> ReadResult:
    """Validates (line or row, parsed object or DataError) pairs with `validate(obj, kind)`;
    used by every reader."""
    result = ReadResult([])
    for where, obj in rows:
        if isinstance(obj, DataError):
            result.reject(obj, on_error)
            continue
        try:
            result.records.append(validate(obj, kind))
        except FieldError as err:
            result.reject(DataError(err.reason, file=file, line=where, field=err.field,
                                    unit=unit), on_error)
    return result


def read_hub(name: str, split: str, subset: str | None, kind: str,
             on_error: OnError = "raise") -> ReadResult:
    """Loads a `datasets` hub dataset and validates its rows (named `hub:name[split] row N`).

    Raises DataError when the dataset cannot be loaded (offline machine, wrong name, subset or
    split), with the underlying error attached as the cause.
    """
    check_kind(kind)
    import datasets  # heavy; only hub sources need it

    source = f"hub:{name}[{split}]"
    try:
        dataset = datasets.load_dataset(name, subset, split=split)
    except Exception as err:  # connection, offline-mode, not-found and bad-split errors alike
        where = f"subset {subset!r}, split {split!r}" if subset else f"split {split!r}"
        raise DataError(f"could not load hub dataset {name!r} ({where}): the machine is offline "
                        f"or the name, subset or split is wrong ({type(err).__name__}: {err})",
                        file=source) from err
    return check_rows(enumerate(dataset), kind, on_error, file=source, unit="row")


def write_jsonl(path: str | Path, records: Iterable[dict]) -> int:
    """Writes records as UTF-8 JSON lines, atomically; returns how many were written.

    The lines go to a hidden temporary file beside `path`, which is fsynced and renamed over
    `path` only once every record is written: a reader never sees half a file, and an existing
    file is left untouched when a record cannot be serialised (TypeError naming the record).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "x", encoding="utf-8") as f:
        count = _write_lines(f, records, path)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(path.parent)
    return count


def _write_lines(f, records: Iterable[dict], path: Path) -> int:
    count = 0
    for count, record in enumerate(records, start=1):
        try:
            line = json.dumps(record, ensure_ascii=False)
        except (TypeError, ValueError) as err:
            raise TypeError(f"{path}: record {count - 1} cannot be written as JSON: {err}") from err
        f.write(line + "\n")
    return count


def _fsync_dir(directory: Path) -> None:
    """Makes the rename durable; not every platform can open a directory, which is fine."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---- one reader per file type: each yields (line or row, object or DataError) ------------------

def _jsonl_rows(path: Path) -> Iterator[tuple[int, Any]]:
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if number == 1:
                raw = raw.removeprefix(codecs.BOM_UTF8)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                reason = _utf8_reason(raw[err.start], err.start + 1)
                yield number, DataError(reason, file=str(path), line=number)
                continue
            if not text.strip():
                continue
            try:
                yield number, json.loads(text.rstrip("\r\n"))
            except json.JSONDecodeError as err:
                reason = f"invalid JSON: {err.msg} (column {err.colno})"
                yield number, DataError(reason, file=str(path), line=number)


def _json_rows(path: Path) -> Iterator[tuple[int, Any]]:
    """Elements of a top-level JSON array, each with the line where it starts."""
    text = _decode_whole(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"invalid JSON: {err.msg} (column {err.colno})",
                        file=str(path), line=err.lineno) from None
    if not isinstance(data, list):
        raise DataError(f"expected a top-level JSON array of records, got a JSON "
                        f"{type(data).__name__} (for one record per line, use .jsonl)",
                        file=str(path))
    yield from _array_elements(text)


def _array_elements(text: str) -> Iterator[tuple[int, Any]]:
    """Scans an already-valid JSON array, yielding (line where it starts, element) pairs."""
    decoder = json.JSONDecoder()
    pos = _WHITESPACE.match(text, text.index("[") + 1).end()
    line, counted = 1, 0
    while text[pos] != "]":
        element, end = decoder.raw_decode(text, pos)
        line += text.count("\n", counted, pos)
        counted = pos
        yield line, element
        pos = _WHITESPACE.match(text, end).end()
        if text[pos] == ",":
            pos = _WHITESPACE.match(text, pos + 1).end()


def _parquet_rows(path: Path) -> Iterator[tuple[int, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises several types for a corrupt or non-parquet file
        raise DataError(f"not a readable parquet file ({err})", file=str(path)) from err
    row = 0
    for batch in table.iter_batches():
        for obj in batch.to_pylist():
            yield row, obj
            row += 1


_READERS = {".jsonl": _jsonl_rows, ".json": _json_rows, ".parquet": _parquet_rows}


def _decode_whole(path: Path) -> str:
    data = path.read_bytes().removeprefix(codecs.BOM_UTF8)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line_start = data.rfind(b"\n", 0, err.start) + 1
        reason = _utf8_reason(data[err.start], err.start - line_start + 1)
        raise DataError(reason, file=str(path), line=data.count(b"\n", 0, err.start) + 1) from None


def _utf8_reason(byte: int, column: int) -> str:
    return f"not valid UTF-8 (byte 0x{byte:02x} at column {column})"
