"""Loading a user's own Llama 3.1-style checkpoint: the legacy `rope_scaling` key of published
config.json files becomes llama3 RoPE, with the frequencies of reference section D."""

import json
import math

import torch

from alignloop.config import load_recipe
from alignloop.models.loading import load_model, load_tokenizer


def llama31_style_checkpoint(tmp_path, tiny_dir):
    """A config.json written as Llama 3.1 8B ships it (rope_scaling, rope_theta at top level),
    shrunk to 2 layers of width 64 and head_dim 16, plus the tiny tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 1024, "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False,
        "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "bos_token_id": 1015, "eos_token_id": 1020, "torch_dtype": "float32",
    }
    out = tmp_path / "llama31"
    out.mkdir()
    LlamaForCausalLM(LlamaConfig(**cfg)).save_pretrained(out)
    (out / "config.json").write_text(json.dumps(cfg))  # exactly the legacy layout on disk
    AutoTokenizer.from_pretrained(tiny_dir).save_pretrained(out)
    return out


def expected_inv_freq(dim: int, theta: float, factor: float) -> torch.Tensor:
    """_compute_llama3_parameters written out from reference section D."""
    out = []
    for i in range(0, dim, 2):
        inv = 1.0 / theta ** (i / dim)
        wavelen = 2 * math.pi / inv
        if wavelen > 8192:
            inv /= factor
        elif wavelen >= 2048:
            smooth = (8192 / wavelen - 1) / (4 - 1)
            inv = (1 - smooth) * inv / factor + smooth * inv
        out.append(inv)
    return torch.tensor(out)


def test_llama31_config_with_legacy_rope_scaling_loads_as_llama3_rope(tmp_path, tiny_dir):
    path = llama31_style_checkpoint(tmp_path, tiny_dir)
    cfg = load_recipe({"model": {"path": str(path), "chat_template": "llama3"},
                       "sft": {"data": [{"builtin": "arithmetic"}]}}, check_trainer=False)
    model = load_model(cfg, cfg.model.path)
    rope = model.config.rope_parameters
    assert rope["rope_type"] == "llama3" and rope["factor"] == 8.0 and rope["rope_theta"] == 500000.0
    assert model.config.max_position_embeddings == 131072
    inv_freq = model.model.rotary_emb.inv_freq.float()
    torch.testing.assert_close(inv_freq, expected_inv_freq(16, 500000.0, 8.0), rtol=1e-5, atol=0)
    tokenizer = load_tokenizer(cfg.model, cfg.model.path)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], return_tensors="pt",
                                        return_dict=True, add_generation_prompt=True)["input_ids"]
    # a position far past 8K works (128K context): logits are finite at position 100,000
    with torch.no_grad():
        logits = model(input_ids=ids, position_ids=torch.arange(ids.shape[1])[None] + 100_000).logits
    assert torch.isfinite(logits).all()


def test_causal_lm_adapter_loads_under_a_reward_head(tmp_path):
    """A reward model started from an SFT LoRA adapter (reward.init: base when the recipe's model
    is an adapter directory): the adapter's CAUSAL_LM task type used to make peft ask the
    sequence-classification model for prepare_inputs_for_generation. The body's merged weights
    equal the causal LM's merged weights."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "base")
    peft_model = get_peft_model(LlamaForCausalLM.from_pretrained(tmp_path / "base"),
                                LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM",
                                           init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    merged = peft_model.merge_and_unload()
    recipe = load_recipe({"model": {"path": str(tmp_path / "adapter")}, "stages": ["reward"],
                          "reward": {"data": [{"builtin": "arithmetic", "count": 4}]}}, [], check_trainer=False)
    reward = load_model(recipe, str(tmp_path / "adapter"), model_class=AutoModelForSequenceClassification,
                        num_labels=1)
    base = LlamaForCausalLM.from_pretrained(tmp_path / "base")
    for name in ("q_proj", "v_proj", "k_proj"):
        got = getattr(reward.model.layers[0].self_attn, name).weight
        assert torch.allclose(got, getattr(merged.model.layers[0].self_attn, name).weight, atol=1e-6), name
    assert not torch.allclose(reward.model.layers[0].self_attn.q_proj.weight,
                              base.model.layers[0].self_attn.q_proj.weight, atol=1e-3)  # the adapter is in


def test_lora_on_an_adapter_start_keeps_the_first_adapter(tmp_path, monkeypatch):
    """model.path naming a LoRA adapter directory resolves to that adapter merged into its base
    (cached under ALIGNLOOP_CACHE, keyed by the adapter's contents): a second LoRA saved on it
    then has the merged model as its base, so loading the second adapter keeps the first one's
    change (before, it named the raw base and the first adapter was silently dropped)."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from alignloop.models.gguf import model_identity
    from alignloop.models.loading import resolve_path

    monkeypatch.setenv("ALIGNLOOP_CACHE", str(tmp_path / "cache"))
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "base")
    first = get_peft_model(LlamaForCausalLM.from_pretrained(tmp_path / "base"),
                           LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    first.save_pretrained(tmp_path / "first")
    ids = torch.randint(0, 64, (1, 9))
    expected = first(input_ids=ids).logits

    recipe = load_recipe({"model": {"path": str(tmp_path / "first")}, "stages": ["sft"],
                          "sft": {"data": [{"builtin": "arithmetic", "count": 4}]}}, [], check_trainer=False)
    merged = resolve_path(recipe.model)
    assert merged.startswith(str(tmp_path / "cache")) and resolve_path(recipe.model) == merged  # cached
    start = AutoModelForCausalLM.from_pretrained(merged)
    assert torch.allclose(start(input_ids=ids).logits, expected, atol=1e-5)

    second = get_peft_model(start, LoraConfig(r=4, target_modules=["v_proj"]))  # B = 0: no change yet
    second.save_pretrained(tmp_path / "second")
    reloaded = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(second.peft_config["default"].base_model_name_or_path),
        tmp_path / "second")
    assert torch.allclose(reloaded(input_ids=ids).logits, expected, atol=1e-5)

    before = model_identity(recipe.model)["path_adapter"]
    (tmp_path / "first" / "adapter_model.safetensors").write_bytes(b"changed")
    assert model_identity(recipe.model)["path_adapter"] != before  # a retrained adapter: new keys
