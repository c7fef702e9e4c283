"""`activation_checkpointing: auto`: the activation estimate, the decision against the memory left,
and what the stages' TRL arguments get from it."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from alignloop.config import load_recipe
from alignloop.hardware import resolve_precision
from alignloop.models import memory
from alignloop.training import trl_config

from tests.test_config import DATA, write

SMOLLM2 = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
               num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True)
LLAMA_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False)
GiB = 1 << 30


@pytest.mark.parametrize("tied", [True, False])
def test_parameter_count_equals_the_models(tied):
    config = LlamaConfig(hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=6,
                         num_key_value_heads=2, vocab_size=300, tie_word_embeddings=tied)
    model = LlamaForCausalLM(config)
    assert memory.parameter_count(config) == sum(p.numel() for p in model.parameters())


def test_the_estimate_grows_with_tokens_and_the_fused_head_drops_the_logits():
    config = LlamaConfig(**SMOLLM2)
    one = memory.activation_bytes(config, 1024, 4, lora=True, fused_head=True)
    assert memory.activation_bytes(config, 2048, 4, lora=True, fused_head=True) == 2 * one
    assert memory.activation_bytes(config, 1024, 2, lora=True, fused_head=True) == one // 2
    logits = memory.activation_bytes(config, 1024, 4, lora=True, fused_head=False) - one
    assert logits == 2 * 1024 * 49152 * 4
    assert memory.activation_bytes(config, 1024, 4, lora=False, fused_head=True) < one


def test_the_estimate_is_not_below_what_autograd_keeps():
    """A small Llama's measured saved-for-backward bytes (LoRA-free, full logits) stay within the
    estimate and above half of it: the rule neither misses a need nor doubles it."""
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256, attn_implementation="sdpa")
    model = LlamaForCausalLM(config)
    ids = torch.randint(0, 256, (2, 64))
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids).loss
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen, measured = set(), 0
    for t in saved:
        key = t.untyped_storage().data_ptr()
        if key not in seen and key not in weights:
            seen.add(key)
            measured += t.untyped_storage().nbytes()
    estimate = memory.activation_bytes(config, 128, 4, lora=False, fused_head=False)
    assert 0.5 * estimate <= measured <= 1.5 * estimate, (measured, estimate)


def test_the_decision_follows_the_memory_left():
    small, big = LlamaConfig(**SMOLLM2), LlamaConfig(**LLAMA_8B)
    # SmolLM2 LoRA at 16 x 128 tokens on a 24 GiB host: no checkpointing
    assert not memory.needs_checkpointing(small, 16 * 128, 4, lora=True, fused_head=True,
                                          weights_bytes=600 << 20, available=20 * GiB)
    # ... the same with 1 GiB left: on
    assert memory.needs_checkpointing(small, 16 * 128, 4, lora=True, fused_head=True,
                                      weights_bytes=600 << 20, available=GiB)
    # 8B LoRA at 8K bf16 on an 80 GB GPU: on
    assert memory.needs_checkpointing(big, 8192, 2, lora=True, fused_head=True,
                                      weights_bytes=16 * GiB, available=80 * GiB)


def sft_args(cfg, output_dir, model_path=None):
    return trl_config("sft", cfg.sft, seed=cfg.seed, precision=resolve_precision(cfg.precision),
                      output_dir=output_dir, model_path=model_path)


def test_trainer_args_auto_reads_the_checkpoint_and_a_recipe_value_wins(tmp_path, monkeypatch):
    model_dir = tmp_path / "model"
    LlamaConfig(**SMOLLM2).save_pretrained(model_dir)
    recipe = write(tmp_path, f"sft:\n  data:\n    - path: {DATA}\n  method: lora\n  max_length: 128\n")
    cfg = load_recipe(recipe)
    monkeypatch.setattr(memory, "available_bytes", lambda: 20 * GiB)
    assert sft_args(cfg, tmp_path / "out", str(model_dir)).activation_checkpointing is False
    monkeypatch.setattr(memory, "available_bytes", lambda: GiB)
    assert sft_args(cfg, tmp_path / "out", str(model_dir)).activation_checkpointing is True
    # without a checkpoint (a recipe being validated) auto is TRL's default, on
    assert sft_args(cfg, tmp_path / "out").activation_checkpointing is True
    monkeypatch.setattr(memory, "available_bytes", lambda: 20 * GiB)
    for text, expected in (("activation_checkpointing: true", True), ("gradient_checkpointing: true", True),
                           ("activation_checkpointing: false", False)):
        recipe = write(tmp_path, f"sft:\n  data:\n    - path: {DATA}\n  method: lora\n  {text}\n")
        args = sft_args(load_recipe(recipe), tmp_path / "out", str(model_dir))
        assert args.activation_checkpointing is expected, text
