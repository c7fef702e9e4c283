"""Readers (jsonl, json, parquet, directories, hub), atomic writes, mixing and source loading.

Every bad-record test checks the whole `file:line: field: reason` string a person would see."""

import json
import logging
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from alignloop.data import tasks
from alignloop.data.errors import DataError
from alignloop.data.mixing import mix, take, take_size
from alignloop.data.readers import read_hub, read_records, write_jsonl
from alignloop.data.source_config import SourceConfig
from alignloop.data.sources import format_report, load_sources

GOOD_CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
GOOD_PREF = {"prompt": "Q", "chosen": "good", "rejected": "bad"}


def jsonl(path, *lines) -> str:
    """Writes lines (dicts become JSON, str / bytes go in as they are); returns the path."""
    raw = b"".join((line if isinstance(line, bytes) else
                    (line if isinstance(line, str) else json.dumps(line)).encode()) + b"\n"
                   for line in lines)
    path.write_bytes(raw)
    return str(path)


def raised(path, kind) -> str:
    with pytest.raises(DataError) as info:
        read_records(path, kind)
    return str(info.value)


# ---- bad records in .jsonl: one test per kind of problem ---------------------------------------

def test_invalid_json_names_the_line(tmp_path):
    path = jsonl(tmp_path / "a.jsonl", GOOD_CHAT, "", '{"messages": [}')
    assert raised(path, "chat") == f"{path}:3: invalid JSON: Expecting value (column 15)"


def test_missing_field(tmp_path):
    path = jsonl(tmp_path / "a.jsonl", GOOD_PREF, {"prompt": "Q", "chosen": "x"})
    assert raised(path, "preference") == (
        f"{path}:2: rejected: missing (a preference record looks like "
        '{"prompt": ..., "chosen": ..., "rejected": ...})')


def test_unknown_role(tmp_path):
    path = jsonl(tmp_path / "a.jsonl", {"messages": [{"role": "user", "content": "hi"},
                                                     {"role": "bot", "content": "x"}]})
    assert raised(path, "chat") == (
        f"{path}:1: messages.1.role: unknown role 'bot' (expected system, user or assistant)")


def test_empty_assistant_turn(tmp_path):
    path = jsonl(tmp_path / "a.jsonl", GOOD_CHAT, {"messages": [{"role": "user", "content": "hi"},
                                                                {"role": "assistant", "content": ""}]})
    assert raised(path, "chat") == f"{path}:2: messages.1.content: empty assistant turn"


def test_non_utf8_bytes(tmp_path):
    path = jsonl(tmp_path / "a.jsonl", GOOD_CHAT, b'{"messages": "caf\xe9"}')  # 0xe9 is the 18th byte
    assert raised(path, "chat") == f"{path}:2: not valid UTF-8 (byte 0xe9 at column 18)"


def test_chosen_equal_to_rejected(tmp_path):
    path = jsonl(tmp_path / "a.jsonl", {"prompt": "Q", "chosen": "same", "rejected": "same"})
    assert raised(path, "preference") == f"{path}:1: rejected: identical to chosen"


def test_wrong_type(tmp_path):
    path = jsonl(tmp_path / "a.jsonl", {"messages": [{"role": "user", "content": 42},
                                                     {"role": "assistant", "content": "x"}]})
    assert raised(path, "chat") == f"{path}:1: messages.0.content: expected a string, got a number (42)"


def test_good_jsonl_with_bom_and_crlf(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD_CHAT).encode() + b"\r\n\r\n")
    assert read_records(path, "chat").records[0]["messages"] == GOOD_CHAT["messages"]


# ---- skip mode -----------------------------------------------------------------------------------

def test_skip_counts_and_keeps_five_sample_reasons(tmp_path):
    bad = [f'{{"broken": {i}' for i in range(7)]
    path = jsonl(tmp_path / "a.jsonl", GOOD_CHAT, *bad, b"\xff", GOOD_CHAT)
    result = read_records(path, "chat", on_error="skip")
    assert len(result.records) == 2 and result.skipped == 8
    assert len(result.reasons) == 5
    assert result.reasons[0] == f"{path}:2: invalid JSON: Expecting ',' delimiter (column 13)"


# ---- .json arrays --------------------------------------------------------------------------------

def test_json_array_elements_report_their_start_line(tmp_path):
    path = tmp_path / "a.json"
    path.write_text('[\n  {"messages": [{"role": "user", "content": "hi"},\n'
                    '                {"role": "assistant", "content": "yo"}]},\n\n'
                    '  {"messages": []}, {"x": 1},\n  {"messages": "no"}\n]\n')
    result = read_records(path, "chat", on_error="skip")
    assert len(result.records) == 1 and result.skipped == 3
    assert result.reasons == [f"{path}:5: messages: empty list of messages",
                              f"{path}:5: messages: missing (a chat record looks like "
                              '{"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}]})',
                              f"{path}:6: messages: expected a list of messages, got a string"]


def test_invalid_json_file_names_line_and_column(tmp_path):
    path = tmp_path / "a.json"
    path.write_text('[\n {"prompt": "a"},\n {"prompt": "b",}\n]')
    assert raised(path, "prompt") == (
        f"{path}:3: invalid JSON: Expecting property name enclosed in double quotes (column 17)")
    path.write_text('{"prompt": "a"}')
    assert raised(path, "prompt").startswith(f"{path}: expected a top-level JSON array of records")
    path.write_bytes(b'[\n {"prompt": "\xff"}]')
    assert raised(path, "prompt") == f"{path}:2: not valid UTF-8 (byte 0xff at column 14)"


def test_empty_json_array(tmp_path):
    path = tmp_path / "a.json"
    path.write_text(" [ ] ")
    assert read_records(path, "prompt").records == []


# ---- parquet, directories, files that cannot be read ----------------------------------------------

def test_parquet_reports_row_index(tmp_path):
    path = tmp_path / "p.parquet"
    rows = [GOOD_PREF, {"prompt": "Q", "chosen": "x", "rejected": "x"}]
    pq.write_table(pa.Table.from_pylist(rows), path)
    assert raised(path, "preference") == f"{path}: row 1: rejected: identical to chosen"
    result = read_records(path, "preference", on_error="skip")
    assert len(result.records) == 1 and result.skipped == 1


def test_parquet_nulls_count_as_absent(tmp_path):
    path = tmp_path / "r.parquet"
    rows = [{"prompt": "Q", "edited": None, "chosen": "a", "rejected": "b"},
            {"prompt": "Q", "edited": "c", "chosen": "a", "rejected": "b"}]
    pq.write_table(pa.Table.from_pylist(rows), path)
    assert [len(r["responses"]) for r in read_records(path, "ranking").records] == [2, 3]


def test_directory_reads_supported_files_recursively_in_order(tmp_path):
    jsonl(tmp_path / "b.jsonl", {"prompt": "b"})
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.json").write_text('[{"prompt": "a"}]')
    pq.write_table(pa.Table.from_pylist([{"prompt": "c"}]), tmp_path / "c.parquet")
    (tmp_path / "README.md").write_text("ignored")
    (tmp_path / ".cache").mkdir()
    jsonl(tmp_path / ".cache" / "z.jsonl", {"prompt": "hidden"})
    records = read_records(tmp_path, "prompt").records
    assert [r["prompt"][0]["content"] for r in records] == ["a", "b", "c"]


def test_files_that_cannot_be_read(tmp_path):
    (tmp_path / "empty").mkdir()
    assert raised(tmp_path / "empty", "chat") == (
        f"{tmp_path / 'empty'}: no .jsonl, .json or .parquet files in this directory")
    (tmp_path / "a.csv").write_text("x")
    assert raised(tmp_path / "a.csv", "chat") == (
        f"{tmp_path / 'a.csv'}: unsupported file type '.csv' (expected .jsonl, .json or .parquet)")
    assert raised(tmp_path / "nope.jsonl", "chat") == f"{tmp_path / 'nope.jsonl'}: no such file or directory"
    (tmp_path / "bad.parquet").write_text("not parquet")
    assert raised(tmp_path / "bad.parquet", "chat").startswith(
        f"{tmp_path / 'bad.parquet'}: not a readable parquet file")


# ---- hub -----------------------------------------------------------------------------------------

def test_hub_offline_is_a_clear_error(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'org/data' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError) as info:
        read_hub("org/data", "train", None, "chat")
    assert str(info.value).startswith(
        "hub:org/data[train]: could not load hub dataset 'org/data' (split 'train'): "
        "the machine is offline or the name, subset or split is wrong (ConnectionError: ")


def test_hub_rows_are_named_by_index(monkeypatch):
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", lambda name, subset, split: [GOOD_PREF, {"prompt": "Q"}])
    result = read_hub("org/data", "test", None, "preference", on_error="skip")
    assert len(result.records) == 1
    assert result.reasons[0].startswith("hub:org/data[test]: row 1: chosen: missing")


# ---- write_jsonl ---------------------------------------------------------------------------------

def test_write_jsonl_round_trips_utf8(tmp_path):
    path = tmp_path / "out" / "a.jsonl"
    records = [{"prompt": "café ☕"}, {"prompt": "b"}]
    assert write_jsonl(path, records) == 2
    assert "café ☕".encode() in path.read_bytes()
    assert [r["prompt"][0]["content"] for r in read_records(path, "prompt").records] == ["café ☕", "b"]
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.jsonl"]


def test_write_jsonl_leaves_original_untouched_on_failure(tmp_path):
    path = tmp_path / "a.jsonl"
    write_jsonl(path, [{"prompt": "original"}])
    before = path.read_bytes()
    with pytest.raises(TypeError, match=r"record 1 cannot be written as JSON"):
        write_jsonl(path, [{"prompt": "new"}, {"prompt": object()}])
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["a.jsonl"]  # no temporary file left


# ---- mixing --------------------------------------------------------------------------------------

@pytest.mark.parametrize("n, weight, count, size", [
    (10, 0.5, None, 5), (10, 2.5, None, 25), (100, 0.29, None, 29), (10, None, 3, 3),
    (10, None, 23, 23), (10, None, None, 10), (0, 2.0, None, 0),
])
def test_take_sizes(n, weight, count, size):
    assert take_size(n, weight, count) == size
    assert len(take(list(range(n)), weight, count, rng=random.Random(0))) == size


def test_take_repeats_whole_copies_then_samples_the_rest():
    out = take(list(range(10)), weight=2.5, rng=random.Random(0))
    assert out[:20] == list(range(10)) * 2
    assert len(set(out[20:])) == 5  # the remainder is sampled without replacement


def test_mix_is_deterministic_per_seed():
    a, b = [f"a{i}" for i in range(50)], [f"b{i}" for i in range(50)]
    groups = [(a, SourceConfig(path="a.jsonl", weight=0.5)), (b, SourceConfig(path="b.jsonl", count=70))]
    first = mix(groups, seed=1)
    assert len(first) == 25 + 70
    assert sum(x.startswith("a") for x in first) == 25
    assert mix(groups, seed=1) == first
    assert mix(groups, seed=2) != first


# ---- load_sources --------------------------------------------------------------------------------

def fake_builtin(kind, split, count, seed):
    return [{"prompt": f"{split} {i} {seed}"} for i in range(count or 4)]


def test_load_sources_mixes_paths_and_builtins(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(tasks, "BUILTIN", {"arithmetic": fake_builtin}, raising=False)
    path = jsonl(tmp_path / "a.jsonl", {"prompt": "x"}, {"prompt": 5}, {"prompt": "y"})
    sources = [SourceConfig(path=path, weight=2.0), SourceConfig(builtin="arithmetic", count=3)]
    with caplog.at_level(logging.WARNING, logger="alignloop.data"):
        loaded = load_sources(sources, "prompt", on_error="skip", seed=7)
    assert len(loaded.records) == 4 + 3
    assert loaded.report == [
        {"source": path, "read": 2, "skipped": 1, "used": 4,
         "reasons": [f"{path}:2: prompt: expected a string or a list of messages, got a number (5)"]},
        {"source": "builtin:arithmetic[train]", "read": 3, "skipped": 0, "reasons": [], "used": 3}]
    assert "skipped 1 bad record(s)" in caplog.text and f"{path}:2: prompt" in caplog.text
    text = format_report(loaded.report)
    assert text.splitlines()[0] == "data: 7 records from 2 source(s)"
    assert "builtin:arithmetic[train]" in text


def test_unknown_builtin_lists_known_names(monkeypatch):
    monkeypatch.setattr(tasks, "BUILTIN", {"arithmetic": fake_builtin, "gsm": fake_builtin}, raising=False)
    with pytest.raises(ValueError, match=r"unknown builtin dataset 'nope' \(known: arithmetic, gsm\)"):
        load_sources([SourceConfig(builtin="nope")], "prompt")


def test_builtin_records_are_validated(monkeypatch):
    monkeypatch.setattr(tasks, "BUILTIN", {"broken": lambda **kw: [{"prompt": ""}]}, raising=False)
    with pytest.raises(DataError, match=r"^builtin:broken\[train\]: row 0: prompt: empty prompt$"):
        load_sources([SourceConfig(builtin="broken")], "prompt")
