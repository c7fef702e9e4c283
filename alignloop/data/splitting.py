"""Long examples cut into windows of at most `max_length` tokens (`sft.long_examples: split`).

Window k covers tokens [k * stride, k * stride + max_length) of the example, stride =
max_length - overlap. The first `overlap` tokens of every window after the first are context
only (label -100): their labels were trained at the end of the window before, so every label of
the example is trained exactly once, and each later window starts with `overlap` tokens of what
came before. With overlap 0 a window's first token has nothing before it to be predicted from,
so its label is not trained (the collator drops the first label of every sequence).

A window with no assistant label left (e.g. the middle of a long user document; the first token
does not count, nothing predicts it) is skipped and counted, never trained with an all-ignored
mask.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from alignloop.data.masks import IGNORE_INDEX


@dataclass
class SplitStats:
    examples_split: int = 0  # examples longer than max_length
    windows: int = 0  # windows kept (short examples count as one)
    skipped_windows: int = 0  # windows without an assistant token
    skipped_examples: list[int] = field(default_factory=list)  # first few rows with a skipped window


def split_example(input_ids: list[int], labels: list[int], max_length: int,
                  overlap: int = 0) -> list[dict[str, list[int]]]:
    """The windows of one example, in order, as {"input_ids", "labels"}; see the module docstring.

    Windows without an assistant label are included here (the caller counts and drops them).
    """
    if not 0 <= overlap < max_length:
        raise ValueError(f"split_overlap must be in [0, max_length={max_length}), got {overlap}")
    stride, n, windows, start = max_length - overlap, len(input_ids), [], 0
    while True:
        end = min(start + max_length, n)
        window_labels = list(labels[start:end])
        if start > 0:
            window_labels[:overlap] = [IGNORE_INDEX] * min(overlap, len(window_labels))
        windows.append({"input_ids": list(input_ids[start:end]), "labels": window_labels})
        if end == n:
            return windows
        start += stride


def split_dataset(dataset, max_length: int, overlap: int = 0):
    """A `datasets.Dataset` of input_ids/labels with every long row split; and its SplitStats."""
    from datasets import Dataset

    stats, rows = SplitStats(), {"input_ids": [], "labels": []}
    for i, row in enumerate(dataset):
        windows = split_example(row["input_ids"], row["labels"], max_length, overlap)
        stats.examples_split += len(windows) > 1
        for window in windows:
            # the first label of a sequence is never predicted (nothing comes before it)
            if all(label == IGNORE_INDEX for label in window["labels"][1:]):
                stats.skipped_windows += 1
                if len(stats.skipped_examples) < 5 and i not in stats.skipped_examples:
                    stats.skipped_examples.append(i)
                continue
            stats.windows += 1
            rows["input_ids"].append(window["input_ids"])
            rows["labels"].append(window["labels"])
    return Dataset.from_dict(rows), stats
