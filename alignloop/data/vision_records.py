"""Vision records: the contracts of the record kinds with images, and image checks.

Four record kinds (docs/data-formats.md, "Vision records"), read from JSONL (or .json / .parquet)
with image files whose paths are relative to the data file (`alignloop.data.readers` resolves
them against each file's folder):

| kind              | normalised form                                                              |
|-------------------|------------------------------------------------------------------------------|
| vision_chat       | {"id", "messages": [{"role", "content": [parts]}, ...]}  (ends with assistant) |
| vision_prompt     | {"prompt_id", "prompt": [messages ending with user], "answer"?}               |
| vision_preference | {"prompt_id", "prompt": [...], "chosen": [assistant msgs], "rejected": [...]}  |
| image_text        | {"id", "content": [parts]}  (an image-text pair, e.g. a caption)              |

A part is {"type": "text", "text": str} or {"type": "image", "path": str}. On input, an image part
may omit "path" and take the next entry of the record's "images" list (TRL's layout), and a text
may hold `<|image|>` markers that do the same; the number of such placeholders must equal
len(images). Only user turns hold images. Every error names the file, line, field and reason.
Light imports only (pillow when an image is opened): the data layer, below `alignloop.vision`,
which encodes and batches these records for a model (alignloop/vision/data.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alignloop.data.errors import FieldError
from alignloop.data.ids import ROLES, record_id

IMAGE_TOKEN = "<|image|>"
VISION_KINDS = ("vision_chat", "vision_prompt", "vision_preference", "image_text")

_SHAPES = {
    "vision_chat": '{"messages": [{"role": "user", "content": [{"type": "image", "path": "img/1.png"}, '
                   '{"type": "text", "text": ...}]}, {"role": "assistant", "content": ...}]}',
    "vision_prompt": '{"prompt": [{"role": "user", "content": [{"type": "image", "path": ...}, ...]}]}',
    "vision_preference": '{"prompt": ..., "chosen": ..., "rejected": ...}',
    "image_text": '{"image": "img/1.png", "text": "a caption"}',
}


# ---- images -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ImageLimits:
    """What counts as a wrong size. Tiny images are almost always broken thumbnails or tracking
    pixels; huge ones are decompression bombs; very thin ones end up as one padded tile row."""

    min_side: int = 8
    max_pixels: int = 64_000_000
    max_aspect_ratio: float = 20.0


class ImageError(ValueError):
    """An image that cannot be used; the reason names the file."""


_CONVERTIBLE = {"1", "L", "P", "RGB", "RGBA", "LA", "PA", "CMYK", "YCbCr", "LAB", "HSV", "RGBX",
                "RGBa", "La"}


def check_image(path: str | Path, limits: ImageLimits = ImageLimits()) -> None:
    """Opens the header only (cheap): exists, is an image, has a usable size and mode."""
    _open(path, limits).close()


def load_image(path: str | Path, limits: ImageLimits = ImageLimits()):
    """The image as an RGB PIL image (EXIF rotation applied, first frame of an animation).

    Grey, palette, CMYK and other 8-bit modes are converted; transparency is composited over
    white (as transformers' `convert_to_rgb` does). Raises ImageError for a missing or unreadable
    file, a wrong size (`limits`) or 16/32-bit pixels.
    """
    from PIL import Image, ImageOps

    with _open(path, limits) as image:
        try:
            image.load()
            image = ImageOps.exif_transpose(image)
        except (OSError, ValueError, SyntaxError) as err:
            raise ImageError(f"cannot decode image {path}: {err}") from None
        if image.mode == "RGB":
            return image.copy()
        if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")
        return image.convert("RGB")


def _open(path: str | Path, limits: ImageLimits):
    from PIL import Image, UnidentifiedImageError

    if not os.path.isfile(path):
        raise ImageError(f"image not found: {path}")
    try:
        image = Image.open(path)
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as err:
        raise ImageError(f"not a readable image: {path} ({type(err).__name__}: {err})") from None
    width, height = image.size
    problem = None
    if min(width, height) < limits.min_side:
        problem = f"too small ({width}x{height} px; at least {limits.min_side} px a side)"
    elif width * height > limits.max_pixels:
        problem = f"too large ({width}x{height} px; at most {limits.max_pixels:,} pixels)"
    elif max(width, height) / min(width, height) > limits.max_aspect_ratio:
        problem = (f"too thin ({width}x{height} px; aspect ratio at most "
                   f"{limits.max_aspect_ratio:g}:1)")
    elif image.mode not in _CONVERTIBLE:
        problem = (f"{image.mode!r} pixels (16/32-bit) cannot be read as RGB: save it as an 8-bit "
                   "RGB or greyscale image")
    if problem:
        image.close()
        raise ImageError(f"image {path}: {problem}")
    return image


# ---- contracts ----------------------------------------------------------------------------------

def validate_vision_record(obj: Any, kind: str, base_dir: str | Path | None = None, *,
                           check_images: bool = True, limits: ImageLimits = ImageLimits()) -> dict:
    """Checks one record of a vision `kind` and returns its normalised form.

    Relative image paths become absolute, resolved against `base_dir` (the data file's folder). With
    `check_images`, each image's header is opened (exists, readable, size, mode). Raises
    FieldError naming the dotted field (`messages.0.content.1.path`, `images.2`).
    """
    if kind not in VISION_KINDS:
        raise ValueError(f"unknown vision record kind {kind!r} (expected {', '.join(VISION_KINDS)})")
    if not isinstance(obj, dict):
        raise FieldError(None, "expected a JSON object (one record)")
    images = _ImageList(obj, base_dir, check_images, limits)
    out = _VALIDATORS[kind](obj, images)
    images.all_used()
    if obj.get("metadata") is not None:
        out["metadata"] = obj["metadata"]
    return out


def _vision_chat(obj: dict, images: "_ImageList") -> dict:
    messages = _messages(_present(obj, "messages", "vision_chat"), "messages", images)
    if not any(m["role"] == "assistant" for m in messages):
        raise FieldError("messages", "no assistant turn (a chat record needs at least one)")
    if messages[-1]["role"] != "assistant":
        raise FieldError(f"messages.{len(messages) - 1}.role",
                         f"a chat must end with an assistant turn, got {messages[-1]['role']!r}")
    return {"id": record_id(obj, "id", messages), "messages": messages}


def _vision_prompt(obj: dict, images: "_ImageList") -> dict:
    key = "messages" if obj.get("prompt") is None and obj.get("messages") is not None else "prompt"
    prompt = _prompt(_present(obj, key, "vision_prompt"), key, images)
    out = {"prompt_id": record_id(obj, "prompt_id", prompt), "prompt": prompt}
    if obj.get("answer") is not None:
        out["answer"] = obj["answer"]
    return out


def _vision_preference(obj: dict, images: "_ImageList") -> dict:
    prompt = _prompt(_present(obj, "prompt", "vision_preference"), "prompt", images)
    chosen = _completion(_present(obj, "chosen", "vision_preference"), "chosen", images)
    rejected = _completion(_present(obj, "rejected", "vision_preference"), "rejected", images)
    if chosen == rejected:
        raise FieldError("rejected", "identical to chosen")
    return {"prompt_id": record_id(obj, "prompt_id", prompt), "prompt": prompt,
            "chosen": chosen, "rejected": rejected}


def _image_text(obj: dict, images: "_ImageList") -> dict:
    """{"image" | "images", "text"}: the images go before the text unless it places them itself."""
    if obj.get("image") is not None and obj.get("images") is not None:
        raise FieldError("image", "set 'image' or 'images', not both")
    text = _present(obj, "text", "image_text")
    if not isinstance(text, str) or not text.strip():
        raise FieldError("text", "expected a non-empty string")
    if obj.get("image") is not None:
        images.items = [("image", obj["image"])]
    if not images.items:
        raise FieldError("image", f"missing (an image_text record looks like {_SHAPES['image_text']})")
    parts = _text_parts(text, "text", images)
    if not any(part["type"] == "image" for part in parts):
        parts = [images.take("text") for _ in range(len(images.items))] + parts
    return {"id": record_id(obj, "id", parts), "content": parts}


_VALIDATORS = {"vision_chat": _vision_chat, "vision_prompt": _vision_prompt,
               "vision_preference": _vision_preference, "image_text": _image_text}


class _ImageList:
    """The record's `images` list, handed out in order to placeholders; resolves and checks paths."""

    def __init__(self, obj: dict, base_dir, check: bool, limits: ImageLimits):
        value = obj.get("images")
        if value is not None and not isinstance(value, list):
            raise FieldError("images", "expected a list of image paths")
        self.items = [(f"images.{i}", path) for i, path in enumerate(value or [])]
        self.used, self.base_dir, self.check, self.limits = 0, base_dir, check, limits

    def take(self, field: str) -> dict:
        if self.used >= len(self.items):
            raise FieldError(field, f"image placeholder #{self.used + 1} has no image: 'images' "
                             f"lists {len(self.items)} (one path per {{\"type\": \"image\"}} part "
                             f"or {IMAGE_TOKEN} marker)")
        where, path = self.items[self.used]
        self.used += 1
        return self.part(path, where)

    def part(self, path: Any, field: str) -> dict:
        if not isinstance(path, str) or not path.strip():
            raise FieldError(field, "expected an image path (a non-empty string)")
        if self.base_dir is not None and not os.path.isabs(path):
            path = os.path.abspath(os.path.join(self.base_dir, path))
        if self.check:
            try:
                check_image(path, self.limits)
            except ImageError as err:
                raise FieldError(field, str(err)) from None
        return {"type": "image", "path": path}

    def all_used(self) -> None:
        if self.used < len(self.items):
            raise FieldError("images", f"{len(self.items)} images given but the record has "
                             f"{self.used} placeholder(s) for them ({{\"type\": \"image\"}} parts "
                             f"without a path, or {IMAGE_TOKEN} markers in the text)")


def _prompt(value: Any, field: str, images: _ImageList) -> list[dict]:
    if isinstance(value, str):
        value = [{"role": "user", "content": value}]
    messages = _messages(value, field, images)
    if messages[-1]["role"] != "user":
        raise FieldError(f"{field}.{len(messages) - 1}.role",
                         f"a prompt must end with a user turn, got {messages[-1]['role']!r}")
    return messages


def _completion(value: Any, field: str, images: _ImageList) -> list[dict]:
    if isinstance(value, str):
        value = [{"role": "assistant", "content": value}]
    messages = _messages(value, field, images)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            raise FieldError(f"{field}.{i}.role",
                             f"expected an assistant message, got {message['role']!r}")
    return messages


def _messages(value: Any, field: str, images: _ImageList) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise FieldError(field, "expected a non-empty list of messages")
    messages = []
    for i, message in enumerate(value):
        where = f"{field}.{i}"
        if not isinstance(message, dict):
            raise FieldError(where, 'expected a message {"role": ..., "content": ...}')
        role = message.get("role")
        if role not in ROLES:
            raise FieldError(f"{where}.role",
                             f"unknown role {role!r} (expected system, user or assistant)")
        if role == "system" and i:
            raise FieldError(f"{where}.role", "a system message may only come first")
        content = _content(message.get("content"), f"{where}.content", role, images)
        messages.append({"role": role, "content": content})
    return messages


def _content(value: Any, field: str, role: str, images: _ImageList) -> list[dict]:
    """A string or a list of parts -> a list of parts; placeholders take paths from `images`."""
    if isinstance(value, str):
        parts = _text_parts(value, field, images)
    elif isinstance(value, list):
        parts = []
        for i, part in enumerate(value):
            parts += _part(part, f"{field}.{i}", images)
    else:
        raise FieldError(field, "expected a string or a list of parts "
                         '({"type": "text", "text": ...} / {"type": "image", "path": ...})')
    if role != "user" and any(part["type"] == "image" for part in parts):
        raise FieldError(field, f"only user turns may hold images, not {role} turns")
    if not any(part["type"] == "image" or part["text"].strip() for part in parts):
        raise FieldError(field, f"empty {role} turn")
    return parts


def _part(part: Any, field: str, images: _ImageList) -> list[dict]:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise FieldError(f"{field}.text", "expected a string")
        return _text_parts(part["text"], f"{field}.text", images)
    if kind == "image":
        path = part.get("path", part.get("image"))
        if path is None:
            return [images.take(field)]
        return [images.part(path, f"{field}.path" if "path" in part else f"{field}.image")]
    raise FieldError(field, 'expected {"type": "text", "text": ...} or {"type": "image", "path": ...}')


def _text_parts(text: str, field: str, images: _ImageList) -> list[dict]:
    """Splits `<|image|>` markers out of `text`; each takes the next entry of `images`."""
    pieces = text.split(IMAGE_TOKEN)
    parts = [{"type": "text", "text": pieces[0]}] if pieces[0] else []
    for piece in pieces[1:]:
        parts.append(images.take(field))
        if piece:
            parts.append({"type": "text", "text": piece})
    return parts


def _present(obj: dict, key: str, kind: str) -> Any:
    if obj.get(key) is None:
        raise FieldError(key, f"missing (a {kind} record looks like {_SHAPES[kind]})")
    return obj[key]


def image_paths(record: dict) -> list[str]:
    """The image paths of a normalised record, in the order their tokens appear."""
    messages = record.get("messages") or record.get("prompt") or [{"content": record.get("content", [])}]
    return [part["path"] for message in messages for part in message["content"]
            if part["type"] == "image"]
