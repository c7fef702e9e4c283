"""The SFT stage on the tiny Llama: full, LoRA and QLoRA train (the loss falls), save in HF format
(safetensors only), and reload into models that give the same logits."""

import json

import pytest
import torch

from alignloop.config import load_recipe
from alignloop.manifest import read_manifest
from alignloop.pipeline.runner import run, run_stage

pytestmark = pytest.mark.slow


def recipe(tmp_path, method="full", steps=40, **sft):
    # LoRA keeps the tied embedding/output matrix frozen; with the usual 0.02 init its logits are
    # nearly uniform and stay so (loss stuck near ln 1024), so adapter tests use a wider init.
    tiny = {"initializer_range": 0.1} if method != "full" else {}
    return {
        "seed": 0,
        "output_dir": str(tmp_path / "run"),
        "model": {"tiny": tiny},
        "sft": {
            "method": method,
            "data": [{"builtin": "arithmetic", "count": 400}],
            "max_steps": steps,
            "per_device_train_batch_size": 16,
            "learning_rate": 3e-3 if method == "full" else 1e-2,
            "logging_steps": min(5, steps // 2),
            "save_steps": 1000,
            "max_length": 96,
            "activation_checkpointing": False,
            "disable_tqdm": True,
            **sft,
        },
    }


def probe(model, tokenizer):
    messages = [{"role": "user", "content": "What is 12 plus 30?"},
                {"role": "assistant", "content": "12 plus 30 is 42."}]
    ids = tokenizer.apply_chat_template(messages, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def falls(losses):
    head, tail = sum(losses[:2]) / 2, sum(losses[-2:]) / 2
    return tail < 0.8 * head


def test_full_finetune_loss_falls_and_reloads(tmp_path):
    result = run_stage("sft", recipe(tmp_path, report_to="tensorboard"))
    losses = result.metrics["losses"]
    assert list((tmp_path / "run" / "logs" / "round_1" / "sft").rglob("events.out.tfevents.*"))
    assert len(losses) == 8 and falls(losses), losses
    files = {p.name for p in (result.path / "model").iterdir()}
    assert "model.safetensors" in files and "tokenizer.json" in files
    assert not any(name.endswith((".bin", ".pt")) for name in files)
    records = result.dataset()
    assert len(records) == 400 and records[0]["messages"][-1]["role"] == "assistant"
    metrics = json.loads((result.path / "metrics.json").read_text())
    assert metrics["masks"]["examples"] == 400 and metrics["masks"]["skipped_empty"] == 0


def test_lora_loss_falls_adapter_and_merged_give_same_logits(tmp_path):
    result = run_stage("sft", recipe(tmp_path, "lora", merge=True, lora={"r": 8, "alpha": 16}))
    assert falls(result.metrics["losses"]), result.metrics["losses"]
    model_dir = result.path / "model"
    assert (model_dir / "adapter_model.safetensors").is_file()
    assert not (model_dir / "model.safetensors").exists()  # the adapter only, not a full copy
    assert (result.path / "merged" / "model.safetensors").is_file()

    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    adapter = AutoPeftModelForCausalLM.from_pretrained(model_dir).eval()
    merged = AutoModelForCausalLM.from_pretrained(result.path / "merged").eval()
    base = AutoModelForCausalLM.from_pretrained(result.metrics["base_model"]).eval()
    with_adapter, after_merge = probe(adapter, tokenizer), probe(merged, tokenizer)
    torch.testing.assert_close(after_merge, with_adapter, atol=1e-4, rtol=1e-4)
    assert (probe(base, tokenizer) - with_adapter).abs().max() > 1e-2  # the adapter did something


def test_qlora_loss_falls_and_adapter_reloads(tmp_path):
    result = run_stage("sft", recipe(tmp_path, "qlora", merge=True, lora={"r": 8, "alpha": 16},
                                     quantization={"bits": 4, "quant_type": "nf4"}))
    assert falls(result.metrics["losses"]), result.metrics["losses"]

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    model_dir = result.path / "model"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base_path = result.metrics["base_model"]
    quantized = AutoModelForCausalLM.from_pretrained(
        base_path, device_map={"": "cpu"}, dtype=torch.float32,
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=True,
                                               bnb_4bit_compute_dtype=torch.float32))
    assert any("4bit" in type(m).__name__ for m in quantized.modules())
    on_4bit = PeftModel.from_pretrained(quantized, model_dir).eval()
    # The merged model is the adapter on an unquantized base: equal to that, not to the 4-bit one.
    float_base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    on_float = PeftModel.from_pretrained(float_base, model_dir).eval()
    merged = AutoModelForCausalLM.from_pretrained(result.path / "merged").eval()
    torch.testing.assert_close(probe(merged, tokenizer), probe(on_float, tokenizer), atol=1e-4, rtol=1e-4)
    # 4-bit rounding moves the logits, but not far
    assert (probe(on_4bit, tokenizer) - probe(on_float, tokenizer)).abs().mean() < 0.5


def test_run_resumes_skips_and_reruns_on_change(tmp_path):
    spec = recipe(tmp_path, steps=10)
    spec["evaluation"] = {"task": "arithmetic", "data": [{"builtin": "arithmetic", "split": "heldout",
                                                          "count": 16}], "max_new_tokens": 12}
    first = run(spec)
    run_dir = tmp_path / "run"
    for name in ("recipe.yaml", "manifest.json", "base_eval/metrics.json", "round_1/eval/metrics.json",
                 "round_1/sft/model", "report.md", "report.png"):
        assert (run_dir / name).exists(), name
    assert not (run_dir / ".work" / "round_1" / "sft").exists()  # checkpoints removed once complete
    manifest = read_manifest(run_dir)
    assert manifest["stages"]["round_1/sft"]["status"] == "complete"
    import platform

    import torch
    import transformers
    import trl

    assert manifest["versions"]["python"] == platform.python_version()
    assert (manifest["versions"]["torch"], manifest["versions"]["transformers"], manifest["versions"]["trl"]) == (
        torch.__version__, transformers.__version__, trl.__version__)
    assert first.evaluation["after"]["task"]["total"] == 16 and "accuracy" in first.evaluation["before"]["summary"]
    model, tokenizer = first["sft"].load_model()  # the notebook API
    assert model.config.model_type == "llama" and tokenizer.chat_template
    assert len(first["sft"].dataset()) == 400

    again = run(spec)
    assert again["sft"].skipped and again["sft"].metrics == manifest["stages"]["round_1/sft"]["metrics"]

    changed = load_recipe(spec, ["sft.learning_rate=1e-3"])
    third = run(changed)
    assert not third["sft"].skipped
    assert read_manifest(run_dir)["stages"]["round_1/sft"]["key"] != manifest["stages"]["round_1/sft"]["key"]


def test_packing_keeps_every_document_and_loss_token(tmp_path):
    """Best-fit packing into 256-token rows: every one of the 400 examples appears as its own
    document (seq_lengths, from which position ids restart per document, so documents do not
    attend to each other), and the loss tokens in the packed rows are exactly the assistant tokens
    counted before packing."""
    result = run_stage("sft", recipe(tmp_path, steps=6, packing=True, max_length=256,
                                     per_device_train_batch_size=4))
    metrics = result.metrics
    assert metrics["packing"]["documents"] == metrics["masks"]["examples"] == 400
    assert metrics["packing"]["label_tokens"] == metrics["masks"]["assistant_tokens"]
    assert metrics["packing"]["sequences"] < 400 // 2  # ~60-token examples, several per row
    assert metrics["losses"][-1] < metrics["losses"][0]


@pytest.mark.parametrize("lora, tied", [
    ({"r": 8, "alpha": 16}, True),
    ({"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj", "embed_tokens"]}, False),
], ids=["all-linear", "lora-on-embed_tokens"])
def test_lora_merge_of_tied_embeddings(tmp_path, lora, tied):
    """The tiny Llama ties lm_head to embed_tokens, as Llama 3.2 1B/3B do. Two LoRA steps, then
    merged and reloaded with AutoModelForCausalLM. With the default all-linear adapter (peft
    leaves the output layer out) the merged model stays tied: lm_head.weight and
    embed_tokens.weight are one tensor, equal to the base's bit for bit, the safetensors file
    holds no lm_head.weight and the config says tie_word_embeddings. With LoRA on embed_tokens the
    adapter changes the input side only, so the merged model is untied, its lm_head the base's
    matrix bit for bit (merging into the shared matrix would move the output layer too). Either
    way the merged logits equal the adapter's on its base within 1e-5 (fp32). Measured here, on
    logits up to ~5: 9.4e-6 (all-linear) and 6.9e-6, close to the bound; fp64 forward passes of
    the same two models still differ by 1-2e-6, so most of it is the fp32 rounding of the merged
    W + s*B@A rather than of the forward pass. An unfixed merge into the shared matrix fails the
    bit-for-bit lm_head check above."""
    from peft import AutoPeftModelForCausalLM
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = recipe(tmp_path, "lora", steps=2, merge=True, lora=lora)
    result = run_stage("sft", spec)
    merged_dir = result.path / "merged"
    base = AutoModelForCausalLM.from_pretrained(result.metrics["base_model"], dtype=torch.float32).eval()
    assert base.config.tie_word_embeddings
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    adapter = AutoPeftModelForCausalLM.from_pretrained(result.path / "model", dtype=torch.float32).eval()
    with safe_open(str(merged_dir / "model.safetensors"), "pt") as saved:
        keys = set(saved.keys())
    embed, head = merged.model.embed_tokens.weight, merged.lm_head.weight
    assert "model.embed_tokens.weight" in keys
    assert torch.equal(head, base.lm_head.weight)
    if tied:
        assert merged.config.tie_word_embeddings and "lm_head.weight" not in keys
        assert head is embed
    else:
        assert not merged.config.tie_word_embeddings and "lm_head.weight" in keys
        assert head.data_ptr() != embed.data_ptr() and not torch.equal(head, embed)

    tokenizer = AutoTokenizer.from_pretrained(result.path / "model")
    with_adapter = probe(adapter, tokenizer)
    torch.testing.assert_close(probe(merged, tokenizer), with_adapter, atol=1e-5, rtol=0)
    assert (probe(base, tokenizer) - with_adapter).abs().max() > 1e-2  # the adapter did something
    # a later stage that loads the adapter directory (load_model merges it on the fly) unties alike
    from alignloop.config import load_recipe
    from alignloop.models.loading import load_model

    loaded = load_model(load_recipe(spec), str(result.path / "model")).eval()
    assert loaded.config.tie_word_embeddings is tied and torch.equal(loaded.lm_head.weight, base.lm_head.weight)
    torch.testing.assert_close(probe(loaded, tokenizer), with_adapter, atol=1e-5, rtol=0)
