"""GGUF checkpoints as model paths: dequantized once into a cached HF safetensors directory.

`model.path: x.gguf` (also `model.tokenizer`, and `alignloop generate --model x.gguf`) goes
through `convert()`: transformers reads the file (`from_pretrained(dir, gguf_file=name)`, which
dequantizes every tensor), the weights are saved again as a plain fp32 `LlamaForCausalLM`
(transformers refuses to save a model loaded from GGUF) with the file's tokenizer and chat
template, and the reloaded copy must give the same greedy tokens as the model read from the
file. The directory is `<cache>/gguf-<sha256[:16]>` (cache: $ALIGNLOOP_CACHE, else
~/.cache/alignloop), built in a temporary sibling and renamed into place under a file lock, as
`alignloop.models.tiny` builds the tiny Llama: a killed conversion leaves nothing that looks
complete. `gguf.json` in it records the source file, its sha256 and size, the GGUF architecture
and the library versions.

Only Llama files are accepted (`general.architecture` 'llama' that transformers reads as
model_type 'llama'). Llama 3.1+ RoPE scaling survives: llama.cpp stores it only as the tensor
`rope_freqs.weight`, which transformers' loader drops, so `_llama3_rope` turns it back into
`rope_parameters`.

Standard library only at import time (the recipe checks call `check`); numpy, torch,
transformers and gguf are imported when a file is read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

from alignloop.pipeline.errors import StageError

logger = logging.getLogger("alignloop.models")

INFO_FILE = "gguf.json"
CONVERTER_VERSION = 1  # recorded in gguf.json
# Every Llama 3.1 / 3.2 / 3.3 release scales RoPE with these (reference section D); only the
# factor (8 or 32) differs, and it is the largest divisor in rope_freqs.weight.
LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
CHECK_PROMPT = [{"role": "user", "content": "Hello! What is 2 plus 2?"}]
CHECK_TOKENS = 8

_hashes: dict[tuple, str] = {}   # (path, size, mtime) -> sha256, so a file is hashed once per process
_headers: dict[tuple, dict] = {}  # (path, size, mtime) -> what check() found


class GGUFError(StageError):
    """A .gguf file alignloop cannot use; the message starts with the file's path."""


def is_gguf(path) -> bool:
    return str(path).lower().endswith(".gguf")


def cache_root() -> Path:
    """$ALIGNLOOP_CACHE, else ~/.cache/alignloop (as alignloop.models.tiny)."""
    return Path(os.environ.get("ALIGNLOOP_CACHE") or Path.home() / ".cache" / "alignloop")


def _stat_key(path: Path) -> tuple:
    if not path.is_file():
        raise GGUFError(f"{path}: no such file")
    stat = path.stat()
    return str(path), stat.st_size, stat.st_mtime_ns


def file_sha256(path) -> str:
    """The file's sha256 (hex), computed once per process for each (path, size, mtime)."""
    path = Path(path).expanduser().resolve()
    key = _stat_key(path)
    if key not in _hashes:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        _hashes[key] = digest.hexdigest()
    return _hashes[key]


def converted_dir(path) -> Path:
    """Where the conversion of `path` is (or will be): `<cache>/gguf-<sha256[:16]>`."""
    return cache_root() / f"gguf-{file_sha256(path)[:16]}"


def model_identity(model) -> dict:
    """A ModelConfig as it enters run keys: its fields, plus the sha256 of each .gguf file it
    names and the fingerprint of an adapter directory, so that a different file at the same path
    is a different model."""
    from alignloop.manifest import fingerprint

    identity = model.model_dump(mode="json")
    for key in ("path", "tokenizer"):
        value = identity.get(key)
        if value and is_gguf(value):
            identity[f"{key}_sha256"] = file_sha256(value)
    path = identity.get("path")
    if path and (Path(path) / "adapter_config.json").is_file():  # an adapter directory, merged
        identity["path_adapter"] = fingerprint(path)  # by alignloop.models.adapters: its contents
    return identity


# ---------------------------------------------------------------------------------------------
# Checking a file (cheap: the header, not the tensors)


def check(path) -> dict:
    """The header facts of a GGUF alignloop can convert (architecture, name, RoPE); raises
    GGUFError naming the file. A file already converted is not read again."""
    path = Path(path).expanduser().resolve()
    key = _stat_key(path)
    if key not in _headers:
        info = converted_dir(path) / INFO_FILE
        _headers[key] = json.loads(info.read_text()) if info.is_file() else _read_header(path)
    return _headers[key]


def _import_gguf(path: Path):
    try:
        import gguf
    except ImportError:
        raise GGUFError(f"{path}: reading a .gguf file needs the gguf package, which is not "
                        "installed (pip install 'alignloop[gguf]')") from None
    return gguf


def _read_header(path: Path) -> dict:
    gguf = _import_gguf(path)
    with open(path, "rb") as handle:
        if handle.read(4) != b"GGUF":
            raise GGUFError(f"{path}: not a GGUF file (it does not start with the magic bytes GGUF)")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as err:  # the reader fails on whatever it meets first; its message helps
        raise GGUFError(f"{path}: truncated or corrupt GGUF file (gguf's reader: {err})") from None
    size = path.stat().st_size
    needed = max((t.data_offset + t.n_bytes for t in reader.tensors), default=0)
    if needed > size:
        raise GGUFError(f"{path}: truncated GGUF file: its tensors need {needed} bytes, the file "
                        f"has {size}")
    architecture = _field(reader, "general.architecture")
    if architecture != "llama":
        raise GGUFError(f"{path}: GGUF architecture '{architecture}' is not supported; alignloop "
                        "post-trains Llama-family models (general.architecture 'llama') only")
    return {"architecture": architecture, "name": _field(reader, "general.name"),
            "rope_parameters": _llama3_rope(reader, path)}


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _llama3_rope(reader, path: Path) -> dict | None:
    """Llama 3.1+ RoPE scaling from `rope_freqs.weight` (llama.cpp's convert_hf_to_gguf.py
    writes one divisor per frequency pair and no other trace of the scaling), as the llama3
    `rope_parameters` that give the same divisors; None when the file has no such tensor."""
    import numpy as np

    tensor = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if tensor is None:
        return None
    stored = np.asarray(tensor.data, dtype=np.float64).reshape(-1)
    dim = _field(reader, "llama.rope.dimension_count") or \
        _field(reader, "llama.embedding_length") // _field(reader, "llama.attention.head_count")
    theta = float(_field(reader, "llama.rope.freq_base", 10000.0))
    rope = {"rope_type": "llama3", "rope_theta": theta, "factor": float(stored.max()), **LLAMA3_ROPE}
    same = len(stored) == dim // 2 and np.allclose(llama3_divisors(rope, dim), stored, rtol=1e-5)
    if not same:
        raise GGUFError(f"{path}: rope_freqs.weight is not Llama 3.1-style RoPE scaling (factor "
                        f"{rope['factor']:g}, low/high frequency factors 1 and 4, original context "
                        "8192); alignloop cannot convert this file")
    return rope


def llama3_divisors(rope: dict, dim: int) -> list[float]:
    """What llama3 RoPE divides each inverse frequency theta^(-2i/dim) by (reference section D)."""
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    context = rope["original_max_position_embeddings"]
    out = []
    for i in range(0, dim, 2):
        wavelength = 2 * math.pi * rope["rope_theta"] ** (i / dim)
        if wavelength < context / high:
            out.append(1.0)
        elif wavelength > context / low:
            out.append(factor)
        else:
            smooth = (context / wavelength - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return out


# ---------------------------------------------------------------------------------------------
# Converting


def convert(path) -> Path:
    """The HF directory for the GGUF file `path`: converted on first use, then read from the cache."""
    from filelock import FileLock

    path = Path(path).expanduser().resolve()
    header = check(path)
    final = converted_dir(path)
    if final.is_dir():
        return final
    root = final.parent
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f"{final.name}.lock")):
        if final.is_dir():  # another process converted it while we waited
            return final
        for stale in root.glob(f".{final.name}.tmp-*"):  # left by a killed conversion; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        start = time.perf_counter()
        logger.info("converting %s into %s", path, final)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=root))
        try:
            _write(path, header, tmp)
            _write_info(path, header, tmp, time.perf_counter() - start)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        logger.info("converted %s in %.1f s", path, time.perf_counter() - start)
    return final


def _write(path: Path, header: dict, out: Path) -> None:
    """Dequantizes `path`, saves a plain model and the tokenizer into `out`, checks the copy."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    _import_gguf(path)
    # transformers reads a llama file named "mistral" as Mistral (and then fails to load it)
    model_type = AutoConfig.from_pretrained(path.parent, gguf_file=path.name).model_type
    if model_type != "llama":
        raise GGUFError(f"{path}: transformers reads this file as a '{model_type}' model "
                        f"(general.name {header['name']!r}); alignloop converts Llama models only")
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    read = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    if header["rope_parameters"]:
        read.config.rope_parameters = header["rope_parameters"]
        read.model.rotary_emb = type(read.model.rotary_emb)(read.config)
    expected = _greedy(read, tokenizer)
    _plain_copy(read).save_pretrained(out)
    tokenizer.save_pretrained(out)
    del read
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    got = _greedy(reloaded, AutoTokenizer.from_pretrained(out))
    if got != expected:
        raise GGUFError(f"{path}: the converted model's greedy tokens {got} differ from the GGUF "
                        f"model's {expected}; the conversion is not faithful")


def _plain_copy(model):
    """The same weights (shared, not copied) in a model without the GGUF quantization_config,
    which is what makes transformers refuse to save it; tied embeddings stay tied."""
    import copy

    config = copy.deepcopy(model.config)
    del config.quantization_config
    plain = type(model).from_pretrained(None, config=config, state_dict=model.state_dict(),
                                        dtype=model.dtype)
    plain.generation_config = model.generation_config
    return plain


def _greedy(model, tokenizer) -> list[int]:
    """CHECK_TOKENS greedy tokens after a short chat prompt (the tokenizer's template, if any)."""
    import torch

    if tokenizer.chat_template:
        ids = tokenizer.apply_chat_template(CHECK_PROMPT, add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tokenizer(CHECK_PROMPT[0]["content"], return_tensors="pt")["input_ids"]
    model.eval()
    with torch.no_grad():
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=CHECK_TOKENS,
                             do_sample=False, pad_token_id=pad)
    return out[0, ids.shape[1]:].tolist()


def _write_info(path: Path, header: dict, out: Path, seconds: float) -> None:
    from importlib import metadata

    from alignloop._version import __version__

    info = {**header, "source": str(path), "sha256": file_sha256(path), "size": path.stat().st_size,
            "transformers": metadata.version("transformers"), "gguf": metadata.version("gguf"),
            "alignloop": __version__, "converter": CONVERTER_VERSION, "seconds": round(seconds, 1)}
    (out / INFO_FILE).write_text(json.dumps(info, indent=2))
