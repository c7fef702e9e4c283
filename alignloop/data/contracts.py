"""Row contracts: the four record kinds alignloop reads, and the normalised form of each.

| kind       | normalised form                                                           |
|------------|---------------------------------------------------------------------------|
| chat       | {"id", "messages": [{"role", "content"}, ...]}  (ends with assistant)      |
| prompt     | {"prompt_id", "prompt": [messages ending with user], "answer"?}            |
| preference | {"prompt_id", "prompt": [...], "chosen": [assistant msgs], "rejected": [...]} |
| ranking    | {"prompt_id", "prompt": [...], "responses": [[assistant msgs], ...]}  best first |
| document   | {"id", "text", "title"?}  (a seed document for synthetic data)              |

Inputs follow TRL's conversational formats (explicit prompt for preferences); see
docs/data-formats.md. `validate_record` raises `FieldError(field, reason)` with a dotted field
path (`messages.2.content`); the readers add the file and line. Optional `metadata` (any JSON) is
kept on every kind. Ids, when not given, hash the (normalised) messages so that the same prompt
gets the same `prompt_id` in every file (STYLE.md: data crosses stages by key, not position).
"""

from __future__ import annotations

import itertools
from typing import Any

from alignloop.data.errors import FieldError
from alignloop.data.ids import ROLES, record_id, stable_id
from alignloop.data.ids import json_type as _a
from alignloop.data.vision_records import VISION_KINDS, validate_vision_record

# Records with images (VISION_KINDS): their contracts are in alignloop/data/vision_records.py.
KINDS = ("chat", "prompt", "preference", "ranking", "document") + VISION_KINDS

_SHAPES = {
    "chat": '{"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}]}',
    "prompt": '{"prompt": "text"} or {"prompt": [messages ending with a user turn]}',
    "preference": '{"prompt": ..., "chosen": ..., "rejected": ...}',
    "ranking": '{"prompt": ..., "responses": [best, ..., worst]} '
               'or {"prompt": ..., "edited": ..., "chosen": ..., "rejected": ...}',
    "document": '{"id"?: "doc-1", "text": "...", "title"?: "..."}',
}


def check_kind(kind: str) -> None:
    """Raises ValueError unless `kind` is one of KINDS."""
    if kind not in KINDS:
        raise ValueError(f"unknown record kind {kind!r} (expected {', '.join(KINDS)})")


def validate_record(obj: Any, kind: str) -> dict:
    """Checks one record (a parsed JSON object) against `kind` and returns its normalised form.

    Raises FieldError naming the dotted field and the reason; ValueError for an unknown kind.
    Normalising an already-normalised record returns an equal record.
    """
    check_kind(kind)
    if kind in VISION_KINDS:  # image paths as given (readers resolve them against the file)
        return validate_vision_record(obj, kind)
    if not isinstance(obj, dict):
        raise FieldError(None, f"expected a JSON object (one record), got {_a(obj)}")
    return _VALIDATORS[kind](obj)



def ranking_to_pairs(record: dict) -> list[dict]:
    """Expands a ranking (best first) into preference records, one per pair i < j.

    Pairs come in order (0, 1), (0, 2), ..., (1, 2), ...; each keeps `prompt_id` and records
    which ranks it compares in `rank_pair: [i, j]` (the better response is `chosen`).
    """
    rec = validate_record(record, "ranking")
    responses = rec["responses"]
    return [{"prompt_id": rec["prompt_id"], "prompt": rec["prompt"], "chosen": responses[i],
             "rejected": responses[j], "rank_pair": [i, j], **_kept(rec)}
            for i, j in itertools.combinations(range(len(responses)), 2)]


def preference_to_ranking(record: dict) -> dict:
    """A preference record as a two-response ranking: responses [chosen, rejected]."""
    rec = validate_record(record, "preference")
    return {"prompt_id": rec["prompt_id"], "prompt": rec["prompt"],
            "responses": [rec["chosen"], rec["rejected"]], **_kept(rec)}


# ---- the four kinds ---------------------------------------------------------------------------

def _chat(obj: dict) -> dict:
    messages = _messages(_present(obj, "messages", "chat"), "messages")
    if not any(m["role"] == "assistant" for m in messages):
        raise FieldError("messages", "no assistant turn (a chat record needs at least one)")
    last = messages[-1]["role"]
    if last != "assistant":
        raise FieldError(f"messages.{len(messages) - 1}.role",
                         f"a chat must end with an assistant turn, got {last!r}")
    return {"id": record_id(obj, "id", messages), "messages": messages, **_kept(obj)}


def _prompt_record(obj: dict) -> dict:
    if obj.get("prompt") is not None and obj.get("messages") is not None:
        raise FieldError("messages", "set 'prompt' or 'messages', not both")
    key = "messages" if obj.get("prompt") is None and obj.get("messages") is not None else "prompt"
    prompt = _prompt(_present(obj, key, "prompt"), key)
    return {"prompt_id": record_id(obj, "prompt_id", prompt), "prompt": prompt,
            **_kept(obj, ("answer", "metadata"))}


def _preference(obj: dict) -> dict:
    prompt = _prompt(_present(obj, "prompt", "preference"), "prompt")
    chosen = _completion(_present(obj, "chosen", "preference"), "chosen")
    rejected = _completion(_present(obj, "rejected", "preference"), "rejected")
    if chosen == rejected:
        raise FieldError("rejected", "identical to chosen")
    return {"prompt_id": record_id(obj, "prompt_id", prompt), "prompt": prompt,
            "chosen": chosen, "rejected": rejected, **_kept(obj)}


def _ranking(obj: dict) -> dict:
    prompt = _prompt(_present(obj, "prompt", "ranking"), "prompt")
    named = _ranked(obj)
    responses = [_completion(value, field) for field, value in named]
    seen: dict[str, str] = {}
    for (field, _), response in zip(named, responses):
        key = stable_id(response)
        if key in seen:
            raise FieldError(field, f"identical to {seen[key]}")
        seen[key] = field
    return {"prompt_id": record_id(obj, "prompt_id", prompt), "prompt": prompt,
            "responses": responses, **_kept(obj)}


def _ranked(obj: dict) -> list[tuple[str, Any]]:
    """(field name, raw response) best first, from `responses` or edited/chosen/rejected."""
    named = [key for key in ("edited", "chosen", "rejected") if obj.get(key) is not None]
    value = obj.get("responses")
    if value is None:
        for key in ("chosen", "rejected"):
            _present(obj, key if named else "responses", "ranking")
        return [(key, obj[key]) for key in named]
    if named:
        raise FieldError("responses", f"set 'responses' or {'/'.join(named)}, not both")
    if not isinstance(value, list):
        raise FieldError("responses", f"expected a list of responses (best first), got {_a(value)}")
    if len(value) < 2:
        raise FieldError("responses", f"a ranking needs at least 2 responses, got {len(value)}")
    return [(f"responses.{i}", response) for i, response in enumerate(value)]


def _document(obj: dict) -> dict:
    text = _string(_present(obj, "text", "document"), "text")
    if not text.strip():
        raise FieldError("text", "empty document")
    if obj.get("title") is not None:
        _string(obj["title"], "title")
    return {"id": record_id(obj, "id", text), "text": text, **_kept(obj, ("title", "metadata"))}


_VALIDATORS = {"chat": _chat, "prompt": _prompt_record, "preference": _preference,
               "ranking": _ranking, "document": _document}


# ---- messages ---------------------------------------------------------------------------------

def _prompt(value: Any, field: str) -> list[dict]:
    """A prompt: a string (one user message) or messages ending with a user turn."""
    if isinstance(value, str):
        if not value.strip():
            raise FieldError(field, "empty prompt")
        return [{"role": "user", "content": value}]
    if not isinstance(value, list):
        raise FieldError(field, f"expected a string or a list of messages, got {_a(value)}")
    messages = _messages(value, field)
    last = messages[-1]["role"]
    if last != "user":
        raise FieldError(f"{field}.{len(messages) - 1}.role",
                         f"a prompt must end with a user turn, got {last!r}")
    return messages


def _completion(value: Any, field: str) -> list[dict]:
    """A response: a string (one assistant message) or a list of assistant messages."""
    if isinstance(value, str):
        if not value.strip():
            raise FieldError(field, "empty assistant turn")
        return [{"role": "assistant", "content": value}]
    if not isinstance(value, list):
        raise FieldError(field, f"expected a string or a list of assistant messages, got {_a(value)}")
    messages = _messages(value, field)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            raise FieldError(f"{field}.{i}.role", "expected an assistant message (the prompt goes "
                             f"in 'prompt'), got {message['role']!r}")
    return messages


def _messages(value: Any, field: str) -> list[dict]:
    """A non-empty list of {role, content} messages; a system message only first."""
    if not isinstance(value, list):
        raise FieldError(field, f"expected a list of messages, got {_a(value)}")
    if not value:
        raise FieldError(field, "empty list of messages")
    messages = [_message(message, f"{field}.{i}") for i, message in enumerate(value)]
    for i, message in enumerate(messages[1:], start=1):
        if message["role"] == "system":
            raise FieldError(f"{field}.{i}.role", "a system message may only come first")
    return messages


def _message(obj: Any, field: str) -> dict:
    if not isinstance(obj, dict):
        raise FieldError(field, f"expected a message {{\"role\": ..., \"content\": ...}}, got {_a(obj)}")
    hint = " (each message needs 'role' and 'content')"
    role = _string(obj.get("role"), f"{field}.role", hint)
    if role not in ROLES:
        raise FieldError(f"{field}.role", f"unknown role {role!r} (expected system, user or assistant)")
    content = _string(obj.get("content"), f"{field}.content", hint)
    if not content.strip():
        raise FieldError(f"{field}.content", f"empty {role} turn")
    return {"role": role, "content": content}


# ---- small helpers ----------------------------------------------------------------------------

def _present(obj: dict, key: str, kind: str) -> Any:
    """obj[key], or a FieldError showing what a record of `kind` looks like."""
    if obj.get(key) is None:
        raise FieldError(key, f"missing (a {kind} record looks like {_SHAPES[kind]})")
    return obj[key]


def _string(value: Any, field: str, hint: str = "") -> str:
    if value is None:
        raise FieldError(field, "missing" + hint)
    if not isinstance(value, str):
        raise FieldError(field, f"expected a string, got {_a(value)}")
    return value



def _kept(obj: dict, keys: tuple[str, ...] = ("metadata",)) -> dict:
    """The optional pass-through fields that are present (null counts as absent)."""
    return {key: obj[key] for key in keys if obj.get(key) is not None}
