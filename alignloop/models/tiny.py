"""The built-in tiny Llama and its tokenizer: a real Llama 3.2-shaped checkpoint, small enough for CPU.

`build_tiny()` returns a directory that `AutoModelForCausalLM` / `AutoTokenizer.from_pretrained`
load like any other checkpoint. `architecture=` builds the same tokenizer on a tiny
Mixture-of-Experts instead (Mixtral, Qwen3-MoE, OLMoE or Llama 4's text model; docs/moe.md). Nothing is downloaded: the tokenizer is a byte-level BPE trained
here on `corpus.txt`, the weights are a seeded random init. The directory is cached under a key
over everything that goes into it (the open-instruct idea of hashing config, tokenizer, template
and a version), and built atomically: a temporary sibling directory renamed into place, under a
file lock so that concurrent processes (e.g. `accelerate launch`) build it once.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from filelock import FileLock
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (AutoModelForCausalLM, GenerationConfig, LlamaConfig, Llama4TextConfig,
                          MixtralConfig, OlmoeConfig, PreTrainedTokenizerFast, Qwen3MoeConfig)

logger = logging.getLogger("alignloop.models")

# Bump when the build changes in a way the key below cannot see (e.g. tokenizer settings).
BUILDER_VERSION = 1

# Llama 3 special tokens by name (../shared/reference/llama3-post-training.md, section E). As in
# Llama 3 they come after the BPE vocabulary, in this order.
SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|finetune_right_pad_id|>",
    "<|python_tag|>",
    "<|image|>",
]
BOS, END_OF_TEXT, EOT, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|finetune_right_pad_id|>"
BPE_VOCAB_SIZE = 1015  # 256 bytes + merges; with the 9 specials the vocabulary is 1024
VOCAB_SIZE = BPE_VOCAB_SIZE + len(SPECIAL_TOKENS)

# Llama 3.2 1B/3B RoPE (reference section D): llama3 scaling with factor 32.
LLAMA32_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}

# Small enough to train in seconds on 2 CPU cores, big enough to learn 3-digit addition.
DEFAULTS = dict(
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,  # GQA, as in Llama 3
    head_dim=32,
    tie_word_embeddings=True,  # as in Llama 3.2 1B/3B
    rms_norm_eps=1e-5,
    rope_parameters=LLAMA32_ROPE,
    max_position_embeddings=131072,
)


# Tiny Mixture-of-Experts (`architecture=`): the shape above with 4 routed experts, 2 per token
# (Llama 4: 1 routed + its shared expert), every layer sparse. Default RoPE: the llama3 scaling
# is Llama's.
_MOE_SHAPE = {key: DEFAULTS[key] for key in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                             "num_key_value_heads", "head_dim", "tie_word_embeddings",
                                             "rms_norm_eps")}
_MOE_SHAPE["rope_parameters"] = {"rope_type": "default", "rope_theta": 500000.0}
ARCHITECTURES = {
    "llama": (LlamaConfig, DEFAULTS),
    "mixtral": (MixtralConfig, {**_MOE_SHAPE, "intermediate_size": 128, "num_local_experts": 4,
                                "num_experts_per_tok": 2}),
    "qwen3_moe": (Qwen3MoeConfig, {**_MOE_SHAPE, "moe_intermediate_size": 128, "intermediate_size": 384,
                                   "num_experts": 4, "num_experts_per_tok": 2, "decoder_sparse_step": 1,
                                   "norm_topk_prob": True}),
    "olmoe": (OlmoeConfig, {**_MOE_SHAPE, "intermediate_size": 128, "num_experts": 4,
                            "num_experts_per_tok": 2}),
    "llama4_text": (Llama4TextConfig, {**_MOE_SHAPE, "intermediate_size": 128, "intermediate_size_mlp": 384,
                                       "num_local_experts": 4, "num_experts_per_tok": 1,
                                       "interleave_moe_layer_step": 1}),
}


def _token_id(token: str) -> int:
    return BPE_VOCAB_SIZE + SPECIAL_TOKENS.index(token)


def _corpus_path():
    return importlib.resources.files("alignloop.models") / "corpus.txt"


def chat_template() -> str:
    """The Llama 3 chat template with {% generation %} markers, as shipped in alignloop.data."""
    return (importlib.resources.files("alignloop.data") / "chat_templates" / "llama3.jinja").read_text()


def tiny_config(architecture: str = "llama", **overrides):
    """A `LlamaConfig` with the tiny defaults (or, with `architecture`, the config of a tiny MoE
    from ARCHITECTURES); `overrides` are fields of that config class (unknown ones are errors)."""
    if architecture not in ARCHITECTURES:
        raise TypeError(f"tiny_config: unknown architecture {architecture!r} (known: "
                        f"{', '.join(ARCHITECTURES)})")
    config_class, defaults = ARCHITECTURES[architecture]
    unknown = sorted(set(overrides) - set(config_class().to_dict()))
    if unknown:
        raise TypeError(f"tiny_config: unknown {config_class.__name__} field(s) {unknown}")
    fields = {**defaults, **overrides}
    return config_class(
        vocab_size=VOCAB_SIZE,
        bos_token_id=_token_id(BOS),
        eos_token_id=_token_id(EOT),
        pad_token_id=_token_id(PAD),
        **fields,
    )


def train_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on corpus.txt, digits split one per token, Llama 3 specials appended."""
    tok = Tokenizer(models.BPE())
    # Single digits make numbers learnable digit by digit (the arithmetic task needs that).
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    with importlib.resources.as_file(_corpus_path()) as corpus:
        tok.train([str(corpus)], trainer)
    if tok.get_vocab_size() != BPE_VOCAB_SIZE:
        raise RuntimeError(f"corpus.txt gives only {tok.get_vocab_size()} BPE tokens; it needs more text")
    tok.add_special_tokens(SPECIAL_TOKENS)
    # Plain text gets <|begin_of_text|> in front, as Llama 3's tokenizer does; chat templates add it themselves.
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                      special_tokens=[(BOS, _token_id(BOS))]),
    ])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOT,  # end of turn: what chat generation stops on
        pad_token=PAD,
        chat_template=chat_template(),
    )


def _cache_key(config, seed: int) -> str:
    corpus_sha = hashlib.sha256(_corpus_path().read_bytes()).hexdigest()
    blob = json.dumps({"config": config.to_dict(), "seed": seed, "corpus": corpus_sha,
                       "template": chat_template(), "builder": BUILDER_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _cache_root(cache_dir) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get("ALIGNLOOP_CACHE") or Path.home() / ".cache" / "alignloop")


def _write_checkpoint(out: Path, config, seed: int) -> None:
    tokenizer = train_tokenizer()
    if len(tokenizer) != config.vocab_size:
        raise RuntimeError(f"tokenizer has {len(tokenizer)} tokens, config expects {config.vocab_size}")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=[_token_id(EOT), _token_id(END_OF_TEXT)],
        pad_token_id=config.pad_token_id,
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def build_tiny(cache_dir=None, *, seed: int = 0, **overrides) -> Path:
    """The tiny checkpoint directory for (`seed`, `overrides`), built on first use and cached.

    `cache_dir` defaults to $ALIGNLOOP_CACHE, then ~/.cache/alignloop; the entry is `tiny-<key>`.
    `overrides` are LlamaConfig fields, e.g. `num_hidden_layers=2`, or `architecture` and the
    fields of that architecture's config (`architecture="qwen3_moe", num_experts=8`).
    """
    config = tiny_config(**overrides)
    root = _cache_root(cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    name = f"tiny-{_cache_key(config, seed)}"
    final = root / name
    if final.is_dir():
        return final
    with FileLock(str(root / f"{name}.lock")):
        if final.is_dir():  # another process built it while we waited
            return final
        for stale in root.glob(f".{name}.tmp-*"):  # left by a killed build; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        start = time.perf_counter()
        logger.info("building tiny %s %s in %s", config.model_type, name, root)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root))
        try:
            _write_checkpoint(tmp, config, seed)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        logger.info("built tiny %s %s in %.1f s", config.model_type, name, time.perf_counter() - start)
    return final
