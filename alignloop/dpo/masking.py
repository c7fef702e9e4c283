"""Llama 3's formatting-token mask for DPO (reference A5, paper §4.1.4), and its ChatML equivalent.

Header tokens (`<|start_header_id|>`, the role name, `<|end_header_id|>`) and termination tokens
(`<|eot_id|>`, `<|eom_id|>`, `<|end_of_text|>`) are the same in the chosen and the rejected
response, so the contrastive loss pushes them up and down at once; Llama 3 saw tail repetition and
abrupt end-of-turns from that and masked them out of the loss in both responses. The NLL term on
the chosen response uses the same mask.

Pure functions on token ids (no torch, no TRL), so the mask can be tested exactly. The text that
follows a header (`\\n\\n`) is ordinary text and stays in the loss.

ChatML (`<|im_start|>role\\n ... <|im_end|>\\n`, SmolLM2, Qwen): the header runs from
`<|im_start|>` through the first token that holds a newline, `<|im_end|>` terminates, and the
whitespace token the template puts after a terminator is formatting too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

HEADER_START, HEADER_END = "<|start_header_id|>", "<|end_header_id|>"
TERMINATORS = ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>")
CHATML_START, CHATML_END = "<|im_start|>", "<|im_end|>"


@dataclass(frozen=True)
class FormattingIds:
    """The ids of the formatting tokens in one tokenizer (None / absent when it lacks one)."""

    header_start: int | None
    header_end: int | None
    terminators: frozenset[int]
    # ChatML: a header ends at the first token holding a newline (there is no end-of-header token);
    # whitespace-only tokens right after a terminator are the template's separator.
    newline_ends_header: bool = False
    newlines: frozenset[int] = frozenset()
    separators: frozenset[int] = frozenset()

    @property
    def empty(self) -> bool:
        return self.header_start is None and self.header_end is None and not self.terminators


def formatting_ids(tokenizer) -> FormattingIds:
    """Looks the formatting tokens up by name in `tokenizer`'s vocabulary: ChatML's when its chat
    template writes `<|im_start|>` and the vocabulary has it as a token, else Llama 3's."""
    vocab = tokenizer.get_vocab()
    chatml = CHATML_START in vocab and CHATML_START in str(tokenizer.chat_template or "")
    if not chatml:
        return FormattingIds(header_start=vocab.get(HEADER_START), header_end=vocab.get(HEADER_END),
                             terminators=frozenset(vocab[t] for t in TERMINATORS if t in vocab))
    texts = {i: tokenizer.convert_tokens_to_string([t]) for t, i in vocab.items()}
    return FormattingIds(header_start=vocab[CHATML_START], header_end=None,
                         terminators=frozenset(vocab[t] for t in (CHATML_END,) if t in vocab),
                         newline_ends_header=True,
                         newlines=frozenset(i for i, text in texts.items() if "\n" in text),
                         separators=frozenset(i for i, text in texts.items()
                                              if text and not text.strip()))


def formatting_positions(ids: Sequence[int], fmt: FormattingIds) -> list[bool]:
    """True at every formatting token of `ids`: each header from `<|start_header_id|>` through
    `<|end_header_id|>` (the role name between them included) and each terminator.

    Scan the whole sequence (prompt included): whether a token is a role name depends on the
    header that opened before it. A header cut off by truncation counts to the end.
    """
    out, in_header, after_terminator = [], False, False
    for token in ids:
        if token == fmt.header_start:
            in_header = True
        separator = after_terminator and token in fmt.separators
        out.append(in_header or token == fmt.header_end or token in fmt.terminators or separator)
        if token == fmt.header_end or (fmt.newline_ends_header and in_header and token in fmt.newlines
                                       and token != fmt.header_start):
            in_header = False
        after_terminator = token in fmt.terminators
    return out


def loss_mask(ids: Sequence[int], completion_mask: Sequence[int], fmt: FormattingIds) -> list[int]:
    """`completion_mask` (1 on the response's tokens) with the formatting tokens set to 0."""
    if len(ids) != len(completion_mask):
        raise ValueError(f"{len(ids)} token ids but {len(completion_mask)} mask values")
    return [int(bool(keep) and not formatting)
            for keep, formatting in zip(completion_mask, formatting_positions(ids, fmt))]
