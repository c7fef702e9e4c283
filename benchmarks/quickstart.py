"""Times the quickstart end to end from a cold cache, as `make demo` runs it, and prints a table.

    .venv/bin/python benchmarks/quickstart.py [--recipe recipes/quickstart.yaml]

Target (issue 2): under 10 minutes on a 2-core CPU, tiny-model build included, with held-out
accuracy after SFT clearly above before. Record the table in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "quickstart.yaml"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "ALIGNLOOP_CACHE": str(Path(tmp) / "cache")}  # cold: builds the tiny model
        run_dir = Path(tmp) / "run"
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "alignloop.cli", "run", args.recipe, "--output-dir",
                        str(run_dir)], check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        total = time.perf_counter() - start
        manifest = json.loads((run_dir / "manifest.json").read_text())
        before = json.loads((run_dir / "eval" / "before.json").read_text())
        after = json.loads((run_dir / "eval" / "after.json").read_text())
    sft = manifest["stages"]["sft"]
    rows = [
        ("machine", f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"),
        ("torch / transformers / trl", " / ".join(manifest["versions"][k] for k in ("torch", "transformers", "trl"))),
        ("sft steps", str(sft["metrics"]["steps"])),
        ("sft loss first -> last", f"{sft['metrics']['first_loss']} -> {sft['metrics']['last_loss']}"),
        ("sft stage (s)", f"{sft['seconds']:.0f}"),
        ("held-out accuracy before", f"{100 * before['accuracy']:.1f}% ({before['correct']}/{before['total']})"),
        ("held-out accuracy after", f"{100 * after['accuracy']:.1f}% ({after['correct']}/{after['total']})"),
        ("whole command, cold cache (s)", f"{total:.0f}"),
    ]
    width = max(len(name) for name, _ in rows)
    print(f"| {'quickstart':<{width}} | value |\n|{'-' * (width + 2)}|-------|")
    for name, value in rows:
        print(f"| {name:<{width}} | {value} |")


if __name__ == "__main__":
    main()
