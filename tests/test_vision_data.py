"""Vision data: record contracts with images, image loading, Mllama batches, the shapes demo.

Masks are compared with tensors written out by hand from the Mllama rule (reference C3): an image
token opens a span up to the next image token (a run of consecutive image tokens shares the span
after the run), tokens before the first image attend to nothing, padding tiles never. Every
bad-record test checks the whole `file:line: field: reason` string a person would see."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from alignloop.data.contracts import validate_record
from alignloop.data.errors import DataError, FieldError
from alignloop.data.readers import read_records
from alignloop.data.source_config import SourceConfig
from alignloop.data.sources import load_sources
from alignloop.data.tasks import shapes
from alignloop.vision.data import (Encoded, ImageError, VisionCollator, VisionEncoder, collate,
                                   image_processor, image_token_id, load_image)

IMG = 9  # image token id in the hand-made examples


def png(path, size=(32, 32), mode="RGB", colour=(200, 30, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour if mode in ("RGB", "RGBA") else 128).save(path)
    return path


def jsonl(path, *records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def chat(*user_parts, answer="red"):
    return {"messages": [{"role": "user", "content": list(user_parts)},
                         {"role": "assistant", "content": answer}]}


def raised(path, kind="vision_chat"):
    with pytest.raises(DataError) as info:
        read_records(path, kind)
    return str(info.value)


@pytest.fixture()
def collator(tokenizer):
    return VisionCollator(tokenizer, image_processor(tile_size=32, max_tiles=4))


# ---- cross-attention mask on hand-made examples --------------------------------------------------

def example(ids, num_tiles, tiles=4):
    n = len(num_tiles)
    return Encoded(input_ids=ids, labels=ids, pixel_values=np.zeros((n, tiles, 3, 2, 2), np.float32),
                   aspect_ratio_ids=np.arange(1, n + 1), num_tiles=num_tiles,
                   aspect_ratio_mask=np.array([[1] * t + [0] * (tiles - t) for t in num_tiles]))


def test_cross_attention_mask_by_hand():
    """A: text, image 0 (2 tiles), text, images 1 and 2 back to back (1 and 3 tiles), text.
    B: one image of 4 tiles after two text tokens, padded on the right to A's length 8."""
    a = example([1, IMG, 2, 3, IMG, IMG, 4, 5], [2, 1, 3])
    b = example([1, 2, IMG, 3], [4])
    batch = collate([a, b], pad_id=0, image_token_id=IMG)
    expected = torch.zeros(2, 8, 3, 4, dtype=torch.long)
    expected[0, 1:4, 0, :2] = 1  # after image 0, until image 1
    expected[0, 4:8, 1, :1] = 1  # image 1 shares the span after the run [1, 2]
    expected[0, 5:8, 2, :3] = 1
    expected[1, 2:4, 0, :4] = 1  # padding rows 4..7 attend to nothing
    assert torch.equal(batch["cross_attention_mask"], expected)
    assert batch["aspect_ratio_ids"].tolist() == [[1, 2, 3], [1, 0, 0]]
    assert batch["aspect_ratio_mask"].tolist() == [
        [[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0]],
        [[1, 1, 1, 1], [1, 0, 0, 0], [1, 0, 0, 0]]]  # padding images: first tile only, as HF
    assert batch["pixel_values"].shape == (2, 3, 4, 3, 2, 2)
    assert batch["attention_mask"].tolist() == [[1] * 8, [1] * 4 + [0] * 4]
    assert batch["labels"][1].tolist() == [1, 2, IMG, 3] + [-100] * 4


def test_cross_attention_mask_left_padding():
    b = example([1, 2, IMG, 3], [1])
    batch = collate([example([IMG, 5, 6, 7, 8, 4], [2]), b], pad_id=0, image_token_id=IMG,
                    padding_side="left")
    assert batch["cross_attention_mask"][1, :, 0, :].tolist() == [[0] * 4] * 4 + [[1, 0, 0, 0]] * 2
    assert batch["cross_attention_mask"][0, :, 0, :].tolist() == [[1, 1, 0, 0]] * 6
    assert batch["input_ids"][1].tolist() == [0, 0, 1, 2, IMG, 3]


def test_text_only_batch_has_no_image_keys():
    batch = collate([Encoded([1, 2, 3], [1, 2, 3])], pad_id=0, image_token_id=IMG)
    assert sorted(batch) == ["attention_mask", "input_ids", "labels"]


# ---- encoding real records ---------------------------------------------------------------------

def test_labels_only_on_the_assistant_answer(tokenizer, collator, tmp_path):
    record = validate_record(chat({"type": "image", "path": str(png(tmp_path / "a.png"))},
                                  {"type": "text", "text": "What colour is the shape?"}), "vision_chat")
    batch = collator([record])
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    trained = ids[labels != -100]
    assert tokenizer.decode(trained) == "red<|eot_id|>"
    assert torch.equal(labels[labels != -100], trained)
    image_at = (ids == image_token_id(tokenizer)).nonzero().flatten().tolist()
    assert len(image_at) == 1 and labels[image_at[0]] == -100
    # the prompt's tokens before the image attend to nothing, every token from it on to tile 0
    cross = batch["cross_attention_mask"][0, :, 0, :]
    assert cross[:image_at[0]].sum() == 0
    assert cross[image_at[0]:].tolist() == [[1, 0, 0, 0]] * (len(ids) - image_at[0])


def test_collate_shapes_with_tiles_and_mixed_image_counts(tokenizer, collator, tmp_path):
    """A 64x32 image fills two 32 px tiles side by side (aspect ratio 1x2, id 2 of
    [1x1, 1x2, 1x3, 1x4, 2x1, 2x2, 3x1, 4x1]); a 32x32 one a single tile (id 1)."""
    wide, square = str(png(tmp_path / "w.png", (64, 32))), str(png(tmp_path / "s.png"))
    records = [validate_record({"messages": [{"role": "user", "content": "<|image|>Compare <|image|>"},
                                             {"role": "assistant", "content": "same"}],
                                "images": [wide, square]}, "vision_chat"),
               validate_record(chat({"type": "image", "path": square}, {"type": "text", "text": "Hm?"}),
                               "vision_chat"),
               validate_record({"messages": [{"role": "user", "content": "no image here"},
                                             {"role": "assistant", "content": "ok"}]}, "vision_chat")]
    batch = collator(records)
    length = batch["input_ids"].shape[1]
    assert batch["pixel_values"].shape == (3, 2, 4, 3, 32, 32)
    assert batch["aspect_ratio_ids"].tolist() == [[2, 1], [1, 0], [0, 0]]
    assert batch["aspect_ratio_mask"][0].tolist() == [[1, 1, 0, 0], [1, 0, 0, 0]]
    assert batch["cross_attention_mask"].shape == (3, length, 2, 4)
    assert batch["cross_attention_mask"][2].sum() == 0
    assert batch["pixel_values"][1, 1].abs().sum() == 0 and batch["pixel_values"][1, 0].abs().sum() > 0
    assert batch["labels"].shape == batch["input_ids"].shape == batch["attention_mask"].shape


def test_preference_batches_line_up(tokenizer, tmp_path):
    path = str(png(tmp_path / "a.png"))
    record = validate_record({"prompt": [{"role": "user", "content": [
        {"type": "image", "path": path}, {"type": "text", "text": "Colour?"}]}],
        "chosen": "red", "rejected": "a lovely shade of blue"}, "vision_preference")
    out = VisionCollator(tokenizer, image_processor(32, 4), kind="vision_preference")([record])
    chosen, rejected = out["chosen"], out["rejected"]
    assert {k: v.shape for k, v in chosen.items()} == {k: v.shape for k, v in rejected.items()}
    assert torch.equal(chosen["pixel_values"], rejected["pixel_values"])
    assert tokenizer.decode(chosen["input_ids"][0][chosen["labels"][0] != -100]) == "red<|eot_id|>"
    assert tokenizer.decode(rejected["input_ids"][0][rejected["labels"][0] != -100]) == (
        "a lovely shade of blue<|eot_id|>")


def test_image_text_pair_trains_on_the_caption(tokenizer, tmp_path):
    record = validate_record({"image": str(png(tmp_path / "a.png")), "text": "a red square"},
                             "image_text")
    assert [p["type"] for p in record["content"]] == ["image", "text"]  # image goes first
    batch = VisionCollator(tokenizer, image_processor(32, 4), kind="image_text")([record])
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    assert tokenizer.convert_ids_to_tokens(ids[:2].tolist()) == ["<|begin_of_text|>", "<|image|>"]
    assert tokenizer.decode(ids[labels != -100]) == "a red square<|end_of_text|>"


def test_prompt_batch_is_left_padded_for_generation(tokenizer, tmp_path):
    path = str(png(tmp_path / "a.png"))
    records = [validate_record({"prompt": [{"role": "user", "content": [{"type": "image", "path": path},
                                                                         {"type": "text", "text": t}]}]},
                               "vision_prompt") for t in ("Hi", "What colour is the shape here?")]
    batch = VisionCollator(tokenizer, image_processor(32, 4), kind="vision_prompt")(records)
    assert batch["attention_mask"][0, 0] == 0 and batch["attention_mask"][:, -1].tolist() == [1, 1]
    assert tokenizer.decode(batch["input_ids"][0, -5:]).endswith("assistant<|end_header_id|>\n\n")


def test_same_tensors_as_transformers_mllama_processor(tokenizer, tmp_path):
    """Two images (2 tiles and 1 tile) in one text: our batch equals MllamaProcessor's on the
    same token ids, key by key."""
    from transformers.models.mllama.processing_mllama import MllamaProcessor

    wide, square = png(tmp_path / "w.png", (64, 32)), png(tmp_path / "s.png", colour=(0, 90, 0))
    record = validate_record({"images": [str(wide), str(square)],
                              "text": "a <|image|> red <|image|> square"}, "image_text")
    processor = image_processor(32, 4)
    ours = VisionCollator(tokenizer, processor, kind="image_text")([record])
    text = tokenizer.decode(ours["input_ids"][0])
    theirs = MllamaProcessor(image_processor=processor, tokenizer=tokenizer)(
        text=[text], images=[[Image.open(wide), Image.open(square)]], add_special_tokens=False,
        return_tensors="pt")
    for key in ("input_ids", "attention_mask", "pixel_values", "aspect_ratio_ids",
                "aspect_ratio_mask", "cross_attention_mask"):
        assert torch.equal(ours[key], theirs[key]), key


def test_batches_run_through_hf_mllama(tokenizer, collator, tmp_path):
    from transformers import MllamaConfig, MllamaForConditionalGeneration

    torch.manual_seed(0)
    config = MllamaConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_global_layers=1, attention_heads=2, image_size=32, patch_size=8, vision_output_dim=64,
                           intermediate_layers_indices=[0], max_num_tiles=4),
        text_config=dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                         cross_attention_layers=[1, 3], pad_token_id=tokenizer.pad_token_id),
        image_token_index=image_token_id(tokenizer))
    records = [validate_record(r, "vision_chat")
               for r in shapes.records("train", 3, 0, image_dir=tmp_path)]
    out = MllamaForConditionalGeneration(config)(**collator(records))
    out.loss.backward()
    assert torch.isfinite(out.loss)


# ---- contracts and errors ------------------------------------------------------------------------

def test_paths_are_relative_to_the_data_file_and_normalising_is_idempotent(tmp_path):
    png(tmp_path / "data" / "img" / "1.png")
    path = jsonl(tmp_path / "data" / "train.jsonl",
                 chat({"type": "image", "path": "img/1.png"}, {"type": "text", "text": "Q"}))
    record = read_records(path, "vision_chat").records[0]
    assert record["messages"][0]["content"][0] == {"type": "image",
                                                   "path": str(tmp_path / "data" / "img" / "1.png")}
    assert record["messages"][1]["content"] == [{"type": "text", "text": "red"}]
    assert validate_record(record, "vision_chat") == record


def test_trl_layout_and_markers_take_images_in_order(tmp_path):
    a, b = png(tmp_path / "a.png"), png(tmp_path / "b.png")
    record = validate_record({"messages": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "and <|image|>?"}]},
        {"role": "assistant", "content": "x"}], "images": [str(a), str(b)]}, "vision_chat")
    assert record["messages"][0]["content"] == [
        {"type": "image", "path": str(a)}, {"type": "text", "text": "and "},
        {"type": "image", "path": str(b)}, {"type": "text", "text": "?"}]


def test_missing_image(tmp_path):
    path = jsonl(tmp_path / "d.jsonl", chat({"type": "text", "text": "ok"}),
                 chat({"type": "image", "path": "img/none.png"}))
    assert raised(path) == (f"{path}:2: messages.0.content.0.path: image not found: "
                            f"{tmp_path / 'img' / 'none.png'}")


def test_unreadable_image(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not a png at all")
    path = jsonl(tmp_path / "d.jsonl", chat({"type": "image", "path": "bad.png"}))
    assert raised(path).startswith(f"{path}:1: messages.0.content.0.path: not a readable image: "
                                   f"{tmp_path / 'bad.png'} (UnidentifiedImageError")


@pytest.mark.parametrize("size, reason", [
    ((4, 32), "too small (4x32 px; at least 8 px a side)"),
    ((800, 16), "too thin (800x16 px; aspect ratio at most 20:1)"),
])
def test_wrong_sizes(tmp_path, size, reason):
    png(tmp_path / "x.png", size)
    path = jsonl(tmp_path / "d.jsonl", {"image": "x.png", "text": "caption"})
    assert raised(path, "image_text") == f"{path}:1: image: image {tmp_path / 'x.png'}: {reason}"


def test_sixteen_bit_images_are_refused_and_8_bit_modes_converted(tmp_path):
    Image.fromarray(np.full((16, 16), 40000, np.uint16)).save(tmp_path / "deep.png")
    path = jsonl(tmp_path / "d.jsonl", {"images": ["deep.png"], "text": "<|image|> caption"})
    assert raised(path, "image_text") == (
        f"{path}:1: images.0: image {tmp_path / 'deep.png'}: 'I;16' pixels (16/32-bit) cannot be "
        "read as RGB: save it as an 8-bit RGB or greyscale image")
    for mode in ("L", "P", "CMYK", "LA"):
        image = load_image(png(tmp_path / f"{mode}.{'jpg' if mode == 'CMYK' else 'png'}", mode=mode))
        assert image.mode == "RGB" and image.size == (32, 32)
    Image.new("RGBA", (16, 16), (255, 0, 0, 0)).save(tmp_path / "clear.png")
    assert load_image(tmp_path / "clear.png").getpixel((3, 3)) == (255, 255, 255)  # over white
    with pytest.raises(ImageError, match="image not found"):
        load_image(tmp_path / "gone.png")


def test_more_images_than_placeholders(tmp_path):
    png(tmp_path / "a.png"), png(tmp_path / "b.png")
    path = jsonl(tmp_path / "d.jsonl", {"messages": [{"role": "user", "content": "<|image|> what?"},
                                                     {"role": "assistant", "content": "x"}],
                                        "images": ["a.png", "b.png"]})
    assert raised(path) == (f"{path}:1: images: 2 images given but the record has 1 placeholder(s) "
                            'for them ({"type": "image"} parts without a path, or <|image|> markers '
                            "in the text)")


def test_more_placeholders_than_images(tmp_path):
    png(tmp_path / "a.png")
    path = jsonl(tmp_path / "d.jsonl", {"messages": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "vs <|image|>"}]},
        {"role": "assistant", "content": "x"}], "images": ["a.png"]})
    assert raised(path) == (f"{path}:1: messages.0.content.1.text: image placeholder #2 has no "
                            "image: 'images' lists 1 (one path per {\"type\": \"image\"} part or "
                            "<|image|> marker)")


def test_images_only_in_user_turns(tmp_path):
    png(tmp_path / "a.png")
    record = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": [
        {"type": "image", "path": "a.png"}]}]}
    path = jsonl(tmp_path / "d.jsonl", record)
    assert raised(path) == (f"{path}:1: messages.1.content: only user turns may hold images, "
                            "not assistant turns")


def test_bad_records_are_skipped_and_counted(tmp_path):
    png(tmp_path / "a.png")
    path = jsonl(tmp_path / "d.jsonl", chat({"type": "image", "path": "a.png"}),
                 chat({"type": "image", "path": "b.png"}), chat({"type": "picture"}))
    result = read_records(path, "vision_chat", on_error="skip")
    assert len(result.records) == 1 and result.skipped == 2
    assert result.reasons[1] == (f"{path}:3: messages.0.content.0: expected "
                                 '{"type": "text", "text": ...} or {"type": "image", "path": ...}')


def test_truncation_that_cuts_an_image_token_names_the_record(tokenizer, tmp_path):
    a, b = str(png(tmp_path / "a.png")), str(png(tmp_path / "b.png"))
    record = validate_record({"id": "r7", "messages": [
        {"role": "user", "content": "first <|image|> then a long question about it <|image|>"},
        {"role": "assistant", "content": "x"}], "images": [a, b]}, "vision_chat")
    encoder = VisionEncoder(tokenizer, None, max_length=12)
    with pytest.raises(DataError) as info:
        encoder.chat(record)
    assert str(info.value) == ("record 'r7': 2 image(s) but 1 <|image|> token(s) in the tokenized "
                               "text after truncation to max_length=12 (raise max_length or put the "
                               "image earlier)")


def test_image_broken_after_reading_names_record_and_field(tokenizer, collator, tmp_path):
    path = png(tmp_path / "a.png")
    record = validate_record({"id": "r1", **chat({"type": "text", "text": "see"},
                                                 {"type": "image", "path": str(path)})}, "vision_chat")
    pair = validate_record({"prompt_id": "p1", "prompt": record["messages"][:1], "chosen": "a",
                            "rejected": "b"}, "vision_preference")
    path.unlink()
    with pytest.raises(DataError, match=r"^record 'r1': messages\.0\.content\.1\.path: image not found"):
        collator([record])
    with pytest.raises(DataError, match=r"^record 'p1': prompt\.0\.content\.1\.path: image not found"):
        VisionCollator(tokenizer, image_processor(32, 4), kind="vision_preference")([pair])


def test_truncated_image_passes_the_header_check_and_fails_when_decoded(tokenizer, collator, tmp_path):
    """Reading checks the header only (cheap); a file cut short fails when the batch decodes it."""
    Image.effect_noise((64, 64), 50).convert("RGB").save(tmp_path / "full.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "full.png").read_bytes()[:200])
    path = jsonl(tmp_path / "d.jsonl", {"id": "c1", **chat({"type": "image", "path": "cut.png"})})
    record = read_records(path, "vision_chat").records[0]
    with pytest.raises(DataError) as info:
        collator([record])
    assert str(info.value).startswith(f"record 'c1': messages.0.content.0.path: cannot decode image "
                                      f"{tmp_path / 'cut.png'}: ")


def test_tokenizer_without_the_image_token():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(ValueError, match=r"has no <\|image\|> token .*add_special_tokens"):
        image_token_id(PreTrainedTokenizerFast(tokenizer_object=raw))


def test_vision_kinds_go_through_the_shared_contracts():
    with pytest.raises(FieldError, match="missing"):
        validate_record({"prompt": "x"}, "vision_preference")


# ---- the shapes demo -----------------------------------------------------------------------------

def test_shapes_records_are_deterministic(tmp_path):
    one = shapes.records("train", 20, 3, image_dir=tmp_path / "a")
    two = shapes.records("train", 20, 3, image_dir=tmp_path / "b")
    strip = lambda rs: [json.dumps(r["messages"][1:]) + r["id"] for r in rs]  # noqa: E731
    assert strip(one) == strip(two)
    for r1, r2 in zip(one, two):
        p1, p2 = r1["messages"][0]["content"][0]["path"], r2["messages"][0]["content"][0]["path"]
        assert open(p1, "rb").read() == open(p2, "rb").read()
    assert strip(shapes.records("train", 20, 4, image_dir=tmp_path / "a")) != strip(one)


def test_shapes_splits_are_disjoint(tmp_path):
    spec = lambda r: json.dumps(r["metadata"]["spec"], sort_keys=True)  # noqa: E731
    train = {spec(r) for r in shapes.records("train", 600, 0, image_dir=tmp_path)}
    heldout = {spec(r) for r in shapes.records("heldout", 150, 1, image_dir=tmp_path)}
    assert train and heldout and not train & heldout
    assert all(shapes.split_of(json.loads(s)) == "heldout" for s in heldout)


def test_shapes_answers_match_the_picture(tmp_path):
    for record in shapes.records("heldout", 30, 0, kind="prompt", image_dir=tmp_path):
        spec, task = record["metadata"]["spec"], record["metadata"]["task"]
        image = load_image(record["prompt"][0]["content"][0]["path"])
        centre = image.getpixel((round(spec["cx"]), round(spec["cy"])))
        assert centre == shapes.COLOURS[spec["colour"]]
        if task == "colour":
            assert record["answer"] == spec["colour"]
        elif task == "side":
            assert record["answer"] == ("left" if spec["cx"] < 16 else "right")


def test_shapes_check():
    assert shapes.check("Red.", "red") and shapes.check("  left\n", "left")
    assert not shapes.check("red circle", "red") and not shapes.check("", "red")
    assert shapes.accuracy(["red", "blue", "circle"], ["red", "red", "circle"]) == pytest.approx(2 / 3)


def test_shapes_preference_and_builtin_source(tmp_path, monkeypatch):
    pairs = [validate_record(r, "vision_preference")
             for r in shapes.records("train", 10, 0, kind="preference", image_dir=tmp_path)]
    answer = lambda side: side[0]["content"][0]["text"]  # noqa: E731
    assert all(not shapes.check(answer(p["rejected"]), answer(p["chosen"])) for p in pairs)
    monkeypatch.setenv("ALIGNLOOP_CACHE", str(tmp_path))
    loaded = load_sources([SourceConfig(builtin="shapes", count=7)], "vision_chat", seed=1)
    assert len(loaded.records) == 7 and loaded.report[0]["skipped"] == 0


def test_shapes_dataset_files_read_back(tmp_path, collator):
    path = shapes.write_dataset(tmp_path / "demo", "heldout", 5, 0)
    first = json.loads(path.read_text().splitlines()[0])
    assert first["messages"][0]["content"][0]["path"].startswith("img/")
    records = read_records(path, "vision_chat").records
    assert len(records) == 5
    assert collator(records)["pixel_values"].shape == (5, 1, 4, 3, 32, 32)
