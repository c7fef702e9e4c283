"""Offline teacher targets: a teacher's top-k log-probs, token ids and tail mass for every scored
token of the distillation data, computed once and read back while the student trains.

Full logits do not fit on disk (one 8K-token sequence at Llama 3's 128,256-token vocabulary is
4.2 GB in fp32); top-k targets are k x 8 + 4 bytes per token (516 bytes at k = 64). The loss
they define is in alignloop/kernels/distill_reference.py (`TopK`, the k tokens plus one tail
bucket); training from the cache equals training against the live teacher with the same `top_k`.

    <cache_dir>/<key>/cache.json                what the key hashes, the examples, the shards
    <cache_dir>/<key>/shard-00000.safetensors   examples [0, S): log_probs (n, k) fp32,
                                                indices (n, k) int32, tail (n,) fp32,
                                                offsets (S + 1,) int64: example i's rows are
                                                offsets[i] .. offsets[i + 1] (scored tokens in order)

The key hashes the teacher's fingerprint, the tokenized examples (so the data, the tokenizer, the
chat template and max_length), the tokenizer's vocabulary, k and the shard size, and nothing
that only the loss reads (temperature, divergence, weights): one cache serves them all. Each
shard is written to a temporary file and renamed into place, so after a kill -9 every shard
present is complete; a rerun computes only the missing ones.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch

from alignloop.kernels.distill_loss import teacher_top_k
from alignloop.kernels.distill_reference import IGNORE_INDEX, TopK
from alignloop.manifest import atomic_path, content_hash, fingerprint, write_json

logger = logging.getLogger("alignloop.distill")

CACHE_VERSION = 1
FULL_HASH_BYTES = 2 * 2**30  # checkpoints up to this size are fingerprinted by their content


def teacher_fingerprint(path: str) -> str:
    """What identifies a teacher: the sha256 of its files for a checkpoint up to 2 GiB; above
    that (an 8B or 70B teacher: reading 16-140 GB per run is too slow) its config.json and the
    names, sizes and modification times of its files. A hub id stands for itself."""
    root = Path(path)
    if not root.is_dir():
        return content_hash({"hub": path})
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
    if sum(f.stat().st_size for f in files) <= FULL_HASH_BYTES:
        return fingerprint(root)
    config = (root / "config.json").read_text() if (root / "config.json").is_file() else ""
    return content_hash({"config": config, "files": [(str(f.relative_to(root)), f.stat().st_size,
                                                      f.stat().st_mtime_ns) for f in files]})


def data_hash(rows: list[dict]) -> str:
    """sha256 over every example's token ids and labels, in order."""
    digest = hashlib.sha256()
    for row in rows:
        for key in ("input_ids", "labels"):
            digest.update(torch.tensor(row[key], dtype=torch.int64).numpy().tobytes())
        digest.update(b"|")
    return digest.hexdigest()[:16]


def tokenizer_hash(tokenizer) -> str:
    return content_hash({"vocab": sorted(tokenizer.get_vocab().items()),
                         "template": tokenizer.chat_template})


class TeacherCache:
    """One teacher's targets over one list of examples (see the module docstring)."""

    def __init__(self, cache_dir: str | Path, *, teacher: str, rows: list[dict], tokenizer, k: int,
                 max_length: int, shard_examples: int):
        self.parts = {"version": CACHE_VERSION, "teacher_fingerprint": teacher_fingerprint(teacher),
                      "data": data_hash(rows), "tokenizer": tokenizer_hash(tokenizer), "k": k,
                      "max_length": max_length, "shard_examples": shard_examples}
        self.key = content_hash(self.parts)
        self.root = Path(cache_dir) / self.key
        self.teacher, self.k, self.size = teacher, k, shard_examples
        self.examples = len(rows)
        self.shards = max(1, -(-self.examples // shard_examples))
        self._open: dict[int, tuple] = {}

    def shard_path(self, i: int) -> Path:
        return self.root / f"shard-{i:05d}.safetensors"

    def missing(self) -> list[int]:
        return [i for i in range(self.shards) if not self.shard_path(i).is_file()]

    def build(self, model, rows: list[dict], pad_id: int, *, batch_size: int = 8,
              backend: str = "torch", progress=None) -> dict:
        """Computes the missing shards with the teacher `model` (on its device). `progress(i)`
        is called after shard i is written. Returns {"shards", "reused", "built"}."""
        from safetensors.torch import save_file

        self.root.mkdir(parents=True, exist_ok=True)
        for stale in self.root.glob(".shard-*.tmp"):  # a shard being written when a run was killed
            stale.unlink(missing_ok=True)
        write_json(self.root / "cache.json", {**self.parts, "teacher": self.teacher,
                                              "examples": self.examples, "shards": self.shards})
        todo = self.missing()
        if todo:
            logger.info("teacher cache %s: %d of %d shards to compute", self.root, len(todo), self.shards)
        for i in _progress(todo, f"teacher cache ({self.teacher})"):
            tensors = self._shard(model, rows[i * self.size:(i + 1) * self.size], pad_id, batch_size, backend)
            with atomic_path(self.shard_path(i)) as tmp:
                save_file(tensors, str(tmp))
                with open(tmp, "rb") as handle:
                    os.fsync(handle.fileno())
            if progress is not None:
                progress(i)
        return {"shards": self.shards, "reused": self.shards - len(todo), "built": len(todo)}

    def _shard(self, model, rows: list[dict], pad_id: int, batch_size: int, backend: str) -> dict:
        from alignloop.distill.data import Collator
        from alignloop.distill.teachers import head_weight, teacher_hidden

        device = next(model.parameters()).device
        collate, parts, counts = Collator(pad_id, with_index=False), [], []
        for s in range(0, len(rows), batch_size):
            batch = {k: v.to(device) for k, v in collate(rows[s:s + batch_size]).items()}
            hidden = teacher_hidden(model, batch["input_ids"], batch["attention_mask"])[:, :-1]
            keep = batch["labels"][:, 1:] != IGNORE_INDEX  # (B, L - 1)
            parts.append(teacher_top_k(hidden[keep], head_weight(model), self.k, backend=backend))
            counts += keep.sum(1).tolist()
        offsets = torch.tensor([0] + counts, dtype=torch.int64).cumsum(0)
        return {"log_probs": torch.cat([p.log_probs for p in parts]).float().cpu().contiguous(),
                "indices": torch.cat([p.indices for p in parts]).to(torch.int32).cpu().contiguous(),
                "tail": torch.cat([p.tail for p in parts]).float().cpu().contiguous(),
                "offsets": offsets}

    def rows(self, examples: list[int]) -> TopK:
        """The targets of these examples' scored tokens, concatenated in order (CPU)."""
        parts = []
        for e in examples:
            handle, offsets = self._shard_file(e // self.size)
            a, b = offsets[e % self.size].item(), offsets[e % self.size + 1].item()
            parts.append([handle.get_slice(name)[a:b] for name in ("log_probs", "indices", "tail")])
        log_probs, indices, tail = (torch.cat([p[j] for p in parts]) for j in range(3))
        return TopK(log_probs, indices.long(), tail)

    def _shard_file(self, i: int):
        if i not in self._open:
            from safetensors import safe_open

            path = self.shard_path(i)
            if not path.is_file():
                raise FileNotFoundError(f"teacher cache {self.root}: shard {i} is missing; build it first")
            handle = safe_open(str(path), framework="pt")
            self._open[i] = (handle, handle.get_tensor("offsets"))
        return self._open[i]

    def __getstate__(self):  # data-loader workers open their own files
        return {**self.__dict__, "_open": {}}


def _progress(items: list[int], desc: str):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return items
    return tqdm(items, desc=desc, unit="shard", disable=not items)


def read_meta(root: Path) -> dict:
    return json.loads((root / "cache.json").read_text())
