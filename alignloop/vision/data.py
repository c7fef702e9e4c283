"""Vision batches: vision records (alignloop/data/vision_records.py) encoded for a tokenizer and
an image processor, and collated into HF Mllama-format batches.

Batches follow HF Mllama (reference C3): input_ids (B, L), attention_mask (B, L), labels (B, L)
with -100 on image tokens, non-assistant tokens and padding, pixel_values (B, N, T, 3, H, W),
aspect_ratio_ids (B, N) 1-based with 0 for padding, aspect_ratio_mask (B, N, T) and
cross_attention_mask (B, L, N, T): each text token attends to the real tiles of the latest image
(or run of consecutive images) before it, tokens before the first image to nothing. Images are
tiled by transformers' `MllamaImageProcessorPil` (pillow only: torchvision must never be
installed) and the sparse cross-attention spans come from transformers' own Mllama helpers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from alignloop.data.errors import DataError
from alignloop.data.masks import IGNORE_INDEX, assistant_mask
from alignloop.data.vision_records import (IMAGE_TOKEN, VISION_KINDS, ImageError, ImageLimits, image_paths,
                                           load_image)

# OpenAI CLIP statistics, as in the Llama 3.2 Vision processor config (reference C3).
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def image_processor(tile_size: int = 560, max_tiles: int = 4):
    """transformers' pillow Mllama image processor: best canvas of at most `max_tiles` tiles of
    `tile_size` px, bilinear resize, pad, CLIP normalisation (Llama 3.2 Vision: 560 and 4)."""
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

    return MllamaImageProcessorPil(size={"height": tile_size, "width": tile_size},
                                   max_image_tiles=max_tiles, image_mean=CLIP_MEAN, image_std=CLIP_STD)


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
