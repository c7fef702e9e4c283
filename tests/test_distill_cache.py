"""The offline teacher cache (alignloop/distill/cache.py): a build killed with SIGKILL mid-way
resumes to files equal to an uninterrupted build; what the key covers; rows read back equal the
teacher's top-k targets of those examples."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from alignloop.distill.cache import TeacherCache
from alignloop.distill.config import DistillConfig
from alignloop.distill.data import build_examples, scored

K, SHARD, EXAMPLES = 8, 4, 40  # 10 shards


def setup(teacher: str, cache_dir: str, k: int = K, count: int = EXAMPLES):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(teacher)
    section = DistillConfig(data=[{"builtin": "arithmetic", "count": count}], max_length=64)
    rows = build_examples(section, tokenizer).rows
    cache = TeacherCache(cache_dir, teacher=teacher, rows=rows, tokenizer=tokenizer, k=k, max_length=64,
                         shard_examples=SHARD)
    model = AutoModelForCausalLM.from_pretrained(teacher).eval()
    return cache, model, rows, tokenizer


def build(teacher: str, cache_dir: str, delay: float = 0.0) -> dict:
    """What the killed subprocess runs: a slow build (a pause after each shard)."""
    cache, model, rows, tokenizer = setup(teacher, cache_dir)
    return cache.build(model, rows, tokenizer.pad_token_id, batch_size=3,
                       progress=lambda i: time.sleep(delay))


def shard_tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(path)


@pytest.mark.slow
def test_a_killed_build_resumes_to_the_same_files(tmp_path, tiny_dir):
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
            f"from test_distill_cache import build; build({str(tiny_dir)!r}, {str(killed)!r}, 0.4)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while len(list(killed.glob("*/shard-*.safetensors"))) < 2 and time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    (root,) = killed.iterdir()
    kept = sorted(p.name for p in root.glob("shard-*.safetensors"))
    assert 2 <= len(kept) < EXAMPLES // SHARD, kept
    (root / ".shard-00009.safetensors.dead.tmp").write_bytes(b"half a shard")  # as a kill mid-write leaves

    resumed = build(str(tiny_dir), str(killed))
    assert resumed == {"shards": 10, "reused": len(kept), "built": 10 - len(kept)}
    assert not list(root.glob(".*.tmp"))
    build(str(tiny_dir), str(whole))
    (other,) = whole.iterdir()
    assert other.name == root.name  # the same key
    assert (other / "cache.json").read_text() == (root / "cache.json").read_text()
    for i in range(10):
        got, want = (shard_tensors(r / f"shard-{i:05d}.safetensors") for r in (root, other))
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), i


def test_rows_are_the_teachers_top_k_of_each_scored_token(tmp_path, tiny_dir):
    from alignloop.distill.teachers import head_weight, teacher_hidden
    from alignloop.kernels.distill_reference import top_k_targets

    cache, model, rows, tokenizer = setup(str(tiny_dir), str(tmp_path), count=10)
    assert cache.build(model, rows, tokenizer.pad_token_id, batch_size=3)["built"] == 3
    picked = [7, 0, 5]  # across shards, in any order
    got = cache.rows(picked)
    assert got.indices.shape == (sum(scored(rows[i]["labels"]) for i in picked), K)
    wants = []
    for i in picked:
        ids = torch.tensor([rows[i]["input_ids"]])
        hidden = teacher_hidden(model, ids, torch.ones_like(ids))[0, :-1]
        keep = torch.tensor(rows[i]["labels"][1:]) != -100
        wants.append(top_k_targets(hidden[keep] @ head_weight(model).t(), K))
    assert torch.equal(got.indices, torch.cat([w.indices for w in wants]))
    assert torch.allclose(got.log_probs, torch.cat([w.log_probs for w in wants]), atol=1e-5)
    assert torch.allclose(got.tail, torch.cat([w.tail for w in wants]), atol=1e-5)
    # the tail is the mass the k tokens leave: the k + 1 buckets sum to 1
    total = got.log_probs.exp().sum(-1) + got.tail.exp()
    assert torch.allclose(total, torch.ones_like(total), atol=1e-5)


def test_the_key_covers_teacher_data_and_k_but_not_the_loss(tmp_path, tiny_dir, alignloop_cache):
    from alignloop.models.tiny import build_tiny

    base = setup(str(tiny_dir), str(tmp_path))[0].key
    assert setup(str(tiny_dir), str(tmp_path), k=K + 1)[0].key != base
    assert setup(str(tiny_dir), str(tmp_path), count=EXAMPLES - 1)[0].key != base
    assert setup(str(build_tiny(seed=3)), str(tmp_path))[0].key != base
    assert setup(str(tiny_dir), str(tmp_path))[0].key == base  # temperature, loss: not inputs
