"""Safety data: reading it (every record labelled) and mixing it into SFT and DPO data.

    extra, report = safety_mix(cfg, "chat", main_count=len(train), seed=ctx.seed)        # sft
    extra, report = safety_mix(cfg, "preference", main_count=len(pairs), seed=ctx.seed)  # dpo

`safety.data` holds preference records (prompt, chosen = the right answer, rejected = the wrong
one), so that one list serves both stages: SFT trains on prompt + chosen, DPO on the pair. The
built-in set (`builtin: safety`) serves every kind itself. Every record needs `metadata.safety`
("adversarial" or "borderline"); one without it is a DataError naming file, line and field.
`safety.eval_data` holds prompt records (preference files work too: their answers are ignored).

Reference A8: helpfulness and safety data are combined in SFT and DPO, with a ratio of
adversarial to borderline examples (`borderline_fraction`) and a safety share of the mix
(`sft_ratio`, `dpo_ratio`) that smaller models need larger (Llama 3 Fig. 18).
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

from alignloop.data.errors import DataError
from alignloop.data.mixing import mix, take
from alignloop.data.readers import ReadResult, check_rows, data_files
from alignloop.data.source_config import OnError, SourceConfig
from alignloop.data.sources import read_source
from alignloop.pipeline.errors import StageError
from alignloop.safety.taxonomy import ADVERSARIAL, BORDERLINE, label_problem

logger = logging.getLogger("alignloop.safety")

_FILE_KIND = {"chat": "preference", "preference": "preference", "prompt": "prompt"}


def read_safety(sources: list[SourceConfig], kind: str, on_error: OnError = "raise",
                seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Records of `kind` (chat, preference or prompt) from safety sources, resized by each
    source's weight / count and shuffled (alignloop.data.mixing.mix), plus a report per source."""
    if kind not in _FILE_KIND:
        raise ValueError(f"safety data is read as chat, preference or prompt records, not {kind!r}")
    groups, report = [], []
    for source in sources:
        result = _read_one(source, kind, on_error, seed)
        if result.skipped:
            logger.warning("%s: skipped %d bad safety record(s), for example:\n  %s", source.name,
                           result.skipped, "\n  ".join(result.reasons))
        if kind == "chat" and source.builtin is None:
            result.records = [_as_chat(r) for r in result.records]
        groups.append((result.records, source))
        report.append({"source": source.name, "read": len(result.records), "skipped": result.skipped,
                       "reasons": result.reasons})
    return mix(groups, seed), report


def _read_one(source: SourceConfig, kind: str, on_error: OnError, seed: int) -> ReadResult:
    if source.builtin is not None:
        result = read_source(source, kind, on_error, seed)
        return _labels_checked(result, source.name, on_error)
    if source.hub is not None:
        result = read_source(source, _FILE_KIND[kind], on_error, seed)
        return _labels_checked(result, source.name, on_error)
    result = ReadResult([])
    for file in data_files(source.path):
        rows, unit = _rows(file)
        result.extend(check_rows(_labelled(rows, str(file), unit), _FILE_KIND[kind], on_error,
                                 file=str(file), unit=unit))
    return result


def _rows(file: Path):
    from alignloop.data import readers

    # the readers' per-type row iterators: (line or row, parsed object or DataError)
    return readers._READERS[file.suffix](file), "row" if file.suffix == ".parquet" else "line"


def _labelled(rows, file: str, unit: str) -> Iterator[tuple[int, Any]]:
    """The rows, with a DataError in place of each object that lacks a valid safety label."""
    for where, obj in rows:
        problem = None if isinstance(obj, DataError) or not isinstance(obj, dict) else label_problem(obj)
        if problem is not None:
            obj = DataError(problem[1], file=file, line=where, field=problem[0], unit=unit)
        yield where, obj


def _labels_checked(result: ReadResult, name: str, on_error: OnError) -> ReadResult:
    """Label checks for sources read as a whole (builtin, hub): rows are named by position."""
    kept = ReadResult([], result.skipped, result.reasons)
    for row, record in enumerate(result.records):
        problem = label_problem(record)
        if problem is None:
            kept.records.append(record)
        else:
            kept.reject(DataError(problem[1], file=name, line=row, field=problem[0], unit="row"), on_error)
    return kept


def _as_chat(record: dict) -> dict:
    """A preference record as the chat record SFT trains on: the prompt and the chosen answer."""
    return {"id": record["prompt_id"], "messages": record["prompt"] + record["chosen"],
            "metadata": record["metadata"]}


def mix_size(main_count: int, ratio: float) -> int:
    """How many safety records make up `ratio` of the final mix: n / (main + n) = ratio."""
    return round(main_count * ratio / (1 - ratio))


def safety_mix(cfg, kind: str, main_count: int, seed: int) -> tuple[list[dict], dict]:
    """The safety records to add to a stage's `main_count` records, and a report.

    `kind`: "chat" (SFT, share `safety.sft_ratio`) or "preference" (DPO, `safety.dpo_ratio`).
    n = round(main_count * ratio / (1 - ratio)) records, of which round(n * borderline_fraction)
    borderline, drawn from `safety.data` with `seed` (whole repeats when n exceeds what there is).
    With no main data (main_count 0) the safety data is the whole mix: every record once.
    Returns ([], report) when there is no safety section or the ratio is 0. Raises StageError
    when the data lacks a kind of prompt the mix needs.
    """
    if kind not in ("chat", "preference"):
        raise ValueError(f"safety_mix: kind is chat or preference, not {kind!r}")
    scfg = cfg.safety
    ratio = 0.0 if scfg is None else (scfg.sft_ratio if kind == "chat" else scfg.dpo_ratio)
    report: dict = {"kind": kind, "ratio": ratio, "main_count": main_count, "added": 0}
    if scfg is None or ratio == 0 or not scfg.data:
        return [], report
    pool, sources = read_safety(scfg.data, kind, cfg.bad_records, seed)
    by_label = {label: [r for r in pool if r["metadata"]["safety"] == label]
                for label in (ADVERSARIAL, BORDERLINE)}
    if main_count == 0:
        wanted = {label: len(records) for label, records in by_label.items()}
    else:
        n = mix_size(main_count, ratio)
        borderline = round(n * scfg.borderline_fraction)
        wanted = {ADVERSARIAL: n - borderline, BORDERLINE: borderline}
    rng = random.Random(f"safety-mix:{kind}:{seed}")
    chosen = []
    for label, count in wanted.items():
        if count and not by_label[label]:
            raise StageError(f"safety.data has no {label} records (metadata.safety: {label}) but the "
                             f"{'sft' if kind == 'chat' else 'dpo'} mix needs {count}; add some, or "
                             f"set safety.borderline_fraction to {0 if label == BORDERLINE else 1}")
        chosen += take(by_label[label], count=count, rng=rng) if count else []
    rng.shuffle(chosen)
    report.update(added=len(chosen), sources=sources,
                  available={label: len(records) for label, records in by_label.items()},
                  **_counts(chosen))
    return chosen, report


def _counts(records: list[dict]) -> dict:
    """{"adversarial": n, "borderline": n, "by_category": {code: {"adversarial", "borderline"}}}."""
    labels = Counter(r["metadata"]["safety"] for r in records)
    cats: dict[str, Counter] = {}
    for r in records:
        code = r["metadata"].get("category") or "none"
        cats.setdefault(code, Counter())[r["metadata"]["safety"]] += 1
    return {ADVERSARIAL: labels[ADVERSARIAL], BORDERLINE: labels[BORDERLINE],
            "by_category": {code: {ADVERSARIAL: c[ADVERSARIAL], BORDERLINE: c[BORDERLINE]}
                            for code, c in sorted(cats.items(), key=lambda kv: (len(kv[0]), kv[0]))}}
