"""Record ids and the small helpers that every record contract shares (text and vision kinds).

Ids, when a record does not give one, hash its normalised content, so that the same prompt gets
the same `prompt_id` in every file (STYLE.md: data crosses stages by key, not position).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from alignloop.data.errors import FieldError

ROLES = ("system", "user", "assistant")


def stable_id(value: Any) -> str:
    """First 16 hex digits of the sha1 of `value`'s canonical JSON (sorted keys, no spaces)."""
    text = json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


def record_id(obj: dict, key: str, content: Any) -> str:
    """obj[key] as a string (ints accepted), or a stable hash of `content` when absent."""
    value = obj.get(key)
    if value is None:
        return stable_id(content)
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str) or not value.strip():
        raise FieldError(key, f"expected a non-empty string, got {json_type(value)}")
    return value


def json_type(value: Any) -> str:
    """What JSON would call `value`'s type, with an article: 'a number', 'an object', ..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({json.dumps(value)})"
    if isinstance(value, (int, float)):
        return f"a number ({value!r})"
    if isinstance(value, str):
        return "an empty string" if not value else "a string"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return f"a {type(value).__name__}"
