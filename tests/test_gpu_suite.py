"""The GPU suite's dry run (benchmarks/gpu/run.sh --dry-run): every section runs its code paths
on tiny shapes on the CPU, in Triton's interpreter, and writes its tables.

The dry run measures nothing; what it checks is that a device lease will not be spent on a typo:
each section returns rows, every row is "ok" (the kernels equal their references within the
16-bit rule, the two LoRA paths agree), except rows that say why they were skipped, and the
JSON and markdown results are written. Its numbers are not asserted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_dry_run_runs_every_section_and_writes_the_tables(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable, GPU_WHEELS="0")
    env.pop("TRITON_INTERPRET", None)  # the suite sets it itself for the dry run
    proc = subprocess.run(["bash", str(ROOT / "benchmarks/gpu/run.sh"), "--dry-run", "--budget-s", "600"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    results = json.loads((tmp_path / "results.json").read_text())
    sections = results["sections"]
    assert list(sections) == [name for name, _ in _suite().SECTIONS]
    for name, section in sections.items():
        assert section["rows"], f"{name} returned no rows"
        for row in section["rows"]:
            status = str(row.get("status"))
            assert status == "ok" or status.startswith("skipped: "), f"{name}: {row}"
            assert "out of time" not in status, f"{name} ran out of its dry-run budget: {row}"
    assert results["environment"]["dry_run"] is True
    table = (tmp_path / "results.md").read_text()
    for name in sections:
        assert f"### {name} (" in table
    assert "DRY RUN" in table and "DRY RUN" in proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_a_gpu_and_without_dry_run_it_refuses_with_a_reason(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks/gpu/suite.py"), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "needs a CUDA GPU" in proc.stderr and "--dry-run" in proc.stderr


def _suite():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_suite", ROOT / "benchmarks/gpu/suite.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
