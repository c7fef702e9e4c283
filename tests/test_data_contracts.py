"""Row contracts: normalised forms of the four record kinds, the errors for bad records, and
ranking <-> preference conversion."""

import pytest

from alignloop.data.contracts import (
    preference_to_ranking,
    ranking_to_pairs,
    stable_id,
    validate_record,
)
from alignloop.data.errors import DataError, FieldError

USER = {"role": "user", "content": "What is 2 + 2?"}
ASSISTANT = {"role": "assistant", "content": "4"}


def field_error(obj, kind) -> FieldError:
    with pytest.raises(FieldError) as info:
        validate_record(obj, kind)
    return info.value


# ---- DataError formatting ----------------------------------------------------------------------

def test_data_error_formats_file_line_field_reason():
    err = DataError("unknown role 'bot'", file="data/train.jsonl", line=12, field="messages.1.role")
    assert str(err) == "data/train.jsonl:12: messages.1.role: unknown role 'bot'"
    assert (err.file, err.line, err.field, err.reason) == (
        "data/train.jsonl", 12, "messages.1.role", "unknown role 'bot'")
    assert isinstance(err, ValueError)


def test_data_error_rows_and_missing_parts():
    assert str(DataError("bad", file="x.parquet", line=7, field="chosen")) == "x.parquet: row 7: chosen: bad"
    assert str(DataError("bad", file="hub:a/b[train]", line=3)) == "hub:a/b[train]: row 3: bad"
    assert str(DataError("no such file", file="x.jsonl")) == "x.jsonl: no such file"
    assert str(DataError("bad", field="prompt")) == "prompt: bad"
    assert str(DataError("bad", file="x.jsonl", line=2, unit="row")) == "x.jsonl: row 2: bad"


# ---- chat ----------------------------------------------------------------------------------------

def test_chat_is_normalised_with_a_stable_id():
    rec = validate_record({"messages": [USER, {**ASSISTANT, "extra": 1}], "other": 3}, "chat")
    assert rec == {"id": stable_id([USER, ASSISTANT]), "messages": [USER, ASSISTANT]}
    assert len(rec["id"]) == 16
    assert validate_record(rec, "chat") == rec  # normalising twice changes nothing
    assert validate_record({"id": 7, "messages": [USER, ASSISTANT]}, "chat")["id"] == "7"


def test_chat_keeps_system_first_and_metadata():
    system = {"role": "system", "content": "Be brief."}
    rec = validate_record({"messages": [system, USER, ASSISTANT], "metadata": {"src": "x"}}, "chat")
    assert rec["messages"][0] == system and rec["metadata"] == {"src": "x"}


@pytest.mark.parametrize("messages, field, reason", [
    ([USER, {"role": "bot", "content": "x"}], "messages.1.role",
     "unknown role 'bot' (expected system, user or assistant)"),
    ([USER, {"role": "assistant", "content": "  "}], "messages.1.content", "empty assistant turn"),
    ([USER, {"role": "assistant", "content": 4}], "messages.1.content",
     "expected a string, got a number (4)"),
    ([USER, {"content": "x"}], "messages.1.role",
     "missing (each message needs 'role' and 'content')"),
    ([USER, "hello"], "messages.1", 'expected a message {"role": ..., "content": ...}, got a string'),
    ([USER], "messages", "no assistant turn (a chat record needs at least one)"),
    ([USER, ASSISTANT, USER], "messages.2.role", "a chat must end with an assistant turn, got 'user'"),
    ([USER, {"role": "system", "content": "x"}, ASSISTANT], "messages.1.role",
     "a system message may only come first"),
    ([], "messages", "empty list of messages"),
    ("hi", "messages", "expected a list of messages, got a string"),
])
def test_bad_chat_names_field_and_reason(messages, field, reason):
    err = field_error({"messages": messages}, "chat")
    assert (err.field, err.reason) == (field, reason)


def test_missing_field_and_non_object_record():
    err = field_error({"conversation": []}, "chat")
    assert err.field == "messages" and err.reason.startswith("missing (a chat record looks like")
    err = field_error([USER, ASSISTANT], "chat")
    assert err.field is None and err.reason == "expected a JSON object (one record), got a list"


def test_unknown_kind_is_a_value_error():
    with pytest.raises(ValueError, match="unknown record kind 'sft'"):
        validate_record({}, "sft")


# ---- prompt --------------------------------------------------------------------------------------

def test_prompt_variants_normalise_to_messages():
    text = validate_record({"prompt": USER["content"], "answer": 4, "metadata": {"a": 1}}, "prompt")
    assert text == {"prompt_id": stable_id([USER]), "prompt": [USER], "answer": 4,
                    "metadata": {"a": 1}}
    assert validate_record({"prompt": [USER]}, "prompt")["prompt_id"] == text["prompt_id"]
    assert validate_record({"messages": [USER], "prompt_id": "p1"}, "prompt") == {
        "prompt_id": "p1", "prompt": [USER]}


def test_prompt_must_end_with_user_turn():
    err = field_error({"prompt": [USER, ASSISTANT]}, "prompt")
    assert (err.field, err.reason) == ("prompt.1.role", "a prompt must end with a user turn, got 'assistant'")
    err = field_error({"prompt": 3}, "prompt")
    assert (err.field, err.reason) == ("prompt", "expected a string or a list of messages, got a number (3)")
    assert field_error({"prompt": " "}, "prompt").reason == "empty prompt"


# ---- preference ----------------------------------------------------------------------------------

def test_preference_strings_and_lists_normalise_alike():
    rec = validate_record({"prompt": "Q?", "chosen": "good", "rejected": "bad"}, "preference")
    assert rec == {"prompt_id": stable_id([{"role": "user", "content": "Q?"}]),
                   "prompt": [{"role": "user", "content": "Q?"}],
                   "chosen": [{"role": "assistant", "content": "good"}],
                   "rejected": [{"role": "assistant", "content": "bad"}]}
    as_lists = {"prompt": rec["prompt"], "chosen": rec["chosen"], "rejected": rec["rejected"]}
    assert validate_record(as_lists, "preference") == rec


@pytest.mark.parametrize("record, field, reason", [
    ({"prompt": "Q", "chosen": "same", "rejected": "same"}, "rejected", "identical to chosen"),
    ({"prompt": "Q", "chosen": "", "rejected": "x"}, "chosen", "empty assistant turn"),
    ({"prompt": "Q", "chosen": 1.5, "rejected": "x"}, "chosen",
     "expected a string or a list of assistant messages, got a number (1.5)"),
    ({"prompt": "Q", "chosen": [USER], "rejected": "x"}, "chosen.0.role",
     "expected an assistant message (the prompt goes in 'prompt'), got 'user'"),
])
def test_bad_preference(record, field, reason):
    err = field_error(record, "preference")
    assert (err.field, err.reason) == (field, reason)


def test_preference_missing_field_shows_the_shape():
    err = field_error({"prompt": "Q", "chosen": "a"}, "preference")
    assert err.field == "rejected"
    assert err.reason == 'missing (a preference record looks like {"prompt": ..., "chosen": ..., "rejected": ...})'


# ---- ranking -------------------------------------------------------------------------------------

def test_ranking_from_edited_chosen_rejected_expands_to_three_ordered_pairs():
    rec = validate_record({"prompt": "Q", "edited": "best", "chosen": "good", "rejected": "bad"},
                          "ranking")
    assert [r[0]["content"] for r in rec["responses"]] == ["best", "good", "bad"]
    pairs = ranking_to_pairs(rec)
    assert [(p["chosen"][0]["content"], p["rejected"][0]["content"], p["rank_pair"]) for p in pairs] == [
        ("best", "good", [0, 1]), ("best", "bad", [0, 2]), ("good", "bad", [1, 2])]
    assert {p["prompt_id"] for p in pairs} == {rec["prompt_id"]}
    for pair in pairs:  # every pair is itself a valid preference record
        assert validate_record(pair, "preference")["chosen"] == pair["chosen"]


def test_ranking_responses_list_and_errors():
    rec = validate_record({"prompt": "Q", "responses": ["a", "b", "c", "d"]}, "ranking")
    assert len(ranking_to_pairs(rec)) == 6
    err = field_error({"prompt": "Q", "responses": ["a", "b", "a"]}, "ranking")
    assert (err.field, err.reason) == ("responses.2", "identical to responses.0")
    err = field_error({"prompt": "Q", "responses": ["a"]}, "ranking")
    assert (err.field, err.reason) == ("responses", "a ranking needs at least 2 responses, got 1")
    err = field_error({"prompt": "Q", "chosen": "a", "rejected": "a"}, "ranking")
    assert (err.field, err.reason) == ("rejected", "identical to chosen")
    assert field_error({"prompt": "Q"}, "ranking").field == "responses"


def test_preference_to_ranking_round_trip():
    pref = validate_record({"prompt": "Q", "chosen": "good", "rejected": "bad",
                            "metadata": {"m": 1}}, "preference")
    ranking = preference_to_ranking(pref)
    assert ranking["responses"] == [pref["chosen"], pref["rejected"]]
    [pair] = ranking_to_pairs(ranking)
    assert pair == {**pref, "rank_pair": [0, 1]}
