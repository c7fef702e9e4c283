"""The Llama 3-V variant: image tokens in the LM's input, the feature cache, a short training run."""

import shutil

import pytest
import torch
from torch.utils.data import DataLoader
from transformers import LlamaForCausalLM

from alignloop.data.contracts import validate_record
from alignloop.vision import shapes
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
