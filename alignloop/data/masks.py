"""Loss masks: which tokens of a chat example the model is trained on.

The loss falls on the assistant's tokens only: each assistant turn's content and its end-of-turn
token (Llama 3: `<|eot_id|>`), never the headers, system or user text. An example whose mask is
empty (nothing of the assistant survives truncation) or full (the template marked everything) is
a mistake that peer tools train on silently; here it is an error or a counted skip.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from alignloop.data.templates import end_of_turn_token, has_generation_markers

logger = logging.getLogger("alignloop.data")

IGNORE_INDEX = -100  # label value that the HF / TRL losses skip


class MaskError(ValueError):
    """A chat example whose loss mask cannot be trusted; the message names the record."""


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def assistant_mask(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """(input_ids, mask) for one conversation; mask[i] = 1 on assistant tokens.

    With `{% generation %}` markers the tokenizer computes the mask. Without them, each assistant
    turn's span is the text that rendering `messages[:i+1]` adds to `messages[:i]` followed by
    the generation prompt, less any whitespace the template writes after the turn's end-of-turn
    token (ChatML's "\n" after `<|im_end|>`: generation stops at the token, so the model never
    writes that newline and is not trained to); this needs the template to render prefixes as
    prefixes.
    """
    if has_generation_markers(tokenizer.chat_template or ""):
        out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        return list(out["input_ids"]), list(out["assistant_masks"])
    return _mask_by_prefixes(tokenizer, messages)


def _mask_by_prefixes(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    text = render(tokenizer, messages)
    end_token = end_of_turn_token(tokenizer)
    spans = []  # (start, end) character spans of assistant turns in `text`
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        upto = render(tokenizer, messages[:i + 1])
        if not (upto.startswith(before) and text.startswith(upto)):
            raise MaskError(
                "the chat template has no {% generation %} markers and does not render a "
                "conversation's prefixes as prefixes, so the assistant tokens cannot be found; "
                "add {% generation %}...{% endgeneration %} around the assistant content in the "
                "template, or set model.chat_template: llama3")
        spans.append((len(before), _turn_end(upto, len(before), end_token)))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [int(end > start and any(s <= start and end <= e for s, e in spans))
            for start, end in enc["offset_mapping"]]
    return list(enc["input_ids"]), mask


def _turn_end(upto: str, start: int, end_token: str | None) -> int:
    """Where the assistant turn `upto[start:]` ends: after its end-of-turn token when only
    whitespace follows that token, else at the end of the rendered text."""
    kept = upto.rstrip()
    if end_token and len(kept) > start and kept.endswith(end_token):
        return len(kept)
    return len(upto)


def tokenize_chat(tokenizer, messages: list[dict], max_length: int | None,
                  record_id: str = "?") -> dict[str, list[int]]:
    """{"input_ids", "labels"} for one example, truncated to `max_length`.

    Raises MaskError when no assistant token survives truncation, or when the mask covers every
    token (a template that marks the prompt as well).
    """
    return _encode(tokenizer, messages, max_length, record_id)[0]


def _encode(tokenizer, messages, max_length, record_id) -> tuple[dict[str, list[int]], int]:
    input_ids, mask = assistant_mask(tokenizer, messages)
    if mask and all(mask):
        raise MaskError(f"record '{record_id}': the chat template marks every token as assistant "
                        "text, so the prompt would be trained on; check its {% generation %} markers")
    full_length = len(input_ids)
    if max_length is not None:
        input_ids, mask = input_ids[:max_length], mask[:max_length]
    if not any(mask):
        raise MaskError(f"record '{record_id}': no assistant token is left after truncation to "
                        f"max_length={max_length} (the example has {full_length} tokens); raise "
                        "sft.max_length, shorten the prompt, or set sft.empty_mask: skip")
    labels = [tok if keep else IGNORE_INDEX for tok, keep in zip(input_ids, mask)]
    return {"input_ids": input_ids, "labels": labels}, full_length


@dataclass
class MaskStats:
    examples: int = 0
    skipped_empty: int = 0
    truncated: int = 0
    tokens: int = 0
    assistant_tokens: int = 0
    skipped_reasons: list[str] = field(default_factory=list)


def build_sft_dataset(records: list[dict], tokenizer, max_length: int | None,
                      empty_mask: str = "error"):
    """A `datasets.Dataset` of input_ids/labels from chat records, and its MaskStats.

    `empty_mask`: "error" raises MaskError on the first example with an empty mask; "skip"
    leaves it out, counts it and keeps a few reasons for the report.
    """
    from datasets import Dataset

    stats, rows = MaskStats(), {"input_ids": [], "labels": []}
    for record in records:
        try:
            row, full = _encode(tokenizer, record["messages"], max_length, record.get("id", "?"))
        except MaskError as err:
            if empty_mask != "skip" or "no assistant token" not in str(err):
                raise
            stats.skipped_empty += 1
            if len(stats.skipped_reasons) < 5:
                stats.skipped_reasons.append(str(err))
            continue
        stats.truncated += int(max_length is not None and full > max_length)
        stats.examples += 1
        stats.tokens += len(row["input_ids"])
        stats.assistant_tokens += sum(label != IGNORE_INDEX for label in row["labels"])
        rows["input_ids"].append(row["input_ids"])
        rows["labels"].append(row["labels"])
    if stats.skipped_empty:
        logger.warning("skipped %d example(s) with an empty loss mask, e.g. %s",
                       stats.skipped_empty, stats.skipped_reasons[0])
    if not stats.examples:
        raise MaskError("no training example is left after masking")
    return Dataset.from_dict(rows), stats
