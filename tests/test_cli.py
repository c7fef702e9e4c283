"""The `alignloop` command as users run it: validate, errors on stderr, generate, kill -9 and
resume, and a 2-process `accelerate launch`."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "alignloop.cli"]


def cli(*args, **kwargs):
    return subprocess.run([*CLI, *args], capture_output=True, text=True, cwd=ROOT, **kwargs)


def write_recipe(tmp_path, extra="", steps=8, data="- builtin: arithmetic\n      count: 200"):
    path = tmp_path / "recipe.yaml"
    path.write_text(f"""
output_dir: {tmp_path / 'run'}
sft:
  data:
    {data}
  max_steps: {steps}
  per_device_train_batch_size: 8
  learning_rate: 1.0e-3
  logging_steps: 1
  max_length: 96
  activation_checkpointing: false
{extra}""")
    return path


def test_validate_ok_and_errors_go_to_stderr(tmp_path):
    ok = cli("validate", str(ROOT / "recipes" / "quickstart.yaml"))
    assert ok.returncode == 0 and "ok" in ok.stdout
    bad = write_recipe(tmp_path, extra="  learnig_rate: 1")
    out = cli("validate", str(bad))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert f"{bad}:13: sft.learnig_rate: unknown key (did you mean 'learning_rate'?)" in out.stderr
    out = cli("validate", str(bad), "--set", "sft.method=lora", "--set", "sft.lora.r=0")
    assert out.returncode == 2 and "--set sft.lora.r: Input should be greater than 0" in out.stderr


def test_bad_record_names_file_line_and_field(tmp_path):
    data = tmp_path / "train.jsonl"
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    bad = {"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "hello"}]}
    data.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    recipe = write_recipe(tmp_path, data=f"- path: {data}")
    out = cli("run", str(recipe))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert f"{data}:2: messages.1.role: unknown role 'bot'" in out.stderr
    assert not (tmp_path / "run" / "round_1" / "sft").exists()
    # with bad_records: skip the run goes on and the skip is reported
    recipe.write_text("bad_records: skip\n" + recipe.read_text())
    out = cli("run", str(recipe))
    assert out.returncode == 0, out.stderr
    report = json.loads((tmp_path / "run" / "round_1" / "sft" / "metrics.json").read_text())["data"][0]
    assert report["skipped"] == 1 and f"{data}:2: messages.1.role" in report["reasons"][0]


@pytest.mark.slow
def test_generate(tmp_path, tiny_dir):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps(p) for p in [
        {"prompt_id": "a", "prompt": "What is 2 plus 2?"},
        {"prompt_id": "b", "prompt": [{"role": "user", "content": "Add 3 and 4."}]}]) + "\n")
    out_file = tmp_path / "out.jsonl"
    out = cli("generate", "--model", str(tiny_dir), "--prompts", str(prompts), "--output", str(out_file),
              "--n", "3", "--temperature", "0.9", "--max-new-tokens", "8")
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert [r["sample_id"] for r in rows] == ["a:0", "a:1", "a:2", "b:0", "b:1", "b:2"]
    assert rows[0]["generator"]["temperature"] == 0.9 and rows[0]["generator"]["n"] == 3
    assert rows[3]["prompt"] == [{"role": "user", "content": "Add 3 and 4."}]
    greedy = cli("generate", "--model", str(tiny_dir), "--prompts", str(prompts), "--output",
                 str(out_file), "--n", "2")
    assert greedy.returncode == 2 and "temperature" in greedy.stderr


def final_weights(run_dir):
    from safetensors.torch import load_file

    return load_file(str(run_dir / "round_1" / "sft" / "model" / "model.safetensors"))


@pytest.mark.slow
def test_kill_9_then_resume_matches_uninterrupted_run(tmp_path):
    """A run killed with SIGKILL mid-training resumes from its last checkpoint and ends with the
    same weights as a run that was never interrupted (same seed, same data order)."""
    extra = "  save_steps: 10\n  keep_checkpoints: false"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    straight = write_recipe(tmp_path / "a", extra=extra, steps=120)
    killed = write_recipe(tmp_path / "b", extra=extra, steps=120)
    assert cli("run", str(straight)).returncode == 0

    proc = subprocess.Popen([*CLI, "run", str(killed)], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    checkpoints = tmp_path / "b" / "run" / ".work" / "round_1" / "sft" / "checkpoints"
    deadline = time.time() + 300
    while not any(checkpoints.glob("checkpoint-*/trainer_state.json")) and time.time() < deadline:
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.05)
    time.sleep(0.3)  # let the checkpoint finish writing: resume must cope with whatever is there
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "b" / "run" / "round_1" / "sft").exists()  # no half-written stage directory

    resumed = cli("run", str(killed))
    assert resumed.returncode == 0, resumed.stderr
    manifest = json.loads((tmp_path / "b" / "run" / "manifest.json").read_text())
    assert "checkpoint-" in (manifest["stages"]["round_1/sft"]["metrics"]["resumed_from"] or "")
    a, b = final_weights(tmp_path / "a" / "run"), final_weights(tmp_path / "b" / "run")
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_two_process_accelerate_run(tmp_path):
    recipe = write_recipe(tmp_path, steps=6)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                          str(ROOT / "recipes" / "accelerate" / "cpu_2proc.yaml"), "-m", "alignloop.cli",
                          "run", str(recipe)], capture_output=True, text=True, cwd=ROOT, env=env,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    run_dir = tmp_path / "run"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["stages"]["round_1/sft"]["metrics"]["steps"] == 6
    assert (run_dir / "round_1" / "sft" / "model" / "model.safetensors").is_file()
    state = json.loads((run_dir / "round_1" / "sft" / "metrics.json").read_text())
    assert state["world_size"] == 2
