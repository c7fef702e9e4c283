"""Checkpoints and tokenizers: from a recipe's `model` section to HF objects.

`model.path` is a local HF directory, a hub id (only when the machine is online and the files are
not cached), `builtin:tiny` (the tiny Llama built and cached by `alignloop.models.tiny`), or a
.gguf file (converted once into a cached HF directory by `alignloop.models.gguf`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from alignloop.config import BUILTIN_MODEL, ModelConfig, Recipe
from alignloop.data.templates import select_template
from alignloop.hardware import resolve_precision
from alignloop.kernels import ATTENTION
from alignloop.kernels import register as register_attention
from alignloop.models.gguf import convert as convert_gguf
from alignloop.models.adapters import is_adapter, merge_into, merged_model
from alignloop.models.gguf import is_gguf

logger = logging.getLogger("alignloop.models")

PAD_CANDIDATES = ("<|finetune_right_pad_id|>", "<|reserved_special_token_0|>")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_path(model: ModelConfig) -> str:
    """A loadable path or hub id; `builtin:tiny` is built, a .gguf file converted and a LoRA
    adapter directory merged into its base (once each, then cached; alignloop.models.adapters)."""
    if is_gguf(model.path):
        return str(convert_gguf(model.path))
    if is_adapter(model.path):
        return str(_resolve_adapter(model.path))
    if model.path != BUILTIN_MODEL:
        return model.path
    from alignloop.models.tiny import build_tiny

    overrides = dict(model.tiny)
    seed = overrides.pop("seed", 0)
    return str(build_tiny(seed=seed, **overrides))


def _resolve_adapter(path: str) -> Path:
    import json

    from alignloop.models.adapters import merge_adapter

    base = json.loads((Path(path) / "adapter_config.json").read_text())["base_model_name_or_path"]
    if is_adapter(base):
        base = str(_resolve_adapter(base))
    return merge_adapter(path, base)


def load_tokenizer(model: ModelConfig, path: str | None = None):
    """The tokenizer with the recipe's chat template and a pad token distinct from end-of-turn."""
    from transformers import AutoTokenizer

    source = model.tokenizer or path or resolve_path(model)
    if is_gguf(source):  # model.tokenizer: the file's tokenizer, from its converted directory
        source = str(convert_gguf(source))
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


def weights_dtype(cfg: Recipe) -> torch.dtype:
    """torch_dtype of the recipe: its model.dtype, else by its resolved precision."""
    from alignloop.hardware import resolve_precision

    return torch_dtype(cfg.model, resolve_precision(cfg.precision))


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bfloat16", as open_generator takes it."""
    return str(dtype).removeprefix("torch.")


def load_model(cfg: Recipe, path: str, *, quantize: bool = False, quantization=None,
               model_class=None, **kwargs):
    """A model for training or generation, by default a causal LM.

    `quantize` loads the base in bitsandbytes 4/8-bit (`quantization`: a QuantizationOptions,
    default 4-bit NF4 with double quantization). A LoRA adapter directory is loaded on its base
    and merged, so that a stage can start from a previous stage's adapter. `model_class`: e.g.
    `AutoModelForSequenceClassification` for reward models; `kwargs` go to `from_pretrained`.
    """
    from transformers import AutoModelForCausalLM

    model_class = model_class or AutoModelForCausalLM
    if cfg.model.attn_implementation == ATTENTION:
        register_attention()  # transformers must know the name before from_pretrained
    precision = resolve_precision(cfg.precision)
    dtype = torch_dtype(cfg.model, precision)
    kwargs = {"dtype": dtype, "attn_implementation": cfg.model.attn_implementation,
              "revision": cfg.model.revision, **kwargs}
    if cfg.model.experts_implementation is not None:  # MoE checkpoints only (docs/moe.md)
        kwargs["experts_implementation"] = cfg.model.experts_implementation
    if quantize:
        kwargs["quantization_config"] = bnb_config(quantization, dtype)
        kwargs["device_map"] = _device_map()
    adapter = Path(path) / "adapter_config.json"
    if adapter.is_file() and not quantize:
        model = merged_model(path, model_class, **kwargs)
    else:
        model = model_class.from_pretrained(path, **kwargs)
    from alignloop.models.moe import trl_ready

    trl_ready(model)  # Llama 4's backbone name and expert count as TRL reads them (docs/moe.md)
    logger.info("loaded %s (%s, %.1fM parameters%s)", path, dtype, model.num_parameters() / 1e6,
                ", quantized" if quantize else "")
    return model


def save_merged(cfg: Recipe, adapter_dir: Path, base_path: str, out: Path, tokenizer) -> None:
    """A trained LoRA adapter merged into an unquantized copy of its base, saved (safetensors)
    with `tokenizer` into `out`.

    For QLoRA the base is reloaded in the compute dtype rather than merged into 4-bit weights,
    which would round the merged weights back to 4 bits. Tied input/output embeddings (Llama 3.2
    1B/3B, the tiny Llama) stay tied unless the adapter changes one of them.
    """
    merged = merge_into(load_model(cfg, base_path, quantize=False), adapter_dir)
    merged.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    logger.info("merged adapter into %s", out)


def bnb_config(quantization, compute_dtype: torch.dtype):
    """bitsandbytes settings from a QuantizationOptions (None: 4-bit NF4, double quantization)."""
    from transformers import BitsAndBytesConfig

    q = quantization
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


def lora_config(options=None, task_type: str = "CAUSAL_LM", *, model=None, key: str = "lora",
                where=None):
    """peft LoraConfig from a stage's `lora` options (LoraOptions; None: the defaults).

    Reward models (task_type "SEQ_CLS") also train and save their new score head. With `model`
    the targets are resolved on it (alignloop.models.moe.lora_targets: on a Mixture-of-Experts
    checkpoint attention + routed experts + shared experts, the router as lora.router says) and
    a target_modules entry that matches nothing raises LoraTargetError naming `key`.<entry>
    (`where`: alignloop.recipe_source.stage_where, to name the file and line).
    """
    from peft import LoraConfig

    from alignloop.models.moe import LoraTargets, lora_targets
    from alignloop.options import LoraOptions

    opts = options or LoraOptions()
    targets = (lora_targets(model, opts, key, where) if model is not None else
               LoraTargets(opts.target_modules, modules_to_save=opts.modules_to_save, dropout=opts.dropout))
    for note in targets.notes:
        logger.info("%s: %s", key, note)
    modules_to_save = targets.modules_to_save
    if task_type == "SEQ_CLS" and modules_to_save is None:
        modules_to_save = ["score"]
    elif task_type == "SEQ_CLS" and "score" not in modules_to_save and opts.modules_to_save is None:
        modules_to_save = [*modules_to_save, "score"]
    return LoraConfig(r=opts.r, lora_alpha=opts.alpha, lora_dropout=targets.dropout,
                      target_modules=targets.target_modules, modules_to_save=modules_to_save,
                      target_parameters=targets.target_parameters or None, task_type=task_type)


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
