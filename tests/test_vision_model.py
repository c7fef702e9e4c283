"""The cross-attention vision model: the language model untouched, Mllama masks, and conversion
to and from transformers' MllamaForConditionalGeneration (issue 4, items 1-3)."""

import logging

import pytest
import torch

from transformers import AttentionInterface, LlamaForCausalLM, MllamaConfig, MllamaForConditionalGeneration
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from alignloop.models.tiny import tiny_config
from alignloop.vision.config import AdapterConfig, default_cross_layers
from alignloop.vision.convert import from_mllama, key_map, split_config, to_mllama
from alignloop.vision.model import VisionLlama, attach, cross_attention_bias

FOUR_TILES = {"max_num_tiles": 4, "supported_aspect_ratios": [[1, 1], [1, 2], [1, 3], [1, 4], [2, 1],
                                                              [2, 2], [3, 1], [4, 1]]}


def _lm(seed=0, **overrides):
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_config(**overrides)).eval()


def _model(cross=None, every=4, tiles=1, gates=(0.7, -0.4), seed=0) -> VisionLlama:
    options = FOUR_TILES if tiles > 1 else {}
    model = attach(_lm(seed), AdapterConfig(encoder="tiny", encoder_options=options, cross_attention_layers=cross,
                                            cross_attention_every=every, seed=seed)).eval()
    for layer in model.cross_attention_layers.values():  # non-zero gates, so images matter
        layer.cross_attn_attn_gate.data.fill_(gates[0])
        layer.cross_attn_mlp_gate.data.fill_(gates[1])
    return model


def _batch(model: VisionLlama, tiles=1, images=1, seed=1):
    """Two left-padded rows; row 0 has text before its first image, row 1 starts with one; with
    tiles > 1 the images use 1..tiles real tiles (aspect ratios 1x1, 1x2, 2x2)."""
    g = torch.Generator().manual_seed(seed)
    length, image = 12, model.image_token_id
    ids = torch.randint(0, 1000, (2, length), generator=g)
    attention = torch.ones(2, length, dtype=torch.long)
    attention[1, :2] = 0
    cross = torch.zeros(2, length, images, tiles, dtype=torch.long)
    real = [1, 2, 4][:images] if tiles > 1 else [1] * images
    starts = [[3, 7, 9][:images], [2, 8, 10][:images]]
    for b in range(2):
        for n, s in enumerate(starts[b]):
            ids[b, s] = image
            end = starts[b][n + 1] if n + 1 < images else length
            cross[b, s:end, n, :real[n]] = 1
    size = model.vision_config.image_size
    pixels = torch.randn(2, images, tiles, 3, size, size, generator=g)
    ratio_ids = torch.tensor([{1: 1, 2: 2, 4: 6}[t] for t in real]).repeat(2, 1)
    ratio_mask = torch.zeros(2, images, tiles, dtype=torch.long)
    for n, t in enumerate(real):
        ratio_mask[:, n, :t] = 1
    return dict(input_ids=ids, attention_mask=attention, pixel_values=pixels, aspect_ratio_ids=ratio_ids,
                aspect_ratio_mask=ratio_mask, cross_attention_mask=cross)


def _text(batch):
    return {k: batch[k] for k in ("input_ids", "attention_mask")}


def _text_ids(batch, model):
    return {**_text(batch), "input_ids": batch["input_ids"].masked_fill(
        batch["input_ids"] == model.image_token_id, 7)}


@torch.no_grad()
def test_no_image_logits_equal_the_base_llama():
    model = _model(every=2)
    batch = _text_ids(_batch(model), model)
    base = _lm()(**batch).logits
    assert torch.equal(model(**batch).logits, base)


@torch.no_grad()
def test_zero_gates_with_images_equal_no_images():
    """tanh(0) = 0 and x + 0 * y == x exactly, so a fresh adapter changes nothing."""
    model = _model(every=2, gates=(0.0, 0.0))
    batch = _batch(model)
    assert torch.equal(model(**batch).logits, model(**_text(batch)).logits)
    opened = _model(every=2)
    assert not torch.equal(opened(**batch).logits, opened(**_text(batch)).logits)


def test_language_model_is_unchanged_by_attach():
    lm = _lm()
    before = {k: v.clone() for k, v in lm.state_dict().items()}
    model = attach(lm, AdapterConfig(encoder="tiny"))
    assert model.language_model is lm and lm.state_dict().keys() == before.keys()
    assert all(torch.equal(v, lm.state_dict()[k]) for k, v in before.items())
    assert model.cross_layers == [3]  # before every 4th self layer, from the top


def test_default_schedule_is_metas():
    assert default_cross_layers(32, 4) == [3, 7, 11, 15, 19, 23, 27, 31]
    assert default_cross_layers(4, 2) == [1, 3]
    assert AdapterConfig(cross_attention_layers=[2, 0]).cross_layers(4) == [0, 2]
    with pytest.raises(ValueError, match="distinct self-attention layer index in 0..3"):
        AdapterConfig(cross_attention_layers=[4]).cross_layers(4)


def test_cross_attention_bias_by_hand():
    """3 tokens, 2 images of 2 tiles (P = 2 patches each): token 0 sees nothing, token 1 image 0's
    first tile, token 2 both tiles of image 1."""
    mask = torch.tensor([[[[0, 0], [0, 0]], [[1, 0], [0, 0]], [[0, 0], [1, 1]]]])  # (1, 3, 2, 2)
    bias, rows = cross_attention_bias(mask, patches=2, dtype=torch.float32)
    low = torch.finfo(torch.float32).min
    assert bias.shape == (1, 1, 3, 8) and rows.flatten().tolist() == [0.0, 1.0, 1.0]
    assert bias[0, 0, 0].tolist() == [0.0] * 8  # a fully masked row: all 0, as Mllama
    assert bias[0, 0, 1].tolist() == [0, 0] + [low] * 6
    assert bias[0, 0, 2].tolist() == [low] * 4 + [0] * 4


@torch.no_grad()
def test_text_before_the_first_image_ignores_its_mlp_branch():
    """With the attention gate closed and only the MLP gate open, tokens before the first image
    (rows 0..2 of example 0) keep the no-image logits; tokens after it change."""
    model = _model(every=2, gates=(0.0, 0.9))
    batch = _batch(model)
    with_images, without = model(**batch).logits, model(**_text(batch)).logits
    assert torch.equal(with_images[0, :3], without[0, :3])
    assert not torch.allclose(with_images[0, 3:], without[0, 3:])


@pytest.mark.parametrize("cross,every,tiles,images", [(None, 2, 1, 1), ([0, 2], 4, 4, 2), (None, 4, 4, 3)],
                         ids=["every2-1tile", "layers0,2-4tiles-2images", "every4-4tiles-3images"])
@torch.no_grad()
def test_mllama_round_trip_logits(cross, every, tiles, images):
    """float32 logits of ours, to_mllama(ours) and from_mllama(to_mllama(ours)) agree within 1e-5,
    with images and without."""
    model = _model(cross, every, tiles)
    batch = _batch(model, tiles, images)
    hf = to_mllama(model).eval()
    assert hf.config.text_config.cross_attention_layers == [c + j for j, c in enumerate(model.cross_layers)]
    back = from_mllama(hf).eval()
    assert back.cross_layers == model.cross_layers
    ours = model(**batch).logits
    assert (hf(**batch).logits - ours).abs().max() <= 1e-5
    assert (back(**batch).logits - ours).abs().max() <= 1e-5
    assert not torch.allclose(ours, model(**_text(batch)).logits, atol=1e-3)  # the images matter
    text = _text_ids(batch, model)
    assert (hf(**text).logits - model(**text).logits).abs().max() <= 1e-5
    assert (back(**text).logits - model(**text).logits).abs().max() <= 1e-5


@torch.no_grad()
def test_from_mllama_of_a_random_mllama_and_back():
    """The other direction first: a random Mllama -> ours -> Mllama, weights equal key by key."""
    model = _model([1, 2], tiles=4)
    torch.manual_seed(3)
    hf = MllamaForConditionalGeneration(to_mllama(model).config).eval()
    for name, p in hf.named_parameters():
        if name.endswith("_gate"):
            p.fill_(0.5)
    ours = from_mllama(hf).eval()
    batch = _batch(ours, tiles=4, images=2)
    assert (hf(**batch).logits - ours(**batch).logits).abs().max() <= 1e-5
    again = to_mllama(ours).state_dict()
    assert all(torch.equal(v, again[k]) for k, v in hf.state_dict().items())


@torch.no_grad()
def test_greedy_generation_matches_mllama():
    model = _model(every=2)
    batch = _batch(model)
    hf = to_mllama(model).eval()
    ours = model.generate(**batch, max_new_tokens=6)
    theirs = hf.generate(**batch, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert ours.shape == (2, 18) and torch.equal(ours, theirs)
    back = from_mllama(hf).eval()
    assert torch.equal(back.generate(**batch, max_new_tokens=6), ours)


def test_cross_attention_goes_through_the_attention_interface():
    """A function registered with AttentionInterface is called by the cross layers (its key length
    is the vision length), and eager gives sdpa's logits within 1e-5 on real tokens."""
    calls = []

    def spy(module, query, key, value, attention_mask, **kwargs):
        calls.append(key.shape[2])
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("alignloop_test_spy", spy)
    AttentionMaskInterface.register("alignloop_test_spy", sdpa_mask)
    model = _model(every=2)
    batch = _batch(model)
    with torch.no_grad():
        reference = model(**batch).logits
        model.language_model.set_attn_implementation("alignloop_test_spy")
        spied = model(**batch).logits
        model.language_model.set_attn_implementation("eager")
        eager = model(**batch).logits
    patches = model.vision_model.num_patches
    assert calls.count(patches) == 2 and calls.count(12) == 4  # 2 cross + 4 self layers
    real = batch["attention_mask"].bool()  # padding rows differ between eager and sdpa, unused
    assert torch.equal(spied, reference) and (eager - reference)[real].abs().max() <= 1e-5


def test_cross_attention_runs_through_alignloop_triton(caplog, monkeypatch):
    """With attn_implementation alignloop_triton (issue 5's kernel; the Triton interpreter on a
    CPU) self- and cross-attention run in the kernel, and the logits on real tokens match sdpa's
    within 1e-5 in float32, images included."""
    from alignloop.kernels import ATTENTION, register
    from alignloop.kernels import flash_attention as fa

    register()
    launched = []
    original = fa._forward
    monkeypatch.setattr(fa, "_forward", lambda q, k, *a: launched.append(k.shape[2]) or original(q, k, *a))
    model = _model(every=2)
    batch = _batch(model)
    with torch.no_grad():
        reference = model(**batch).logits
        model.language_model.set_attn_implementation(ATTENTION)
        with caplog.at_level(logging.WARNING, logger="alignloop.kernels"):
            kernel = model(**batch).logits
    assert not [r for r in caplog.records if "using torch sdpa" in r.message]
    assert launched.count(model.vision_model.num_patches) == 2 and launched.count(12) == 4
    real = batch["attention_mask"].bool()
    assert (kernel - reference)[real].abs().max() <= 1e-5


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    """Recomputing the decoder layers (cross layers inside their hooks) and the encoder changes
    nothing: loss and every adapter gradient within 1e-6 in float32, the frozen LM untouched."""
    def loss_and_grads(checkpointing: bool):
        model = _model(every=2).train()
        model.freeze_language_model()
        if checkpointing:
            model.activation_checkpointing_enable()
            assert model.is_activation_checkpointing and model.vision_model.is_activation_checkpointing
        batch = _batch(model, seed=2)
        ids = batch["input_ids"]
        labels = ids.masked_fill((batch["attention_mask"] == 0) | (ids == model.image_token_id), -100)
        loss = model(**batch, labels=labels).loss
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    plain_loss, plain = loss_and_grads(False)
    loss, grads = loss_and_grads(True)
    assert (loss - plain_loss).abs() <= 1e-6 and grads.keys() == plain.keys()
    assert not any(n.startswith("language_model.") for n in grads)
    assert all((grads[n] - g).abs().max() <= 1e-6 for n, g in plain.items() if g is not None)
    assert plain["cross_attention_layers.1.cross_attn_attn_gate"].abs().item() > 0


def _llama32_11b_config() -> MllamaConfig:
    """Llama 3.2 11B Vision's published numbers (reference C2/C3): 40 text layers of which 8
    cross at [3, 8, ..., 38], vocab 128256 (+8 embedding rows), image token 128256, tiles of 560."""
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    return MllamaConfig(
        image_token_index=128256,
        text_config=dict(vocab_size=128256, hidden_size=4096, num_hidden_layers=40, num_attention_heads=32,
                         num_key_value_heads=8, intermediate_size=14336, rope_parameters=rope,
                         cross_attention_layers=[3, 8, 13, 18, 23, 28, 33, 38], eos_token_id=[128001, 128008, 128009]),
        vision_config=dict(image_size=560, max_num_tiles=4, vision_output_dim=7680,
                           intermediate_layers_indices=[3, 7, 15, 23, 30]))


def test_llama32_11b_mapping_on_the_meta_device():
    """Every weight of an 11B Mllama (built on the meta device: no memory, no download) maps to
    one weight of ours with the same shape, and ours is a Llama 3.1 8B + Meta's schedule."""
    config = _llama32_11b_config()
    text, vision, cross, image_id = split_config(config)
    assert (text.num_hidden_layers, text.vocab_size, image_id) == (32, 128256, 128256)
    assert cross == [3, 7, 11, 15, 19, 23, 27, 31] == default_cross_layers(32, 4)
    with torch.device("meta"):
        hf = MllamaForConditionalGeneration(config)
        ours = VisionLlama(LlamaForCausalLM(text), vision, cross, image_id)
    theirs, mine = hf.state_dict(), ours.state_dict()
    assert theirs["model.language_model.embed_tokens.weight"].shape == (128264, 4096)
    rename = key_map(32, cross)
    mapped = {rename(k): v.shape for k, v in theirs.items() if rename(k) is not None}
    mine_shapes = {k: v.shape for k, v in mine.items()}
    assert mine_shapes.pop("learnable_embedding.weight") == (8, 4096)
    assert mine_shapes.pop("language_model.model.embed_tokens.weight") == (128256, 4096)
    assert mapped == mine_shapes
    assert sum(v.numel() for v in theirs.values()) == sum(v.numel() for v in mine.values())
    assert rename("model.language_model.layers.8.cross_attn.q_norm.weight") == \
        "cross_attention_layers.7.cross_attn.q_norm.weight"
    assert rename("model.language_model.layers.39.mlp.up_proj.weight") == \
        "language_model.model.layers.31.mlp.up_proj.weight"
