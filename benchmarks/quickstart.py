"""Times the quickstart loop end to end from a cold cache, as `make demo` runs it; prints tables.

    .venv/bin/python benchmarks/quickstart.py [--recipe recipes/quickstart.yaml] [--keep DIR]

Targets (issues 2, 3 and 12), on a 2-core CPU, tiny-model build included: the whole command
under 10 minutes; held-out accuracy after the last round above the first SFT's (round 0); the
violation rate falls from the base model's; the false-refusal rate stays at or below 0.10 (all
under the run's primary safety judge). Printed: the per-point table (with the SFT model before
DPO of each round, evaluation.stage_ablation), the run's paired changes (report.json; "round_k vs
round_k.sft" is DPO's own contribution) and the checks. Record the tables in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's alignloop, also when run from another worktree
FRR_BOUND = 0.10


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "quickstart.yaml"))
    parser.add_argument("--keep", help="copy the run directory here afterwards")
    args = parser.parse_args()
    from alignloop.pipeline.report import rows

    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "ALIGNLOOP_CACHE": str(Path(tmp) / "cache")}  # cold: builds the tiny model
        run_dir = Path(tmp) / "run"
        start = time.perf_counter()
        log = Path(tmp) / "run.log"
        with log.open("w") as out:
            code = subprocess.run([sys.executable, "-m", "alignloop.cli", "run", args.recipe,
                                   "--output-dir", str(run_dir)], env=env, cwd=ROOT, stdout=out,
                                  stderr=subprocess.STDOUT).returncode
        total = time.perf_counter() - start
        if code:
            sys.exit(f"the quickstart failed (exit {code}):\n{log.read_text()[-4000:]}")
        manifest = json.loads((run_dir / "manifest.json").read_text())
        table = rows(run_dir)
        changes = json.loads((run_dir / "report.json").read_text())["changes"]
        evals = {p.parent.name if p.parent.name == "base_eval" else f"{p.parts[-3]}/{p.parent.name}":
                 json.loads(p.read_text()).get("seconds") for p in run_dir.glob("**/eval*/metrics.json")}
        if args.keep:
            shutil.copytree(run_dir, args.keep, dirs_exist_ok=True)

    table = print_tables(manifest, table, total, "whole command, cold cache")
    print("\nevaluations (s): " + ", ".join(f"{k} {_f(v, 0)}" for k, v in sorted(evals.items())))
    print_changes(changes)
    points = {row["label"]: row for row in table}
    rounds = [label for label in points if label.startswith("round_") and "." not in label]
    first, last, base = points["round_0"], points[rounds[-1]], points["base"]
    checks = [
        ("accuracy after the last round > after round 0", last["accuracy"] > first["accuracy"]),
        ("violation rate falls from the base model's", last["vr"] < base["vr"]),
        (f"false-refusal rate <= {FRR_BOUND}", last["frr"] <= FRR_BOUND),
        ("whole command < 10 min", total < 10 * 60),
    ]
    print()
    for name, ok in checks:
        print(f"- {name}: {'yes' if ok else 'NO'}")


def print_tables(manifest: dict, table: list[dict], total: float, what: str) -> list[dict]:
    """The machine, the whole command's time and the per-round table (docs/benchmarks.md)."""
    seconds: dict[str, float] = {}
    for name, rec in manifest["stages"].items():
        label = name.split("/")[0]
        seconds[label] = seconds.get(label, 0.0) + rec.get("seconds", 0.0)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; torch / "
          f"transformers / trl {' / '.join(manifest['versions'][k] for k in ('torch', 'transformers', 'trl'))}")
    print(f"{what}: {total:.0f} s\n")
    print("| point | held-out accuracy | VR | FRR | VR (rules) | FRR (rules) | reward mean | "
          "win rate vs previous | RM pair accuracy | RS kept | RS all failed | RS pairs | stages (s) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in table:
        inside = "." in row["label"]  # the SFT model before DPO: its round's stages are on the round's row
        cells = [row["label"] + (" (before DPO)" if inside else "")]
        cells += [_f(row.get(k)) for k in ("accuracy", "vr", "frr", "vr_rules", "frr_rules",
                                           "reward_mean", "win_rate", "rm_accuracy")]
        cells += [_count(row.get(k)) for k in ("rs_kept", "rs_all_failed", "rs_pairs")]
        cells.append("" if inside else f"{seconds.get(row['label'], 0):.0f}")
        print("| " + " | ".join(cells) + " |")
    judge = next((row["judge"] for row in table if row.get("judge")), None)
    print(f"\nVR / FRR: the primary judge ({judge}); the rules judge beside it.")
    return table


def print_changes(changes: list[dict]) -> None:
    print("\nPaired changes over the same held-out prompts (95% bootstrap; the run's report.json):\n")
    print("| | accuracy | VR | FRR |\n|---|---|---|---|")
    for c in changes:
        cells = [("-" if c[m] is None else f"{c[m]['difference']:+.3f} [{c[m]['low']:+.3f}, "
                  f"{c[m]['high']:+.3f}] (n {c[m]['n']})") for m in ("accuracy", "vr", "frr")]
        print(f"| {c['point']} vs {c['against']} | " + " | ".join(cells) + " |")


def _count(value) -> str:
    return "-" if value is None else str(value)


def _f(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


if __name__ == "__main__":
    main()
