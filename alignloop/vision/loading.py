"""Vision models on disk: a Llama text checkpoint (`vision.start: new`), HF Mllama (what every
cross-attention vision stage writes, loadable by transformers and vLLM) or a Llama 3-V directory
(`vision.architecture: llama3v`), with the tokenizer and image processor that go with them."""

from __future__ import annotations

import json
from pathlib import Path

from alignloop.config import Recipe
from alignloop.data.vision_records import IMAGE_TOKEN
from alignloop.pipeline.errors import StageError


def is_llama3v(path: str | Path) -> bool:
    """A Llama 3-V model directory (alignloop.vision.llama3v.Llama3V.save)."""
    return (Path(path) / "llama3v.json").is_file()


def is_llama3v_model(model) -> bool:
    from alignloop.vision.llama3v import Llama3V

    return isinstance(model, Llama3V)


def is_mllama(path: str | Path) -> bool:
    config = Path(path) / "config.json"
    return config.is_file() and json.loads(config.read_text()).get("model_type") == "mllama"


def load_vision_tokenizer(cfg: Recipe, path: str):
    """The recipe's tokenizer with `<|image|>` as one token: Llama 3.1's tokenizer gets it added
    as a special token (id 128256, the first learnable row, as in Llama 3.2 Vision)."""
    from alignloop.models.loading import load_tokenizer

    tokenizer = load_tokenizer(cfg.model, path)
    if len(tokenizer(IMAGE_TOKEN, add_special_tokens=False)["input_ids"]) != 1:
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    return tokenizer


def load_vision_model(cfg: Recipe, path: str, tokenizer=None):
    """An Mllama checkpoint through `from_mllama`, or a Llama text checkpoint with a fresh adapter
    (`vision.adapter_config`), in the recipe's dtype."""
    from transformers import MllamaForConditionalGeneration

    from alignloop.hardware import resolve_precision
    from alignloop.kernels import ATTENTION, register
    from alignloop.models.loading import torch_dtype
    from alignloop.vision.convert import from_mllama
    from alignloop.vision.model import build

    if cfg.model.attn_implementation == ATTENTION:
        register()  # transformers must know the name before from_pretrained
    dtype = torch_dtype(cfg.model, resolve_precision(cfg.precision))
    if cfg.vision.architecture == "llama3v":
        from alignloop.vision import llama3v

        try:
            model = (llama3v.Llama3V.load(path, dtype) if is_llama3v(path) else
                     llama3v.build(path, cfg.vision.llama3v, tokenizer, dtype))
        except ValueError as err:  # e.g. image_tokens against a checkpoint encoder's patches
            raise StageError(f"vision.llama3v: {err}") from None
        model.language_model.set_attn_implementation(cfg.model.attn_implementation)
        return model
    if is_mllama(path):
        mllama = MllamaForConditionalGeneration.from_pretrained(
            path, dtype=dtype, attn_implementation=cfg.model.attn_implementation)
        return from_mllama(mllama)
    if cfg.vision.start == "mllama":
        raise StageError(f"{path}: vision.start is 'mllama' but this is not an Mllama checkpoint "
                         "(config.json model_type 'mllama'); use start: new for a Llama text model")
    model = build(path, cfg.vision.adapter_config, tokenizer, dtype=dtype)
    model.language_model.set_attn_implementation(cfg.model.attn_implementation)
    return model


def image_processor_for(cfg: Recipe, model):
    from alignloop.vision.data import image_processor

    if is_llama3v_model(model):  # SigLIP's: resize to the encoder's image size, mean and std 0.5
        from alignloop.vision.llama3v import image_processor as siglip_processor

        return siglip_processor(model.encoder)
    tile = cfg.vision.tile_size or model.vision_config.image_size
    return image_processor(tile, model.vision_config.max_num_tiles)


def save_vision_model(model, tokenizer, processor, out: Path) -> None:
    """HF Mllama format (safetensors), loadable by transformers and vLLM, with the tokenizer and
    the image processor beside it."""
    from alignloop.vision.convert import to_mllama

    if is_llama3v_model(model):  # lm/, encoder/, projector.safetensors (no Mllama form)
        model.save(out)
    else:
        to_mllama(model).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    processor.save_pretrained(out)
