"""Vision data: record contracts with images, image loading, and Mllama-format batches.

Four record kinds (docs/data-formats.md, "Vision records"), read from JSONL (or .json / .parquet)
with image files whose paths are relative to the data file:

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

Batches follow HF Mllama (reference C3): input_ids (B, L), attention_mask (B, L), labels (B, L)
with -100 on image tokens, non-assistant tokens and padding, pixel_values (B, N, T, 3, H, W),
aspect_ratio_ids (B, N) 1-based with 0 for padding, aspect_ratio_mask (B, N, T) and
cross_attention_mask (B, L, N, T): each text token attends to the real tiles of the latest image
(or run of consecutive images) before it, tokens before the first image to nothing. Images are
tiled by transformers' `MllamaImageProcessorPil` (pillow only: torchvision must never be
installed) and the sparse cross-attention spans come from transformers' own Mllama helpers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from alignloop.data.contracts import ROLES, record_id, stable_id
from alignloop.data.errors import DataError, FieldError
from alignloop.data.masks import IGNORE_INDEX, assistant_mask

IMAGE_TOKEN = "<|image|>"
VISION_KINDS = ("vision_chat", "vision_prompt", "vision_preference", "image_text")
# OpenAI CLIP statistics, as in the Llama 3.2 Vision processor config (reference C3).
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

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


def image_processor(tile_size: int = 560, max_tiles: int = 4):
    """transformers' pillow Mllama image processor: best canvas of at most `max_tiles` tiles of
    `tile_size` px, bilinear resize, pad, CLIP normalisation (Llama 3.2 Vision: 560 and 4)."""
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

    return MllamaImageProcessorPil(size={"height": tile_size, "width": tile_size},
                                   max_image_tiles=max_tiles, image_mean=CLIP_MEAN, image_std=CLIP_STD)


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


def read_vision_records(path: str | Path, kind: str, on_error: str = "raise", *,
                        check_images: bool = True, limits: ImageLimits = ImageLimits()):
    """Reads a data file or directory as `kind` records (a `ReadResult`); image paths are
    resolved against each data file's folder. Errors as `alignloop.data.readers.read_records`."""
    from alignloop.data.readers import ReadResult, check_rows, data_files, read_rows

    result = ReadResult([])
    for file in data_files(path):
        validate = _validator(kind, file.parent, check_images, limits)
        unit = "row" if file.suffix == ".parquet" else "line"
        result.extend(check_rows(read_rows(file), kind, on_error, file=str(file), unit=unit,
                                 validate=validate))
    return result


def _validator(kind: str, base_dir, check_images: bool, limits: ImageLimits):
    def validate(obj, _kind):
        return validate_vision_record(obj, kind, base_dir, check_images=check_images, limits=limits)
    return validate


# ---- encoding: one record -> token ids, labels and image tiles ----------------------------------

@dataclass
class Encoded:
    """One example before batching. `pixel_values` (n, T, 3, H, W), `aspect_ratio_ids` (n,),
    `aspect_ratio_mask` (n, T), `num_tiles` (n,), for its n images (n may be 0)."""

    input_ids: list[int]
    labels: list[int]
    pixel_values: np.ndarray | None = None
    aspect_ratio_ids: np.ndarray | None = None
    aspect_ratio_mask: np.ndarray | None = None
    num_tiles: list[int] = field(default_factory=list)
    image_paths: list[str] = field(default_factory=list)  # in the order of their tokens


def render_content(parts: list[dict], image_token: str = IMAGE_TOKEN) -> str:
    """Parts as chat-template text: each image becomes one `<|image|>` (reference E: the mllama
    template renders image parts this way)."""
    return "".join(image_token if part["type"] == "image" else part["text"] for part in parts)


def text_messages(messages: list[dict], image_token: str = IMAGE_TOKEN) -> list[dict]:
    return [{"role": m["role"], "content": render_content(m["content"], image_token)} for m in messages]


class VisionEncoder:
    """Turns normalised vision records into `Encoded` examples for a tokenizer and processor.

    `max_length` truncates from the right; an example whose truncation cuts an image token off,
    or leaves no trained token, is an error naming the record. `limits` apply to every image.
    """

    def __init__(self, tokenizer, processor=None, max_length: int | None = None,
                 limits: ImageLimits = ImageLimits(), image_token: str = IMAGE_TOKEN):
        self.tokenizer, self.processor, self.max_length = tokenizer, processor, max_length
        self.limits, self.image_token = limits, image_token
        self.image_token_id = image_token_id(tokenizer, image_token)

    def chat(self, record: dict) -> Encoded:
        """Loss on the assistant turns (content and end of turn) only."""
        ids, mask = assistant_mask(self.tokenizer, text_messages(record["messages"], self.image_token))
        return self._finish(record, "id", ids, mask, need_labels=True)

    def prompt(self, record: dict) -> Encoded:
        """The prompt and the assistant header, for generation; no labels."""
        text = self.tokenizer.apply_chat_template(text_messages(record["prompt"], self.image_token),
                                                  tokenize=False, add_generation_prompt=True)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self._finish(record, "prompt_id", ids, [0] * len(ids), need_labels=False)

    def preference(self, record: dict) -> tuple[Encoded, Encoded]:
        """(chosen, rejected), each the prompt plus one answer, loss on the answer."""
        return tuple(self.chat({"id": record["prompt_id"], "prompt": record["prompt"],
                                "messages": record["prompt"] + record[side]})
                     for side in ("chosen", "rejected"))

    def image_text(self, record: dict) -> Encoded:
        """`<|begin_of_text|>` + the pair's text with its image tokens + `<|end_of_text|>`; loss on
        the text and the end token (captioning, as in adapter pretraining)."""
        tok = self.tokenizer
        text = render_content(record["content"], self.image_token)
        ids = [tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"]
        eos = tok.convert_tokens_to_ids("<|end_of_text|>")
        ids.append(eos if isinstance(eos, int) and eos != tok.unk_token_id else tok.eos_token_id)
        mask = [0] + [1] * (len(ids) - 1)
        return self._finish(record, "id", ids, mask, need_labels=True)

    def _finish(self, record: dict, id_key: str, ids: list[int], mask: list[int],
                need_labels: bool) -> Encoded:
        rid = record.get(id_key, "?")
        paths = image_paths(record)
        if self.max_length is not None:
            ids, mask = ids[:self.max_length], mask[:self.max_length]
        found = ids.count(self.image_token_id)
        if found != len(paths):
            reason = (f"{len(paths)} image(s) but {found} {self.image_token} token(s) in the "
                      "tokenized text")
            if self.max_length is not None:
                reason += (f" after truncation to max_length={self.max_length} (raise max_length "
                           "or put the image earlier)")
            raise _record_error(rid, None, reason)
        labels = [tok if keep and tok != self.image_token_id else IGNORE_INDEX
                  for tok, keep in zip(ids, mask)]
        if need_labels and all(label == IGNORE_INDEX for label in labels):
            raise _record_error(rid, None, "no trained token left (the answer was truncated away; "
                                f"max_length={self.max_length})")
        encoded = Encoded(ids, labels, image_paths=paths)
        if paths:
            self._add_images(encoded, rid, record)
        return encoded

    def _add_images(self, encoded: Encoded, rid: str, record: dict) -> None:
        if self.processor is None:
            return
        pictures = []
        for path, field_name in zip(encoded.image_paths, _image_fields(record)):
            try:
                pictures.append(load_image(path, self.limits))
            except ImageError as err:
                raise _record_error(rid, field_name, str(err)) from None
        out = self.processor([pictures], return_tensors="np")
        encoded.pixel_values = out["pixel_values"][0]            # (n, T, 3, H, W)
        encoded.aspect_ratio_ids = out["aspect_ratio_ids"][0]    # (n,)
        encoded.aspect_ratio_mask = out["aspect_ratio_mask"][0]  # (n, T)
        encoded.num_tiles = list(out["num_tiles"][0])


def pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def image_token_id(tokenizer, image_token: str = IMAGE_TOKEN) -> int:
    """The id of `image_token`, or a ValueError that says how to add it."""
    ids = tokenizer(image_token, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"the tokenizer has no {image_token} token (it splits into {len(ids)} "
                         f"tokens); add it with tokenizer.add_special_tokens({{'additional_special_"
                         f"tokens': ['{image_token}']}}) and resize the model's embeddings")
    return ids[0]


def _image_fields(record: dict) -> list[str]:
    """Dotted fields of the record's image paths, in order (for error messages)."""
    if "content" in record:
        return [f"content.{j}.path" for j, p in enumerate(record["content"]) if p["type"] == "image"]
    key = "prompt" if "prompt" in record else "messages"  # images are only in prompts and chats
    return [f"{key}.{i}.content.{j}.path" for i, m in enumerate(record[key])
            for j, p in enumerate(m["content"]) if p["type"] == "image"]


def _record_error(rid: str, field_name: str | None, reason: str) -> DataError:
    return DataError(reason, file=f"record {rid!r}", field=field_name)


# ---- batching -----------------------------------------------------------------------------------

def collate(examples: list[Encoded], pad_id: int, image_token_id: int, max_tiles: int | None = None,
            padding_side: str = "right") -> dict:
    """Pads `examples` into one Mllama batch of torch tensors (module docstring for the keys).

    Image keys are left out when no example has an image (a text-only batch, which Mllama runs
    without its cross-attention layers). `max_tiles` defaults to the examples' tile dimension.
    Padding rows of cross_attention_mask are 0; padding images have aspect_ratio_id 0 and, as in
    transformers' processor, aspect_ratio_mask 1 on their first tile only.
    """
    import torch
    from transformers.models.mllama.processing_mllama import (
        convert_sparse_cross_attention_mask_to_dense, get_cross_attention_token_mask)

    batch, length = len(examples), max(len(e.input_ids) for e in examples)
    input_ids = torch.full((batch, length), pad_id, dtype=torch.long)
    labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((batch, length), dtype=torch.long)
    starts = [length - len(e.input_ids) if padding_side == "left" else 0 for e in examples]
    for b, (e, s) in enumerate(zip(examples, starts)):
        input_ids[b, s:s + len(e.input_ids)] = torch.tensor(e.input_ids)
        labels[b, s:s + len(e.labels)] = torch.tensor(e.labels)
        attention_mask[b, s:s + len(e.input_ids)] = 1
    out = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    with_images = [e for e in examples if e.num_tiles]
    if not with_images:
        return out
    images = max(len(e.num_tiles) for e in examples)
    tiles = max_tiles or with_images[0].pixel_values.shape[1]
    _, _, channels, height, width = with_images[0].pixel_values.shape
    pixel_values = torch.zeros((batch, images, tiles, channels, height, width))  # (B, N, T, 3, H, W)
    aspect_ratio_ids = torch.zeros((batch, images), dtype=torch.long)           # (B, N)
    aspect_ratio_mask = torch.zeros((batch, images, tiles), dtype=torch.long)   # (B, N, T)
    aspect_ratio_mask[:, :, 0] = 1
    cross = torch.zeros((batch, length, images, tiles), dtype=torch.long)       # (B, L, N, T)
    for b, (e, s) in enumerate(zip(examples, starts)):
        n = len(e.num_tiles)
        if not n:
            continue
        t = e.pixel_values.shape[1]
        pixel_values[b, :n, :t] = torch.from_numpy(e.pixel_values)
        aspect_ratio_ids[b, :n] = torch.from_numpy(e.aspect_ratio_ids)
        aspect_ratio_mask[b, :n, :t] = torch.from_numpy(e.aspect_ratio_mask)
        spans = get_cross_attention_token_mask(e.input_ids, image_token_id)
        dense = convert_sparse_cross_attention_mask_to_dense([spans], [e.num_tiles], tiles,
                                                             len(e.input_ids))  # (1, l, n, T)
        cross[b, s:s + len(e.input_ids), :n] = torch.from_numpy(dense[0])
    out.update(pixel_values=pixel_values, aspect_ratio_ids=aspect_ratio_ids,
               aspect_ratio_mask=aspect_ratio_mask, cross_attention_mask=cross)
    return out


class VisionCollator:
    """`collate_fn` for a DataLoader over normalised records of one vision kind.

    - vision_chat, image_text: one Mllama batch (loss on assistant turns / on the text).
    - vision_prompt: the prompts with the generation header, left-padded, without labels' loss.
    - vision_preference: {"chosen": batch, "rejected": batch}, padded to the same length and
      image count so that `torch.cat` of the two along dim 0 is one forward pass.
    """

    def __init__(self, tokenizer, processor, kind: str = "vision_chat", max_length: int | None = None,
                 limits: ImageLimits = ImageLimits(), padding_side: str | None = None):
        if kind not in VISION_KINDS:
            raise ValueError(f"unknown vision record kind {kind!r} (expected {', '.join(VISION_KINDS)})")
        self.encoder = VisionEncoder(tokenizer, processor, max_length, limits)
        self.kind, self.processor = kind, processor
        self.padding_side = padding_side or ("left" if kind == "vision_prompt" else "right")
        self.pad_id = pad_id(tokenizer)

    def __call__(self, records: list[dict]) -> dict:
        if self.kind == "vision_preference":
            pairs = [self.encoder.preference(record) for record in records]
            both = self._collate([chosen for chosen, _ in pairs] + [rejected for _, rejected in pairs])
            n = len(records)
            return {"chosen": {k: v[:n] for k, v in both.items()},
                    "rejected": {k: v[n:] for k, v in both.items()}}
        encode = {"vision_chat": self.encoder.chat, "vision_prompt": self.encoder.prompt,
                  "image_text": self.encoder.image_text}[self.kind]
        return self._collate([encode(record) for record in records])

    def _collate(self, examples: list[Encoded]) -> dict:
        tiles = getattr(self.processor, "max_image_tiles", None)
        return collate(examples, self.pad_id, self.encoder.image_token_id, tiles, self.padding_side)
