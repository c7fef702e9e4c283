"""Resuming picks the newest checkpoint that was completely written."""

import logging

from alignloop.checkpoints import COMPLETE_MARKER, last_checkpoint


def make(root, step, complete=True):
    path = root / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(b"weights")
    if complete:
        (path / COMPLETE_MARKER).write_text("{}")
    return path


def test_newest_by_step_number_not_by_name(tmp_path):
    make(tmp_path, 8)
    newest = make(tmp_path, 12)  # "checkpoint-12" < "checkpoint-8" as text
    (tmp_path / "checkpoint-notes").mkdir()
    assert last_checkpoint(tmp_path) == str(newest)


def test_a_checkpoint_cut_off_mid_write_is_passed_over(tmp_path, caplog):
    """kill -9 while checkpoint-8 was being written: its weights are there, its trainer state
    (written last) is not; resuming from it would fail, so checkpoint-4 is the one."""
    done = make(tmp_path, 4)
    make(tmp_path, 8, complete=False)
    with caplog.at_level(logging.WARNING, logger="alignloop"):
        assert last_checkpoint(tmp_path) == str(done)
    assert "checkpoint-8 has no trainer_state.json" in caplog.text


def test_nothing_to_resume(tmp_path):
    assert last_checkpoint(tmp_path / "missing") is None
    make(tmp_path, 2, complete=False)
    assert last_checkpoint(tmp_path) is None
