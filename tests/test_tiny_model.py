"""The built-in tiny Llama: a real Llama 3.2-shaped HF checkpoint, cached, reproducible from a seed."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from alignloop.models.tiny import SPECIAL_TOKENS, VOCAB_SIZE, build_tiny


def weights(path):
    return AutoModelForCausalLM.from_pretrained(path).state_dict()


def test_config_is_llama3_2_shaped(tiny_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    cfg = model.config
    assert cfg.model_type == "llama" and cfg.max_position_embeddings == 131072
    rope = cfg.rope_parameters
    assert rope["rope_type"] == "llama3" and rope["factor"] == 32.0
    assert rope["original_max_position_embeddings"] == 8192 and rope["rope_theta"] == 500000.0
    assert cfg.num_key_value_heads < cfg.num_attention_heads  # grouped-query attention
    assert cfg.vocab_size == VOCAB_SIZE and cfg.tie_word_embeddings
    assert not any(p.name.endswith(".bin") for p in tiny_dir.iterdir())


def test_cached_and_built_once(tmp_path):
    first = build_tiny(tmp_path)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert build_tiny(tmp_path) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp


def test_same_seed_same_weights_other_seed_differs(tmp_path):
    a, b = build_tiny(tmp_path / "a", seed=3), build_tiny(tmp_path / "b", seed=3)
    wa, wb = weights(a), weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    wc = weights(build_tiny(tmp_path / "a", seed=4))
    assert not torch.equal(wa["model.embed_tokens.weight"], wc["model.embed_tokens.weight"])


def test_overrides(tmp_path):
    path = build_tiny(tmp_path, num_hidden_layers=2)
    assert AutoModelForCausalLM.from_pretrained(path).config.num_hidden_layers == 2
    with pytest.raises(TypeError, match="unknown LlamaConfig field"):
        build_tiny(tmp_path, num_layerz=2)


def test_stale_partial_build_is_cleaned(tmp_path):
    path = build_tiny(tmp_path)
    stale = tmp_path / f".{path.name}.tmp-killed"
    import shutil

    shutil.rmtree(path)
    stale.mkdir()
    (stale / "half.bin").write_bytes(b"x")
    assert build_tiny(tmp_path) == path and not stale.exists()


def test_tokenizer(tiny_dir):
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    text = "What is 482 plus 37? The answer is 519."
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    digits = [tok.decode([i]) for i in tok.encode("90817", add_special_tokens=False)]
    assert digits == ["9", "0", "8", "1", "7"]
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == list(range(VOCAB_SIZE - len(SPECIAL_TOKENS), VOCAB_SIZE))
    assert tok.eos_token == "<|eot_id|>" and tok.pad_token == "<|finetune_right_pad_id|>"
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=True, return_dict=True)["input_ids"]
    assert chat.count(tok.bos_token_id) == 1  # the template adds <|begin_of_text|> once


def test_special_token_ids(tokenizer):
    """As in Llama 3, the specials follow the BPE vocabulary: 1015 + their index in SPECIAL_TOKENS."""
    assert tokenizer.bos_token_id == 1015 and tokenizer.convert_tokens_to_ids("<|end_of_text|>") == 1016
    assert tokenizer.eos_token_id == 1020 and tokenizer.pad_token_id == 1021  # <|eot_id|>, <|finetune_right_pad_id|>


def test_assistant_mask_is_the_reply_and_its_eot(tokenizer):
    """The expected ids are the Llama 3 format built piece by piece (reference section E); the mask
    is 1 on exactly the tokens of the assistant content plus its <|eot_id|>."""
    from alignloop.data.tasks.arithmetic import records

    messages = records("chat", "train", 1)[0]["messages"]
    user, reply = messages[0]["content"], messages[1]["content"]
    enc = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    prompt = enc(f"<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n{user}<|eot_id|>"
                 "<|start_header_id|>assistant<|end_header_id|>\n\n")
    answer = enc(reply + "<|eot_id|>")
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert list(out["input_ids"]) == prompt + answer
    assert list(out["assistant_masks"]) == [0] * len(prompt) + [1] * len(answer)
