"""Packing without cross-talk, long examples split into windows, and the recipe checks for both.

Packed logits are compared with each document run alone: the same maths on the same tokens, in
a longer matrix, so they agree to fp32 rounding (measured 2e-7; asserted 1e-5). A control run
with positions that do not restart shows the comparison would see cross-document attention.
"""

import pytest
import torch

from alignloop.config import RecipeError, load_recipe
from alignloop.data.masks import IGNORE_INDEX, build_sft_dataset
from alignloop.data.splitting import split_dataset, split_example

LENGTHS = (13, 29, 6)  # three documents of odd lengths in one packed row


def documents(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 1000, (n,), generator=g).tolist() for n in LENGTHS]


def packed_batch(docs):
    """TRL's own padding-free collator: one row, position_ids restarting at 0 per document."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    collate = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)
    return collate([{"input_ids": d, "labels": d} for d in docs])


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_logits_equal_each_document_alone(tiny_dir, attn):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir, attn_implementation=attn).eval()
    docs = documents()
    batch = packed_batch(docs)
    assert "attention_mask" not in batch
    assert batch["position_ids"][0].tolist() == [i for n in LENGTHS for i in range(n)]
    with torch.no_grad():
        # use_cache=False as in training: with a KV cache transformers does not look for documents
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                       use_cache=False).logits[0]
        alone = torch.cat([model(input_ids=torch.tensor([d]), use_cache=False).logits[0] for d in docs])
        # control: positions that run on across documents let them attend to each other
        talk = model(input_ids=batch["input_ids"], use_cache=False).logits[0]
    assert (packed - alone).abs().max().item() < 1e-5
    assert (talk - alone)[LENGTHS[0]:].abs().max().item() > 1e-3


def test_packed_fused_log_probs_equal_each_document_alone(tiny_dir):
    """Through our fused head (TRL's fused-LM-head call): per-token log-probs of a packed row
    equal those of the documents alone, and no document's first token is scored from the end
    of the previous one (the collator drops that label)."""
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    from alignloop.kernels import fused_head

    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
    fused_head.install(model)
    docs = documents(1)
    batch = packed_batch(docs)
    with torch.no_grad():
        packed = model(**batch, fused_lm_head=True)
        alone = [model(input_ids=torch.tensor([d]), labels=torch.tensor([d]), fused_lm_head=True)
                 for d in docs]
    starts = [sum(LENGTHS[:i]) for i in range(len(LENGTHS))]
    for start, n, out in zip(starts, LENGTHS, alone):
        got = packed.log_probs[0, start:start + n - 1]
        assert (got - out.log_probs[0]).abs().max().item() < 1e-5
        if start:  # the label of a document's first token (predicted from the previous one)
            assert packed.label_mask[0, start - 1].item() is False
    assert packed.label_mask.sum().item() == sum(n - 1 for n in LENGTHS)


# ---- recipe checks --------------------------------------------------------------------------

def sft_recipe(**sft):
    return {"sft": {"data": [{"builtin": "arithmetic", "count": 8}], **sft}}


def test_flex_attention_with_packing_is_rejected():
    spec = sft_recipe(packing=True)
    spec["model"] = {"attn_implementation": "flex_attention"}
    with pytest.raises(RecipeError, match=r"sft.packing: packed / padding-free batches .*flex_attention"):
        load_recipe(spec, check_trainer=False)
    spec["sft"] = sft_recipe(padding_free=True)["sft"]
    with pytest.raises(RecipeError, match=r"sft.padding_free: .*flex_attention"):
        load_recipe(spec, check_trainer=False)
    spec["model"]["attn_implementation"] = "sdpa"
    load_recipe(spec, check_trainer=False)


def test_dpo_padding_free_is_rejected_rather_than_ignored():
    with pytest.raises(RecipeError, match=r"dpo.padding_free: TRL 1.16's DPOTrainer has no padding-free"):
        load_recipe({**sft_recipe(), "dpo": {"padding_free": True}}, check_trainer=False)


def test_dpo_fused_loss_with_wpo_weighting_is_rejected():
    with pytest.raises(RecipeError, match=r"dpo.fused_loss: the fused loss does not compute what WPO"):
        load_recipe({**sft_recipe(), "dpo": {"fused_loss": True, "use_weighting": True}}, check_trainer=False)


def test_split_overlap_must_leave_the_windows_moving():
    with pytest.raises(RecipeError, match=r"sft.split_overlap: must be smaller than max_length \(64\)"):
        load_recipe(sft_recipe(long_examples="split", split_overlap=64, max_length=64), check_trainer=False)
    cfg = load_recipe(sft_recipe(long_examples="split", split_overlap=16, max_length=64), check_trainer=False)
    assert cfg.sft.long_examples == "split" and "long_examples" not in cfg.sft.trainer_options


# ---- splitting ------------------------------------------------------------------------------

def test_split_boundaries_by_hand():
    """10 tokens, windows of 4, overlap 1: stride 3, windows start at 0, 3, 6 and the last ends
    at 10; the first token of windows 2 and 3 is context (trained at the end of the window
    before). Overlap 0: [0, 4), [4, 8), [8, 10), nothing masked."""
    ids = list(range(10))
    windows = split_example(ids, ids, max_length=4, overlap=1)
    assert [w["input_ids"] for w in windows] == [[0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9]]
    assert [w["labels"] for w in windows] == [[0, 1, 2, 3], [-100, 4, 5, 6], [-100, 7, 8, 9]]
    windows = split_example(ids, ids, max_length=4, overlap=0)
    assert [w["input_ids"] for w in windows] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert split_example(ids[:4], ids[:4], max_length=4, overlap=2) == [{"input_ids": ids[:4], "labels": ids[:4]}]
    with pytest.raises(ValueError, match="split_overlap"):
        split_example(ids, ids, max_length=4, overlap=4)


@pytest.mark.parametrize("n,max_length,overlap", [(1, 4, 0), (97, 16, 5), (100, 10, 1), (33, 33, 7), (64, 7, 6)])
def test_every_label_is_trained_exactly_once(n, max_length, overlap):
    """A label at window index >= 1 is predicted (index 0 has nothing before it). With overlap
    >= 1 every position but the very first is trained exactly once; windows never exceed
    max_length and consecutive windows share exactly `overlap` tokens."""
    ids = list(range(n))
    windows = split_example(ids, ids, max_length, overlap)
    trained = [label for w in windows for label in w["labels"][1:] if label != IGNORE_INDEX]
    assert all(len(w["input_ids"]) <= max_length for w in windows)
    for a, b in zip(windows, windows[1:]):
        assert a["input_ids"][-overlap:] == b["input_ids"][:overlap] if overlap else a["input_ids"][-1] + 1 == b["input_ids"][0]
    expected = list(range(1, n)) if overlap else [i for i in range(1, n) if i % max_length]
    assert sorted(trained) == expected


def long_chat(tokenizer):
    """A long user document, a short answer, a short question and another answer."""
    document = " ".join(f"line {i} of the report says nothing new." for i in range(60))
    return [{"messages": [{"role": "user", "content": f"Summarise: {document}"},
                          {"role": "assistant", "content": "Nothing new in 60 lines."},
                          {"role": "user", "content": "And the first line?"},
                          {"role": "assistant", "content": "Line 0 says nothing new."}]}]


def test_assistant_masks_survive_splitting(tokenizer):
    """The windows' labels are the whole example's labels on the same span (minus the overlap);
    windows inside the user's document have no assistant token: skipped and counted, not kept
    with an all-ignored mask; the kept windows train every assistant token exactly once."""
    whole, _ = build_sft_dataset(long_chat(tokenizer), tokenizer, None)
    ids, labels = whole[0]["input_ids"], whole[0]["labels"]
    max_length, overlap = 48, 8
    assert len(ids) > 4 * max_length
    split, stats = split_dataset(whole, max_length, overlap)
    windows = split_example(ids, labels, max_length, overlap)
    assert stats.examples_split == 1 and stats.windows + stats.skipped_windows == len(windows)
    assert stats.skipped_windows >= 2 and stats.skipped_examples == [0]
    assert stats.windows == len(split) >= 1
    kept_labels = []
    for row in split:
        assert any(label != IGNORE_INDEX for label in row["labels"][1:])
        start = next(k * (max_length - overlap) for k in range(len(windows))
                     if windows[k]["input_ids"] == row["input_ids"])
        original = labels[start:start + len(row["labels"])]
        assert all(got in (want, IGNORE_INDEX) for got, want in zip(row["labels"], original))
        assert row["labels"][overlap:] == original[overlap:] or start == 0
        kept_labels += [label for label in row["labels"][1:] if label != IGNORE_INDEX]
    assert len(kept_labels) == sum(label != IGNORE_INDEX for label in labels)


def test_sft_dataset_truncates_or_splits_as_the_recipe_says(tokenizer):
    from alignloop.sft.stage import sft_dataset

    records = long_chat(tokenizer)
    n = len(build_sft_dataset(records, tokenizer, None)[0][0]["input_ids"])
    cfg = load_recipe(sft_recipe(max_length=n - 3), check_trainer=False)
    truncated, masks, split = sft_dataset(cfg, records, tokenizer, n - 3)
    assert split is None and len(truncated) == 1 and len(truncated[0]["input_ids"]) == n - 3
    assert masks.truncated == 1
    cfg = load_recipe(sft_recipe(long_examples="split", split_overlap=8, max_length=48), check_trainer=False)
    windows, masks, split = sft_dataset(cfg, records, tokenizer, 48)
    assert masks.truncated == 0 and split.examples_split == 1
    assert len(windows) == split.windows and all(len(row["input_ids"]) <= 48 for row in windows)
