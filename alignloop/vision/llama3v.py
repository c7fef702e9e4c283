"""The Llama 3-V variant: SigLIP patch features, a two-block projector, image tokens in the text.

The second, smaller way alignloop gives a Llama eyes (issue 4, item 6), after the community
"Llama 3-V" design rather than the paper's cross-attention: a SigLIP vision encoder (transformers'
`SiglipVisionModel`) turns an image into P patch features (B, P, D_enc); a projector (a linear map
to the LM width, then two pre-norm self-attention blocks) turns them into P embeddings; these
take the place of P image tokens in the language model's input embeddings, so the LM reads them
like text. The `<|image|>` marker of a record becomes P image tokens in the collator; their
labels are always -100.

Because the encoder is frozen, its features can be computed once per image and cached on disk
(`FeatureCache`: one safetensors file per image, keyed by the sha256 of the image file's bytes,
under a folder keyed by the encoder's weights and the image preprocessing). Training then reads
the cache and never runs the encoder.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import uuid
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from alignloop.data.masks import IGNORE_INDEX
from alignloop.vision.config import LLAMA3V_TINY_ENCODER
from alignloop.vision.data import (IMAGE_TOKEN, ImageError, ImageLimits, VisionEncoder, load_image,
                                   pad_id)

# A SigLIP small enough for CPU tests: 32 px images of 8 px patches give P = 16 image tokens.
TINY_ENCODER = LLAMA3V_TINY_ENCODER


def tiny_encoder(seed: int = 0, **overrides):
    """A randomly initialised `SiglipVisionModel` with TINY_ENCODER (+ `overrides`)."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(seed)
    return SiglipVisionModel(SiglipVisionConfig(**{**TINY_ENCODER, **overrides})).eval()


def image_processor(encoder):
    """transformers' pillow SigLIP processor at the encoder's image size (resize, 1/255, mean and
    std 0.5); no torchvision."""
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    size = encoder.config.image_size
    return SiglipImageProcessorPil(size={"height": size, "width": size})


class Projector(nn.Module):
    """(N, P, D_enc) encoder features -> (N, P, D_lm) embeddings: a linear map, then `layers`
    pre-norm self-attention blocks (attention + GELU MLP) and a final LayerNorm."""

    def __init__(self, encoder_dim: int, lm_dim: int, heads: int, layers: int = 2):
        super().__init__()
        self.proj = nn.Linear(encoder_dim, lm_dim)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(lm_dim, heads, dim_feedforward=4 * lm_dim, dropout=0.0,
                                       activation="gelu", batch_first=True, norm_first=True)
            for _ in range(layers))
        self.norm = nn.LayerNorm(lm_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        h = self.proj(features)  # (N, P, D_lm)
        for block in self.blocks:
            h = block(h)
        return self.norm(h)


class Llama3V(nn.Module):
    """A Llama causal LM reading projected SigLIP patch features in place of its image tokens.

    `image_token_id`: the id the collator repeats P times per image (`<|image|>`; its embedding
    row is never read, so an id outside the LM's vocabulary, like real Llama 3.2's 128256, works).
    """

    def __init__(self, lm, encoder, image_token_id: int, projector_layers: int = 2,
                 image_tokens: int | None = None):
        super().__init__()
        # `language_model` (as VisionLlama's), so that the vision stages' LoRA wrapping and
        # merging treat both architectures alike; `lm` reads it.
        self.language_model, self.encoder, self.image_token_id = lm, encoder, image_token_id
        patches = self.patches
        self.image_tokens = image_tokens or patches
        if math.isqrt(self.image_tokens) ** 2 != self.image_tokens or self.image_tokens > patches:
            raise ValueError(f"image_tokens={image_tokens}: must be a square number of at most the "
                             f"encoder's {patches} patches ({math.isqrt(patches)} x {math.isqrt(patches)})")
        heads = lm.config.num_attention_heads
        self.projector = Projector(encoder.config.hidden_size, lm.config.hidden_size, heads,
                                   projector_layers)
        self.projector.to(next(lm.parameters()).dtype)

    @property
    def lm(self):
        return self.language_model

    @property
    def device(self) -> torch.device:
        return next(self.language_model.parameters()).device

    @property
    def patches(self) -> int:
        """P: patch features per image, one per SigLIP patch (no class token)."""
        return (self.encoder.config.image_size // self.encoder.config.patch_size) ** 2

    def adapter_parameters(self, parts=("encoder", "projector")):
        """The parameters of the named new parts (never the language model's)."""
        modules = {"encoder": self.encoder, "projector": self.projector}
        return [p for part in parts for p in modules[part].parameters()]

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, P, D_enc) patch features of the last encoder layer."""
        return self.encoder(pixel_values=pixel_values).last_hidden_state

    def pool(self, features: torch.Tensor) -> torch.Tensor:
        """(N, P, D_enc) -> (N, T, D_enc), T = `image_tokens`: the sqrt(P) x sqrt(P) patch grid
        average-pooled to sqrt(T) x sqrt(T) (fewer, coarser image tokens); identity when T = P."""
        n, patches, dim = features.shape
        if patches == self.image_tokens:
            return features
        side = math.isqrt(patches)
        grid = features.transpose(1, 2).reshape(n, dim, side, side)                   # (N, D, s, s)
        pooled = F.adaptive_avg_pool2d(grid, math.isqrt(self.image_tokens))            # (N, D, t, t)
        return pooled.flatten(2).transpose(1, 2)                                        # (N, T, D)

    def embed(self, input_ids: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """(B, L) ids + (N, P, D_enc) features -> (B, L, D_lm) input embeddings; the image
        tokens, in reading order, take the projected features of the N images in order."""
        is_image = input_ids == self.image_token_id  # (B, L)
        embeds = self.lm.get_input_embeddings()(input_ids.masked_fill(is_image, 0))  # (B, L, D)
        if features is None or not len(features):
            if is_image.any():
                raise ValueError("the batch has image tokens but no image features")
            return embeds
        projected = self.projector(self.pool(features.to(embeds.dtype)))  # (N, T, D)
        if int(is_image.sum()) != projected.shape[0] * projected.shape[1]:
            raise ValueError(f"{int(is_image.sum())} image tokens for {projected.shape[0]} images of "
                             f"{projected.shape[1]} tokens each")
        return embeds.masked_scatter(is_image.unsqueeze(-1), projected)

    def forward(self, input_ids, attention_mask=None, labels=None, pixel_values=None,
                image_features=None, **kwargs):
        """As `LlamaForCausalLM.forward`, with `pixel_values` (N, 3, H, W) or precomputed
        `image_features` (N, P, D_enc) for the batch's N images (cached features skip the encoder)."""
        if image_features is None and pixel_values is not None:
            image_features = self.encode_images(pixel_values)
        embeds = self.embed(input_ids, image_features)
        if labels is not None:
            labels = labels.masked_fill(input_ids == self.image_token_id, IGNORE_INDEX)
        return self.lm(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels, **kwargs)

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, pixel_values=None, image_features=None,
                 **kwargs):
        """Greedy (or sampled) continuations of left-padded prompts -> (B, L + new) token ids, the
        prompt first, as HF's `generate`; `kwargs` go to the LM's (max_new_tokens, ...). Greedy
        unless `do_sample=True` (a checkpoint's generation_config may ask for sampling)."""
        kwargs.setdefault("do_sample", False)
        if image_features is None and pixel_values is not None:
            image_features = self.encode_images(pixel_values)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        embeds = self.embed(input_ids, image_features)
        new = self.lm.generate(inputs_embeds=embeds, attention_mask=attention_mask, **kwargs)
        return torch.cat([input_ids, new.to(input_ids.device)], dim=1)

    def freeze_encoder(self) -> None:
        self.encoder.requires_grad_(False).eval()

    def save(self, out_dir: str | Path) -> None:
        """`out_dir/{lm, encoder}` as HF checkpoints and `projector.safetensors` + `llama3v.json`."""
        from safetensors.torch import save_file

        out_dir = Path(out_dir)
        self.lm.save_pretrained(out_dir / "lm")
        self.encoder.save_pretrained(out_dir / "encoder")
        save_file(self.projector.state_dict(), str(out_dir / "projector.safetensors"))
        (out_dir / "llama3v.json").write_text(json.dumps(
            {"image_token_id": self.image_token_id, "projector_layers": len(self.projector.blocks),
             "image_tokens": self.image_tokens}))

    @classmethod
    def load(cls, model_dir: str | Path, dtype: torch.dtype | None = None) -> "Llama3V":
        from safetensors.torch import load_file
        from transformers import LlamaForCausalLM, SiglipVisionModel

        model_dir = Path(model_dir)
        meta = json.loads((model_dir / "llama3v.json").read_text())
        model = cls(LlamaForCausalLM.from_pretrained(model_dir / "lm", dtype=dtype),
                    SiglipVisionModel.from_pretrained(model_dir / "encoder", dtype=dtype),
                    meta["image_token_id"], meta["projector_layers"], meta.get("image_tokens"))
        model.projector.load_state_dict(load_file(str(model_dir / "projector.safetensors")))
        return model


# ---- data ---------------------------------------------------------------------------------------

def image_key(path: str | Path) -> str:
    """The cache key of an image: sha256 of the file's bytes (the same picture under two names
    is encoded once)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class Llama3VCollator:
    """`collate_fn` over normalised vision_chat (vision_prompt, image_text) records for `Llama3V`.

    Each `<|image|>` of the chat-formatted text becomes `image_tokens` copies (labels -100), so a
    sequence is longer than its text by n * (P - 1). Returns input_ids, attention_mask, labels
    (B, L), `image_keys` (the N images' content hashes, in order) and, with `pixels`,
    pixel_values (N, 3, H, W). `pixels=False` skips decoding images: for a warm FeatureCache.
    """

    def __init__(self, tokenizer, processor, image_tokens: int, kind: str = "vision_chat",
                 max_length: int | None = None, pixels: bool = True,
                 limits: ImageLimits = ImageLimits()):
        self.encoder = VisionEncoder(tokenizer, None, max_length, limits)
        self.processor, self.image_tokens = processor, image_tokens
        self.pixels, self.limits = pixels, limits
        self.encode = {"vision_chat": self.encoder.chat, "vision_prompt": self.encoder.prompt,
                       "image_text": self.encoder.image_text}[kind]
        self.padding_side = "left" if kind == "vision_prompt" else "right"
        self.pad_id = pad_id(tokenizer)

    def __call__(self, records: list[dict]) -> dict:
        rows, paths = [], []
        for record in records:
            encoded = self.encode(record)
            rows.append(self._expand(encoded.input_ids, encoded.labels))
            paths += encoded.image_paths
        length = max(len(ids) for ids, _ in rows)
        batch = {"input_ids": torch.full((len(rows), length), self.pad_id),
                 "labels": torch.full((len(rows), length), IGNORE_INDEX),
                 "attention_mask": torch.zeros((len(rows), length), dtype=torch.long)}
        for b, (ids, labels) in enumerate(rows):
            start = length - len(ids) if self.padding_side == "left" else 0
            span = slice(start, start + len(ids))
            batch["input_ids"][b, span] = torch.tensor(ids)
            batch["labels"][b, span] = torch.tensor(labels)
            batch["attention_mask"][b, span] = 1
        batch["image_keys"] = [image_key(path) for path in paths]
        if self.pixels and paths:
            pictures = [load_image(path, self.limits) for path in paths]
            batch["pixel_values"] = self.processor(pictures, return_tensors="pt")["pixel_values"]
        return batch

    def _expand(self, ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
        image = self.encoder.image_token_id
        out_ids, out_labels = [], []
        for tok, label in zip(ids, labels):
            repeat = self.image_tokens if tok == image else 1
            out_ids += [tok] * repeat
            out_labels += [IGNORE_INDEX if tok == image else label] * repeat
        return out_ids, out_labels


# ---- the feature cache --------------------------------------------------------------------------

_NOT_THE_ENCODER = ("_name_or_path", "architectures", "transformers_version", "dtype", "torch_dtype")


def encoder_fingerprint(encoder, processor) -> str:
    """16 hex digits over the encoder's config, its weights and the image preprocessing: cached
    features are only valid for exactly this encoder."""
    digest = hashlib.sha256()
    # where the encoder was loaded from is not part of it (a stage's saved copy is the same encoder)
    config = {k: v for k, v in encoder.config.to_dict().items() if k not in _NOT_THE_ENCODER}
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    digest.update(json.dumps(processor.to_dict(), sort_keys=True, default=str).encode())
    for name, tensor in sorted(encoder.state_dict().items()):
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


class FeatureCache:
    """Encoder features on disk: `root/<encoder fingerprint>/<key[:2]>/<key>.safetensors`, each
    holding "features" (P, D_enc) for one image. Files are written whole (temporary name, then
    rename), so a killed precompute never leaves a half entry."""

    def __init__(self, root: str | Path, encoder, processor):
        self.encoder, self.processor = encoder, processor
        self.dir = Path(root) / encoder_fingerprint(encoder, processor)

    def path(self, key: str) -> Path:
        return self.dir / key[:2] / f"{key}.safetensors"

    def missing(self, keys: list[str]) -> list[str]:
        return [key for key in dict.fromkeys(keys) if not self.path(key).is_file()]

    @torch.no_grad()
    def precompute(self, paths: list[str], batch_size: int = 32,
                   limits: ImageLimits = ImageLimits()) -> int:
        """Encodes every image in `paths` whose features are not cached yet; returns how many."""
        todo = {}
        for path in paths:
            key = image_key(path)
            if key not in todo and not self.path(key).is_file():
                todo[key] = path
        items = list(todo.items())
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            try:
                pictures = [load_image(path, limits) for _, path in chunk]
            except ImageError as err:
                raise ValueError(f"feature cache: {err}") from None
            pixels = self.processor(pictures, return_tensors="pt")["pixel_values"]
            features = self.encoder(pixel_values=pixels).last_hidden_state  # (n, P, D_enc)
            for (key, _), one in zip(chunk, features):
                self._write(key, one)
        return len(items)

    def load(self, keys: list[str]) -> torch.Tensor:
        """(N, P, D_enc) features of `keys`, in order. Raises KeyError naming what is missing."""
        from safetensors.torch import load_file

        missing = self.missing(keys)
        if missing:
            raise KeyError(f"{len(missing)} image(s) not in the feature cache {self.dir} "
                           f"(e.g. {missing[0]}); run FeatureCache.precompute over the data first")
        return torch.stack([load_file(str(self.path(key)))["features"] for key in keys])

    def _write(self, key: str, features: torch.Tensor) -> None:
        from safetensors.torch import save_file

        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
        save_file({"features": features.contiguous()}, str(tmp))
        os.replace(tmp, path)


class CachedFeatures:
    """Wraps a `Llama3VCollator(pixels=False)`: each batch's `image_keys` become
    `image_features` (N, P, D_enc) read from `cache`, so the model never runs its encoder."""

    def __init__(self, collator: Llama3VCollator, cache: "FeatureCache"):
        self.collator, self.cache = collator, cache

    def __call__(self, records: list[dict]) -> dict:
        batch = self.collator(records)
        keys = batch.pop("image_keys")
        if keys:
            batch["image_features"] = self.cache.load(keys)
        return batch


# ---- building from a recipe ---------------------------------------------------------------------

def build(path: str, options, tokenizer, dtype: torch.dtype | None = None) -> "Llama3V":
    """A Llama text checkpoint at `path` + a fresh projector and an encoder as `options`
    (alignloop.vision.config.Llama3VOptions) say: "tiny" (random, seeded, `encoder_options` over
    TINY_ENCODER) or a SigLIP checkpoint (SiglipVisionModel or SiglipModel, local or cached)."""
    from transformers import LlamaForCausalLM, SiglipVisionModel

    from alignloop.vision.data import image_token_id

    lm = LlamaForCausalLM.from_pretrained(path, dtype=dtype)
    with torch.random.fork_rng(devices=[]):
        if options.encoder == "tiny":
            encoder = tiny_encoder(options.seed, **options.encoder_options)
        else:
            encoder = SiglipVisionModel.from_pretrained(options.encoder, dtype=dtype)
        torch.manual_seed(options.seed)
        model = Llama3V(lm, encoder.eval(), image_token_id(tokenizer), options.projector_layers,
                        options.image_tokens)
    return model.to(dtype) if dtype is not None else model


# ---- a short training loop ----------------------------------------------------------------------

def train(model: Llama3V, loader, steps: int, lr: float = 1e-3, cache: FeatureCache | None = None,
          train_lm: bool = False, train_encoder: bool = False) -> list[float]:
    """`steps` AdamW steps over `loader` (cycled); returns the losses.

    The projector is always trained; the LM with `train_lm`; the encoder only with
    `train_encoder`, which rules out a cache (cached features belong to a frozen encoder). With a
    cache, every image of a batch must be cached already.
    """
    if train_encoder and cache is not None:
        raise ValueError("train_encoder=True needs live features: a feature cache holds the "
                         "features of a frozen encoder")
    model.freeze_encoder()
    model.encoder.requires_grad_(train_encoder)
    model.lm.requires_grad_(train_lm)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    if not train_encoder:
        model.encoder.eval()
    losses, batches = [], _cycle(loader)
    for _ in range(steps):
        batch = next(batches)
        loss = model(**_model_inputs(batch, cache)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    return losses


def _model_inputs(batch: dict, cache: FeatureCache | None) -> dict:
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
    if cache is not None and batch["image_keys"]:
        inputs["image_features"] = cache.load(batch["image_keys"])
    elif "pixel_values" in batch:
        inputs["pixel_values"] = batch["pixel_values"]
    return inputs


def _cycle(loader):
    while True:
        yield from loader


__all__ = ["IMAGE_TOKEN", "Llama3V", "Llama3VCollator", "CachedFeatures", "FeatureCache", "build", "Projector", "image_key",
           "image_processor", "tiny_encoder", "train"]
