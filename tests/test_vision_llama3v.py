"""The Llama 3-V variant: image tokens in the LM's input, the feature cache, a short training run."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader
from transformers import LlamaForCausalLM

from alignloop.data.contracts import validate_record
from alignloop.data.tasks import shapes
from alignloop.vision.data import image_token_id
from alignloop.vision.llama3v import (FeatureCache, Llama3V, Llama3VCollator, image_key,
                                      image_processor, tiny_encoder, train)


@pytest.fixture()
def model(tiny_dir, tokenizer):
    torch.manual_seed(0)
    lm = LlamaForCausalLM.from_pretrained(tiny_dir)
    return Llama3V(lm, tiny_encoder(seed=0), image_token_id(tokenizer))


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shapes")
    return [validate_record(r, "vision_chat")
            for r in shapes.records("train", 64, 0, tasks=("colour",), image_dir=folder)]


def collator(tokenizer, model, **kwargs):
    return Llama3VCollator(tokenizer, image_processor(model.encoder), model.image_tokens, **kwargs)


class Calls:
    """Counts forward calls of a module."""

    def __init__(self, module):
        self.count = 0
        module.register_forward_hook(lambda *_: setattr(self, "count", self.count + 1))


def test_image_tokens_expand_and_never_carry_labels(tokenizer, model, records):
    batch = collator(tokenizer, model)(records[:3])
    is_image = batch["input_ids"] == model.image_token_id
    assert model.image_tokens == 16  # (32 px / 8 px patches)^2
    assert is_image.sum(dim=1).tolist() == [16, 16, 16]
    assert (batch["labels"][is_image] == -100).all()
    assert batch["pixel_values"].shape == (3, 3, 32, 32) and len(batch["image_keys"]) == 3
    first = is_image[0].nonzero().flatten()
    assert first.tolist() == list(range(first[0], first[0] + 16))  # one contiguous run per image


def test_forward_backward(tokenizer, model, records):
    batch = collator(tokenizer, model)(records[:2])
    out = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "labels", "pixel_values")})
    assert out.logits.shape == (*batch["input_ids"].shape, model.lm.config.vocab_size)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert model.projector.proj.weight.grad.abs().sum() > 0
    assert model.encoder.embeddings.patch_embedding.weight.grad.abs().sum() > 0
    # the image really reaches the LM: another picture changes the answer's logits
    other = batch["pixel_values"].flip(0)
    with torch.no_grad():
        again = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      pixel_values=other).logits
    assert not torch.allclose(again, out.logits.detach())


def test_image_token_count_must_match_features(tokenizer, model, records):
    batch = collator(tokenizer, model)(records[:2])
    with pytest.raises(ValueError, match="32 image tokens for 1 images of 16 tokens each"):
        model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"][:1])


def test_cache_gives_the_same_loss_without_calling_the_encoder(tokenizer, model, records, tmp_path):
    cache = FeatureCache(tmp_path / "cache", model.encoder, image_processor(model.encoder))
    calls = Calls(model.encoder)
    paths = [r["messages"][0]["content"][0]["path"] for r in records[:8]]
    assert cache.precompute(paths, batch_size=4) == 8 and calls.count == 2
    assert cache.precompute(paths) == 0 and calls.count == 2  # warm: nothing recomputed

    live = collator(tokenizer, model)(records[:8])
    inputs = {k: live[k] for k in ("input_ids", "attention_mask", "labels")}
    with torch.no_grad():
        loss_live = model(**inputs, pixel_values=live["pixel_values"]).loss
        calls.count = 0
        cold = collator(tokenizer, model, pixels=False)(records[:8])  # no image decoding at all
        assert "pixel_values" not in cold and cold["image_keys"] == live["image_keys"]
        loss_cached = model(**inputs, image_features=cache.load(cold["image_keys"])).loss
    assert calls.count == 0
    assert torch.equal(loss_cached, loss_live)

    losses = train(model, DataLoader(records[:8], batch_size=4, collate_fn=collator(
        tokenizer, model, pixels=False)), steps=2, cache=cache)
    assert calls.count == 0 and len(losses) == 2


def test_cache_keys(tokenizer, model, records, tmp_path):
    """Keys hash the file's bytes: a copy under another name is the same entry. The folder
    hashes the encoder's weights: a changed encoder does not read stale features."""
    path = records[0]["messages"][0]["content"][0]["path"]
    copy = shutil.copy(path, tmp_path / "copy.png")
    assert image_key(path) == image_key(copy)
    processor = image_processor(model.encoder)
    cache = FeatureCache(tmp_path / "c", model.encoder, processor)
    assert cache.precompute([path, copy]) == 1
    with pytest.raises(KeyError, match="1 image\\(s\\) not in the feature cache"):
        cache.load([image_key(records[1]["messages"][0]["content"][0]["path"])])
    with torch.no_grad():
        model.encoder.post_layernorm.bias.add_(0.1)
    assert FeatureCache(tmp_path / "c", model.encoder, processor).dir != cache.dir


def test_short_training_run_lowers_the_loss(tokenizer, model, records):
    torch.manual_seed(0)
    loader = DataLoader(records, batch_size=8, shuffle=True, collate_fn=collator(tokenizer, model))
    frozen = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    losses = train(model, loader, steps=30, lr=2e-3, train_lm=True)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.5 * first, losses
    assert all(torch.equal(frozen[k], v) for k, v in model.encoder.state_dict().items())


def test_save_and_load(tokenizer, model, records, tmp_path):
    batch = collator(tokenizer, model)(records[:2])
    model.save(tmp_path / "m")
    again = Llama3V.load(tmp_path / "m")
    with torch.no_grad():
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
        assert torch.allclose(model.eval()(**inputs).logits, again.eval()(**inputs).logits, atol=1e-6)


def test_pooled_image_tokens(tokenizer, tiny_dir, records):
    """image_tokens=4 average-pools the 4 x 4 patch grid to 2 x 2: 4 image tokens per image."""
    torch.manual_seed(0)
    model = Llama3V(LlamaForCausalLM.from_pretrained(tiny_dir), tiny_encoder(seed=0),
                    image_token_id(tokenizer), image_tokens=4)
    batch = collator(tokenizer, model)(records[:2])
    assert (batch["input_ids"] == model.image_token_id).sum(dim=1).tolist() == [4, 4]
    features = torch.arange(16.0).view(1, 16, 1)  # patch k of the 4 x 4 grid holds k
    assert model.pool(features).flatten().tolist() == [2.5, 4.5, 10.5, 12.5]  # mean of each 2 x 2
    assert torch.isfinite(model(**{k: batch[k] for k in ("input_ids", "attention_mask", "labels",
                                                         "pixel_values")}).loss)
    with pytest.raises(ValueError, match="must be a square number of at most the encoder's 16"):
        Llama3V(model.lm, model.encoder, model.image_token_id, image_tokens=8)


# ---- through a recipe: `vision.architecture: llama3v` ----------------------------------------------

SMALL = dict(per_device_train_batch_size=8, learning_rate=3.0e-3, num_train_epochs=1,
             logging_steps=1, save_steps=100, max_length=64)


def _spec(out, stages=("adapter", "sft"), evaluation=True, **llama3v):
    shapes_data = [{"builtin": "shapes", "split": "train", "count": 64}]
    spec = {"output_dir": str(out), "model": {"path": "builtin:tiny"},
            "vision": {"architecture": "llama3v", "llama3v": {"encoder": "tiny", **llama3v},
                       "stages": list(stages),
                       "adapter": {"kind": "vision_chat", "data": shapes_data, **SMALL},
                       "sft": {"data": shapes_data, "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
                               **SMALL}}}
    if evaluation:
        spec["vision"]["evaluation"] = {"data": [{"builtin": "shapes", "split": "heldout", "count": 12}],
                                        "max_new_tokens": 3, "text_prompts": ["Name a colour."]}
    return spec


def test_llama3v_recipes_validate_and_errors_name_the_key():
    from alignloop.config import RecipeError, load_recipe

    import yaml

    from alignloop.config import dump_recipe

    cfg = load_recipe(_spec("/tmp/unused"))
    assert cfg.vision.adapter.train == ["projector"] and cfg.vision.sft.train == ["projector"]
    # the resolved recipe.yaml of either architecture loads again (every section written out)
    recipes = Path(__file__).resolve().parents[1] / "recipes"
    for resolved in (cfg, load_recipe(recipes / "vision_quickstart.yaml")):
        assert load_recipe(yaml.safe_load(dump_recipe(resolved))).vision == resolved.vision
    spec = _spec("/tmp/unused")

    def error(change, message):
        broken = {**spec, "vision": {**spec["vision"], **change}}
        with pytest.raises(RecipeError, match=message):
            load_recipe(broken)

    error({"architecture": "cross_attention", "llama3v": {"image_tokens": 4}}, "vision.llama3v: options of the Llama 3-V variant; set "
                                               "vision.architecture: llama3v")
    error({"start": "mllama"}, "vision.start: .*Mllama conversion is not supported for architecture llama3v")
    error({"adapter_config": {"encoder": "tiny"}}, "vision.adapter_config: cross-attention options")
    error({"stages": ["adapter", "dpo"], "dpo": {"data": [{"builtin": "shapes", "split": "train"}]}},
          "vision.stages: architecture llama3v runs the adapter and sft stages, not dpo")
    error({"adapter": {**spec["vision"]["adapter"], "train": ["projector", "cross_attention"]}},
          "vision.adapter.train: cross_attention: not a part of a llama3v model")
    error({"sft": {**spec["vision"]["sft"], "train": ["encoder", "projector"]}},
          "vision.sft.train: the encoder cannot train on cached features")
    error({"llama3v": {"image_tokens": 8}},
          r"vision.llama3v.image_tokens: 8: must be a square number of at most the encoder's 16 patches")
    error({"llama3v": {"encoder": "./no/such/siglip"}}, "vision.llama3v.encoder: no such directory")
    error({"llama3v": {"encode": "tiny"}}, "vision.llama3v.encode")  # strict: unknown keys


class EncoderCalls:
    """Counts forward calls of every SiglipVisionModel; with `fail`, any call is an error."""

    def __init__(self, monkeypatch, fail=False):
        from transformers import SiglipVisionModel

        self.count, forward = 0, SiglipVisionModel.forward

        def counted(module, *args, **kwargs):
            self.count += 1
            if fail:
                raise AssertionError("the encoder ran although every feature was cached")
            return forward(module, *args, **kwargs)

        monkeypatch.setattr(SiglipVisionModel, "forward", counted)


@pytest.fixture(scope="module")
def llama3v_run(tmp_path_factory):
    """adapter (projector, LM frozen) then sft (projector + LoRA) on 64 shapes questions, with
    the held-out evaluation before and after, through the pipeline."""
    from alignloop.config import load_recipe
    from alignloop.pipeline.runner import run

    out = tmp_path_factory.mktemp("llama3v") / "run"
    with pytest.MonkeyPatch.context() as monkeypatch:
        calls = EncoderCalls(monkeypatch)
        result = run(load_recipe(_spec(out)))
    return out, result, calls.count


def test_llama3v_run_trains_through_the_pipeline(llama3v_run, tiny_dir):
    out, result, encoder_calls = llama3v_run
    adapter, sft = (result.stages[f"round_1/vision_{s}"].metrics for s in ("adapter", "sft"))
    assert adapter["steps"] == 8 and adapter["trained"] == {"projector": adapter["trained"]["projector"]}
    assert sum(adapter["losses"][-2:]) < sum(adapter["losses"][:2])
    assert sft["losses"][-1] < sft["losses"][0] and set(sft["trained"]) == {"projector", "lm_lora"}
    # the features of the 64 pictures are encoded once (two batches of 32), in the adapter stage;
    # the sft stage finds them all cached. The other calls are the two evaluations' (12 + 1
    # prompts each, live pixels: one generate call encodes the 12 held-out pictures).
    assert adapter["features_computed"] == 64 and sft["features_computed"] == 0
    assert adapter["feature_cache"] == sft["feature_cache"]
    assert adapter["feature_cache"].startswith(str(out / "feature_cache"))
    assert encoder_calls == 2 + 2

    base = LlamaForCausalLM.from_pretrained(tiny_dir).state_dict()
    after_adapter = Llama3V.load(out / "round_1" / "vision_adapter" / "model")
    assert all(torch.equal(after_adapter.lm.state_dict()[k], v) for k, v in base.items())  # LM frozen
    after_sft = Llama3V.load(out / "round_1" / "vision_sft" / "model")
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(after_sft.lm.state_dict()[q], base[q])  # LoRA, merged
    rows = {row["label"]: row for row in json.loads((out / "report.json").read_text())["rows"]}
    assert rows["base"]["accuracy"] is not None and rows["round_1"]["accuracy"] is not None
    assert json.loads((out / "round_1" / "eval" / "metrics.json").read_text())["count"] == 12


def test_llama3v_training_with_a_warm_cache_never_runs_the_encoder(llama3v_run, tmp_path, monkeypatch):
    """A second run (its own output directory, no evaluation) pointed at the first run's cache:
    every picture is cached, so the encoder must not run at all; the adapter stage's losses equal
    the first run's (cached features are the encoder's, bit for bit)."""
    from alignloop.config import load_recipe
    from alignloop.pipeline.runner import run

    first, result, _ = llama3v_run
    EncoderCalls(monkeypatch, fail=True)
    cfg = load_recipe(_spec(tmp_path / "again", evaluation=False, cache_dir=str(first / "feature_cache")))
    again = run(cfg).stages
    assert again["round_1/vision_adapter"].metrics["features_computed"] == 0
    assert again["round_1/vision_sft"].metrics["features_computed"] == 0
    assert again["round_1/vision_adapter"].metrics["losses"] == \
        result.stages["round_1/vision_adapter"].metrics["losses"]


def test_llama3v_rerun_skips_complete_stages(llama3v_run, monkeypatch):
    """The same recipe again: both stages and both evaluations are complete, nothing runs."""
    from alignloop.config import load_recipe
    from alignloop.pipeline.runner import run

    out, first, _ = llama3v_run
    EncoderCalls(monkeypatch, fail=True)
    again = run(load_recipe(_spec(out)))
    assert all(stage.skipped for stage in again.stages.values()) and len(again.stages) == 2
    assert again.evaluation["after"]["accuracy"] == first.evaluation["after"]["accuracy"]
