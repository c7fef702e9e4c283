"""Parsing generator outputs into (question, answer) pairs; what cannot be used gets a reason.

`parse_qa` reads the `Q:` / `A:` lines that document templates ask for; `parse_answer` takes a
whole output as the answer to a seed prompt. Both return a `Parsed`: the usable pairs and one
(reason, fragment) problem per unusable piece. Reasons:

| reason                    | meaning                                                          |
|---------------------------|------------------------------------------------------------------|
| `empty_output`            | nothing but whitespace                                           |
| `no_qa_lines`             | text without a single `Q:` line                                  |
| `missing_answer`          | a `Q:` with no `A:` before the next `Q:` or the end              |
| `answer_without_question` | an `A:` with no open question                                    |
| `empty_question`          | `Q:` with nothing after it                                       |
| `empty_answer`            | `A:` with nothing after it (or an empty answer to a prompt)      |
| `truncated`               | the output hit max_new_tokens: its last piece may be cut off     |
| `answer_pattern`          | the answer lacks the recipe's `answer_pattern`                   |
"""

from __future__ import annotations

import re
from typing import NamedTuple

# "Q: ...", "Question 2: ...", "2. Q: ...", "A: ..." at the start of a line (case-insensitive)
_MARKER = re.compile(r"^\s*(?:\d+[.)]\s*)?(q|question|a|answer)\s*\d*\s*:\s?(.*)$", re.IGNORECASE)


class Parsed(NamedTuple):
    pairs: list[tuple[str | None, str]]  # (question, or None for the seed prompt's; answer)
    problems: list[tuple[str, str]]      # (reason, the text it concerns)


def parse_qa(text: str, finish_reason: str = "stop", answer_pattern: str | None = None) -> Parsed:
    """Q:/A: pairs in `text`. Text before the first marker is ignored (a preamble); lines
    without a marker continue the question or answer above them. When the output was cut off
    (`finish_reason == "length"`), its last piece is dropped as `truncated`."""
    if not text.strip():
        return Parsed([], [("empty_output", text)])
    pieces = _pieces(text)  # [[question or None, answer or None], ...] in order
    problems: list[tuple[str, str]] = []
    if finish_reason == "length":
        last = pieces.pop() if pieces else None
        problems.append(("truncated", _show(last) if last else text))
    elif not pieces:
        return Parsed([], [("no_qa_lines", text)])
    pairs = []
    for question, answer in pieces:
        reason = _qa_reason(question, answer, answer_pattern)
        if reason:
            problems.append((reason, _show([question, answer])))
        else:
            pairs.append((question.strip(), answer.strip()))
    return Parsed(pairs, problems)


def parse_answer(text: str, finish_reason: str = "stop", answer_pattern: str | None = None) -> Parsed:
    """The whole output as the answer to the seed prompt (question None)."""
    if finish_reason == "length":
        return Parsed([], [("truncated", text)])
    if not text.strip():
        return Parsed([], [("empty_answer", text)])
    if answer_pattern is not None and not re.search(answer_pattern, text):
        return Parsed([], [("answer_pattern", text)])
    return Parsed([(None, text.strip())], [])


def _pieces(text: str) -> list[list[str | None]]:
    """Groups marker lines and their continuations into [question, answer] pieces."""
    pieces: list[list[str | None]] = []
    field = None  # 0: inside a question, 1: inside an answer, None: before the first marker
    for line in text.splitlines():
        match = _MARKER.match(line)
        if match is None:
            if field is not None and pieces[-1][field] is not None:
                pieces[-1][field] += "\n" + line
            continue
        is_question, content = match.group(1).lower().startswith("q"), match.group(2)
        if is_question or not pieces or pieces[-1][1] is not None:
            pieces.append([None, None])  # an A: after an answer opens a piece without a question
        field = 0 if is_question else 1
        pieces[-1][field] = content
    return pieces


def _qa_reason(question: str | None, answer: str | None, answer_pattern: str | None) -> str | None:
    if question is None:
        return "answer_without_question"
    if not question.strip():
        return "empty_question"
    if answer is None:
        return "missing_answer"
    if not answer.strip():
        return "empty_answer"
    if answer_pattern is not None and not re.search(answer_pattern, answer):
        return "answer_pattern"
    return None


def _show(piece: list[str | None]) -> str:
    question, answer = piece
    return "\n".join(part for part in (question is not None and f"Q: {question.strip()}",
                                        answer is not None and f"A: {answer.strip()}") if part)
