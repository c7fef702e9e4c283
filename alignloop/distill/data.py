"""The distillation examples: records -> token ids, which tokens carry the loss, and batches.

Chat records are rendered with the chat template and carry the loss on the assistant's tokens
(alignloop.data.masks, as SFT); documents ({"text": ...}) carry it on every token and are cut into
consecutive windows of `max_length` tokens. An example is {"input_ids", "labels"}; the loss at
position t compares the distributions over the token at t + 1, where labels[t + 1] != -100.
Examples are addressed by their index in the list: the teacher cache is keyed by a hash of all
of them (alignloop/distill/cache.py), so an index always names the same tokens.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from alignloop.data.masks import IGNORE_INDEX, build_sft_dataset
from alignloop.data.sources import load_sources

logger = logging.getLogger("alignloop.distill")


@dataclass
class Examples:
    rows: list[dict]      # {"input_ids": [...], "labels": [...]}
    report: list[dict]    # per source: read, skipped, used (alignloop.data.sources)
    stats: dict           # examples, tokens, loss tokens; for chat the mask report


def build_examples(section, tokenizer, on_error: str = "raise", seed: int = 0) -> Examples:
    """The examples of a `distill` section (`data`, `kind`, `max_length`)."""
    loaded = load_sources(section.data, section.kind, on_error, seed)
    if section.kind == "chat":
        dataset, masks = build_sft_dataset(loaded.records, tokenizer, section.max_length, "skip")
        rows = [{"input_ids": ids, "labels": labels}
                for ids, labels in zip(dataset["input_ids"], dataset["labels"])]
        stats = vars(masks)
    else:
        rows = [window for record in loaded.records
                for window in _windows(tokenizer(record["text"])["input_ids"], section.max_length)]
        stats = {"documents": len(loaded.records)}
    stats = {**stats, "examples": len(rows), "tokens": sum(len(r["input_ids"]) for r in rows),
             "loss_tokens": sum(scored(r["labels"]) for r in rows)}
    return Examples(rows, loaded.report, stats)


def _windows(ids: list[int], max_length: int) -> list[dict]:
    """Consecutive windows of a document; a window of one token predicts nothing and is left out."""
    return [{"input_ids": ids[s:s + max_length], "labels": ids[s:s + max_length]}
            for s in range(0, len(ids), max_length) if len(ids[s:s + max_length]) >= 2]


def scored(labels: list[int]) -> int:
    """Positions whose next token carries the loss (the rows a teacher contributes)."""
    return sum(label != IGNORE_INDEX for label in labels[1:])


class Rows(torch.utils.data.Dataset):
    """The examples for the Trainer, each with its index (`example`) for the teacher cache."""

    def __init__(self, rows: list[dict]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return {**self.rows[i], "example": i}


class Collator:
    """Right-padded batches: input_ids (pad id), labels (-100), attention_mask and, with
    `with_index`, the examples' indices."""

    def __init__(self, pad_id: int, with_index: bool = True):
        self.pad_id, self.with_index = pad_id, with_index

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        length = max(len(r["input_ids"]) for r in rows)
        batch = {"input_ids": torch.full((len(rows), length), self.pad_id, dtype=torch.long),
                 "labels": torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long),
                 "attention_mask": torch.zeros((len(rows), length), dtype=torch.long)}
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            batch["input_ids"][i, :n] = torch.tensor(row["input_ids"])
            batch["labels"][i, :n] = torch.tensor(row["labels"])
            batch["attention_mask"][i, :n] = 1
        if self.with_index:
            batch["example"] = torch.tensor([r["example"] for r in rows], dtype=torch.long)
        return batch
