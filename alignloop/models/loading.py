"""Checkpoints and tokenizers: from a recipe's `model` section to HF objects.

`model.path` is a local HF directory, a hub id (only when the machine is online and the files are
not cached), or `builtin:tiny` (the tiny Llama built and cached by `alignloop.models.tiny`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from alignloop.config import BUILTIN_MODEL, ModelConfig, Recipe, resolved_precision
from alignloop.data.templates import select_template

logger = logging.getLogger("alignloop.models")

PAD_CANDIDATES = ("<|finetune_right_pad_id|>", "<|reserved_special_token_0|>")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_path(model: ModelConfig) -> str:
    """A loadable path or hub id; `builtin:tiny` is built (once, then cached)."""
    if model.path != BUILTIN_MODEL:
        return model.path
    from alignloop.models.tiny import build_tiny

    overrides = dict(model.tiny)
    seed = overrides.pop("seed", 0)
    return str(build_tiny(seed=seed, **overrides))


def load_tokenizer(model: ModelConfig, path: str | None = None):
    """The tokenizer with the recipe's chat template and a pad token distinct from end-of-turn."""
    from transformers import AutoTokenizer

    source = model.tokenizer or path or resolve_path(model)
    tokenizer = AutoTokenizer.from_pretrained(source, revision=model.revision)
    select_template(tokenizer, model.chat_template)
    if tokenizer.pad_token is None:
        # Llama 3.1+ reserves <|finetune_right_pad_id|> for padding; padding with <|eot_id|>
        # would teach the model nothing about stopping, since pad positions carry no loss.
        vocab = tokenizer.get_vocab()
        pad = next((tok for tok in PAD_CANDIDATES if tok in vocab), None)
        tokenizer.pad_token = pad or tokenizer.eos_token
    return tokenizer


def torch_dtype(model: ModelConfig, precision: str) -> torch.dtype:
    """Weights dtype: what the recipe says, else bf16 for bf16 runs and fp32 otherwise.

    fp16 runs keep fp32 weights (autocast does the fp16 maths and the grad scaler needs fp32
    master weights).
    """
    if model.dtype != "auto":
        return _DTYPES[model.dtype]
    return torch.bfloat16 if precision == "bf16" else torch.float32


def load_model(cfg: Recipe, path: str, *, quantize: bool = False):
    """A causal LM for training or generation; `quantize` loads the base in bitsandbytes 4/8-bit."""
    from transformers import AutoModelForCausalLM

    precision = resolved_precision(cfg)
    dtype = torch_dtype(cfg.model, precision)
    kwargs = {"dtype": dtype, "attn_implementation": cfg.model.attn_implementation,
              "revision": cfg.model.revision}
    if quantize:
        kwargs["quantization_config"] = bnb_config(cfg, dtype)
        kwargs["device_map"] = _device_map()
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    logger.info("loaded %s (%s, %.1fM parameters%s)", path, dtype, model.num_parameters() / 1e6,
                ", quantized" if quantize else "")
    return model


def bnb_config(cfg: Recipe, compute_dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    q = cfg.sft.quantization
    bits, quant_type, double = (q.bits, q.quant_type, q.double_quant) if q else (4, "nf4", True)
    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                              bnb_4bit_use_double_quant=double,
                              bnb_4bit_compute_dtype=compute_dtype)


def _device_map():
    """Each process's own device: under `accelerate launch`, process k loads onto GPU k."""
    if torch.cuda.is_available():
        from accelerate import PartialState

        return {"": PartialState().local_process_index}
    return {"": "cpu"}


def lora_config(cfg: Recipe):
    """peft LoraConfig from the recipe's `sft.lora` (defaults when the section is absent)."""
    from peft import LoraConfig

    from alignloop.config import LoraOptions

    opts = cfg.sft.lora or LoraOptions()
    return LoraConfig(r=opts.r, lora_alpha=opts.alpha, lora_dropout=opts.dropout,
                      target_modules=opts.target_modules, modules_to_save=opts.modules_to_save,
                      task_type="CAUSAL_LM")


def load_for_inference(model_dir: str | Path, dtype: torch.dtype = torch.float32):
    """A saved stage output (full model, or LoRA adapter over its base) and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if (model_dir / "adapter_config.json").is_file():
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    model.eval()
    return model, tokenizer
