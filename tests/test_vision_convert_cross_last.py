"""Mllama conversion without holes (issue 13, item 5): transformers' MllamaConfig accepts a cross
layer at the last decoder index (after the last self layer), which VisionLlama cannot hold (its
cross layers run just before a self layer). Conversion refuses it, in both directions, with a
ValueError naming `text_config.cross_attention_layers` (it used to be a KeyError in the key map),
and the layouts it can hold still round-trip exactly."""

import pytest
import torch
from transformers import LlamaForCausalLM, MllamaConfig, MllamaForConditionalGeneration

from alignloop.vision.config import ENCODERS
from alignloop.vision.convert import from_mllama, split_config, to_mllama
from alignloop.vision.model import VisionLlama

VOCAB, IMAGE = 96, 96  # the image token is the first row after the text vocabulary


def _config(num_layers: int, cross: list[int]) -> MllamaConfig:
    """A tiny Mllama (fp32, 1 tile of 32 px, P = 16 patches) with `cross` among `num_layers`."""
    text = dict(vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=64, num_hidden_layers=num_layers, cross_attention_layers=cross,
                max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return MllamaConfig(text_config=text, vision_config=dict(ENCODERS["tiny"]), image_token_index=IMAGE)


def _random_mllama(config: MllamaConfig, seed: int = 0) -> MllamaForConditionalGeneration:
    torch.manual_seed(seed)
    hf = MllamaForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("gate"):  # open every gate (cross layers' and the encoder's)
                p.copy_(torch.empty_like(p).uniform_(0.3, 0.9))
    return hf


def _batch(seed: int = 1) -> dict[str, torch.Tensor]:
    """Two rows of 10 tokens, one image each: row 0 has text before its image, row 1 is left-padded."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (2, 10), generator=g)
    attention = torch.ones(2, 10, dtype=torch.long)
    attention[1, :2] = 0
    cross = torch.zeros(2, 10, 1, 1, dtype=torch.long)
    for b, start in enumerate([3, 2]):
        ids[b, start] = IMAGE
        cross[b, start:] = 1
    return dict(input_ids=ids, attention_mask=attention, pixel_values=torch.randn(2, 1, 1, 3, 32, 32, generator=g),
                aspect_ratio_ids=torch.ones(2, 1, dtype=torch.long),
                aspect_ratio_mask=torch.ones(2, 1, 1, dtype=torch.long), cross_attention_mask=cross)


def _assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k, v in a.items() if not torch.equal(v, b[k])]
    assert not different, different


# (b) layouts VisionLlama holds: the round trip is exact ---------------------------------------

@pytest.mark.parametrize("num_layers,cross,ours", [(4, [1], [1]), (4, [0, 2], [0, 1]), (5, [3], [3])],
                         ids=["1-of-4", "0,2-of-4", "just-before-the-last-self-layer"])
@torch.no_grad()
def test_supported_layouts_round_trip_exactly(num_layers, cross, ours):
    hf = _random_mllama(_config(num_layers, cross))
    model = from_mllama(hf).eval()
    assert model.cross_layers == ours
    assert model.language_model.config.num_hidden_layers == num_layers - len(cross)
    batch = _batch()
    theirs = hf(**batch).logits
    assert (model(**batch).logits - theirs).abs().max() <= 1e-5
    text = {k: batch[k] for k in ("input_ids", "attention_mask")}
    assert not torch.allclose(theirs, hf(**text).logits, atol=1e-3)  # the image matters
    back = to_mllama(model)
    assert back.config.text_config.cross_attention_layers == cross
    _assert_same_state(hf.state_dict(), back.state_dict())
    _assert_same_state(model.state_dict(), from_mllama(back).state_dict())


# (a) a cross layer at the last index: refused, naming the key, the index and why --------------

def test_the_last_layout_is_valid_in_transformers_and_its_last_layer_matters():
    """So refusing is needed: dropping the last layer would silently change the logits."""
    hf = _random_mllama(_config(4, [1, 3]))
    batch = _batch()
    with torch.no_grad():
        logits = hf(**batch).logits
        hf.model.language_model.layers[3].cross_attn_attn_gate.zero_()
        hf.model.language_model.layers[3].cross_attn_mlp_gate.zero_()
        assert not torch.allclose(logits, hf(**batch).logits, atol=1e-3)


@pytest.mark.parametrize("cross", [[3], [1, 3]])
def test_from_mllama_refuses_a_cross_layer_after_the_last_self_layer(cross):
    hf = _random_mllama(_config(4, cross))
    match = r"text_config\.cross_attention_layers=\[.*\] \(num_hidden_layers=4\): index 3 is the last decoder layer"
    with pytest.raises(ValueError, match=match) as error:
        from_mllama(hf)
    assert "after the last self-attention layer" in str(error.value)
    with pytest.raises(ValueError, match=match):
        split_config(hf.config)


def test_to_mllama_refuses_a_cross_layer_after_the_last_self_layer():
    """The same layout from our side: a cross layer "before self layer 3" of 3 (it never runs in
    VisionLlama) would be Mllama's last layer."""
    config = _config(4, [1])
    text, vision, _, _ = split_config(config)
    with torch.device("meta"):
        model = VisionLlama(LlamaForCausalLM(text), vision, [3], IMAGE)
    with pytest.raises(ValueError, match=r"cross_layers=\[3\] \(of 3 self layers\).*text_config\.cross_attention_layers"
                                         r"=\[3\] \(num_hidden_layers=4\): index 3 is the last decoder layer"):
        to_mllama(model)


@pytest.mark.parametrize("cross,why", [([1, 2], r"indices 1 and 2 are two cross-attention layers in a row"),
                                       ([1, 1], r"index 1 is listed more than once"),
                                       ([4], r"index 4 is not a decoder-layer index in 0\.\.3")])
def test_other_layouts_without_a_place_are_refused(cross, why):
    config = _config(4, [0])
    config.text_config.cross_attention_layers = cross  # MllamaConfig takes them
    with pytest.raises(ValueError, match=rf"text_config\.cross_attention_layers=.*{why}"):
        split_config(config)
