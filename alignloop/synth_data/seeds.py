"""Seeds: the documents and prompts that synthetic examples are written from.

Documents and prompts are alignloop's `document` and `prompt` record kinds
(alignloop.data.contracts): read from files, directories, the hub or builtin datasets, with errors
naming the file, line and field.
"""

from __future__ import annotations

from dataclasses import dataclass
from alignloop.data.mixing import mix, take_size
from alignloop.data.source_config import OnError, SourceConfig
from alignloop.data.sources import read_source


@dataclass(frozen=True)
class Seed:
    kind: str     # "document" or "prompt"
    source: str   # the data source's name (SourceConfig.name)
    record: dict  # the normalised document or prompt record

    @property
    def id(self) -> str:
        return self.record["id"] if self.kind == "document" else self.record["prompt_id"]


def load_seeds(documents: list[SourceConfig], prompts: list[SourceConfig], on_error: OnError,
               seed: int) -> tuple[list[Seed], list[dict]]:
    """Every seed, documents first, each list mixed by its sources' weight / count with `seed`;
    and one report entry per source (read, skipped, reasons, used)."""
    seeds, report = [], []
    for kind, sources in (("document", documents), ("prompt", prompts)):
        groups = []
        for source in sources:
            result = read_source(source, kind, on_error, seed)
            groups.append(([Seed(kind, source.name, r) for r in result.records], source))
            report.append({"source": source.name, "kind": kind, "read": len(result.records),
                           "skipped": result.skipped, "reasons": result.reasons,
                           "used": take_size(len(result.records), source.weight, source.count)})
        seeds += mix(groups, seed)
    return seeds, report
