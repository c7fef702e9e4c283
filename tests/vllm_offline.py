"""Run by tests/test_vllm.py and benchmarks/generation.py with the vLLM virtualenv's Python:
opens the `vllm` backend once and answers several generate calls.

    .venv-vllm/bin/python tests/vllm_offline.py JOB.json RESULT.json

JOB: {"config": GenerationConfig fields, "model_dir": str, "dtype": str,
      "calls": [{"prompts": [[message, ...], ...], "settings": SamplingSettings fields}, ...]}
RESULT: {"describe": {...}, "start_seconds": float,
         "calls": [{"samples": [[Sample as dict] * n] per prompt, "seconds": float}, ...],
         "checks": [log-prob check reports] (with check_logprobs)}
"""

import json
import sys
import time
from dataclasses import asdict


def main(job_file: str, result_file: str) -> None:
    from alignloop.generation.backends import open_generator
    from alignloop.generation.common import SamplingSettings
    from alignloop.generation.config import GenerationConfig

    job = json.loads(open(job_file).read())
    cfg = GenerationConfig(backend="vllm", **job["config"])
    calls = []
    with open_generator(cfg, job["model_dir"], dtype=job.get("dtype", "float32")) as gen:
        for call in job["calls"]:
            start = time.perf_counter()
            samples = gen.generate(call["prompts"], SamplingSettings(**call["settings"]))
            calls.append({"samples": [[asdict(s) for s in group] for group in samples],
                          "seconds": time.perf_counter() - start})
        result = {"describe": gen.describe(), "start_seconds": gen.start_seconds, "calls": calls,
                  "checks": getattr(gen, "checks", None)}
    with open(result_file, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":  # vLLM spawns its workers: they re-import this file
    main(*sys.argv[1:3])
