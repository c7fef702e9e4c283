"""Assistant-only loss masks: equal to the expected token spans, never silently empty or full."""

import re

import pytest

from alignloop.data.masks import IGNORE_INDEX, MaskError, assistant_mask, build_sft_dataset, tokenize_chat
from alignloop.data.templates import has_generation_markers, llama3_template, select_template

CONVERSATION = [
    {"role": "system", "content": "You add numbers."},
    {"role": "user", "content": "What is 12 plus 30?"},
    {"role": "assistant", "content": "12 plus 30 is 42."},
    {"role": "user", "content": "And 5 minus 3?"},
    {"role": "assistant", "content": "  5 minus 3 is 2.  "},  # the template trims content
]


def expected_ids_and_mask(tok, messages):
    """The Llama 3 format built piece by piece (reference section E): each piece is tokenized on
    its own and marked 1 only when it is an assistant turn's content plus its <|eot_id|>."""
    ids, mask = [tok.convert_tokens_to_ids("<|begin_of_text|>")], [0]
    for m in messages:
        header = tok.encode(f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n", add_special_tokens=False)
        body = tok.encode(m["content"].strip() + "<|eot_id|>", add_special_tokens=False)
        ids += header + body
        mask += [0] * len(header) + [int(m["role"] == "assistant")] * len(body)
    return ids, mask


def test_llama3_template_mask_equals_assistant_spans(tokenizer):
    assert has_generation_markers(tokenizer.chat_template)
    ids, mask = assistant_mask(tokenizer, CONVERSATION)
    want_ids, want_mask = expected_ids_and_mask(tokenizer, CONVERSATION)
    assert ids == want_ids
    assert mask == want_mask
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    masked = [t for t, m in zip(ids, mask) if m]
    assert masked.count(eot) == 2 and tokenizer.decode(masked) == "12 plus 30 is 42.<|eot_id|>5 minus 3 is 2.<|eot_id|>"


def test_labels_follow_the_mask(tokenizer):
    row = tokenize_chat(tokenizer, CONVERSATION, max_length=None)
    _, mask = expected_ids_and_mask(tokenizer, CONVERSATION)
    assert row["labels"] == [t if m else IGNORE_INDEX for t, m in zip(row["input_ids"], mask)]


def test_template_without_markers_gives_the_same_mask(tokenizer):
    """Stripping {% generation %} from our template must not change the mask: the prefix method
    finds the same spans the markers do."""
    plain = re.sub(r"\{%-?\s*(end)?generation\s*-?%\}", "", llama3_template())
    assert not has_generation_markers(plain)
    want = assistant_mask(tokenizer, CONVERSATION)
    tokenizer.chat_template = plain
    assert assistant_mask(tokenizer, CONVERSATION) == want


def test_chatml_template_without_markers(tokenizer):
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    messages = CONVERSATION[1:3]
    ids, mask = assistant_mask(tokenizer, messages)
    assert tokenizer.decode([t for t, m in zip(ids, mask) if m]) == "12 plus 30 is 42.<|im_end|>\n"


def test_template_that_breaks_prefixes_is_a_clear_error(tokenizer):
    # renders the number of messages up front, so a prefix is not a prefix of the whole
    tokenizer.chat_template = ("{{ messages|length }} turns\n{% for m in messages %}{{ m['role'] }}: "
                               "{{ m['content'] }}\n{% endfor %}")
    with pytest.raises(MaskError, match=r"no \{% generation %\} markers and does not render"):
        assistant_mask(tokenizer, CONVERSATION[1:3])


def test_template_marking_everything_is_an_error(tokenizer):
    tokenizer.chat_template = ("{% generation %}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n"
                               "{% endfor %}{% endgeneration %}")
    with pytest.raises(MaskError, match="record 'r1': the chat template marks every token"):
        tokenize_chat(tokenizer, CONVERSATION[1:3], None, record_id="r1")


def test_truncation_that_leaves_no_assistant_token(tokenizer):
    long_prompt = [{"role": "user", "content": "word " * 60}, {"role": "assistant", "content": "ok"}]
    with pytest.raises(MaskError, match=r"record 'long': no assistant token is left after "
                                        r"truncation to max_length=16 \(the example has \d+ tokens\)"):
        tokenize_chat(tokenizer, long_prompt, 16, record_id="long")


def test_empty_mask_skip_is_counted(tokenizer):
    records = [{"id": "short", "messages": CONVERSATION[1:3]},
               {"id": "long", "messages": [{"role": "user", "content": "word " * 60},
                                           {"role": "assistant", "content": "ok"}]}]
    with pytest.raises(MaskError, match="record 'long'"):
        build_sft_dataset(records, tokenizer, 32, empty_mask="error")
    dataset, stats = build_sft_dataset(records, tokenizer, 32, empty_mask="skip")
    assert len(dataset) == 1 and stats.examples == 1 and stats.skipped_empty == 1
    assert "record 'long'" in stats.skipped_reasons[0]
    assert stats.assistant_tokens == sum(label != IGNORE_INDEX for label in dataset[0]["labels"])


def test_partial_truncation_keeps_what_survives(tokenizer):
    full = tokenize_chat(tokenizer, CONVERSATION, None)
    first = next(i for i, label in enumerate(full["labels"]) if label != IGNORE_INDEX)
    cut = tokenize_chat(tokenizer, CONVERSATION, first + 3)
    assert cut["input_ids"] == full["input_ids"][:first + 3] and cut["labels"] == full["labels"][:first + 3]
    assert sum(label != IGNORE_INDEX for label in cut["labels"]) == 3


def test_select_template(tokenizer, tmp_path):
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="the tokenizer has no chat template"):
        select_template(tokenizer, "auto")
    assert select_template(tokenizer, "llama3") == llama3_template()
    path = tmp_path / "t.jinja"
    path.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    assert select_template(tokenizer, str(path)) == path.read_text()
    with pytest.raises(ValueError, match="no such file"):
        select_template(tokenizer, str(tmp_path / "missing.jinja"))
