"""alignloop's GPU suite: kernel correctness in 16-bit, kernel speed, a tile sweep, a 1B LoRA step
at 32K-128K tokens and RS generation, in one run that fits a short device lease.

    bash benchmarks/gpu/run.sh                      # on a CUDA machine; writes $OUT or runs/gpu
    python3 benchmarks/gpu/suite.py --out DIR       # the same, without the set-up
    python3 benchmarks/gpu/suite.py --dry-run --out DIR   # CPU: tiny shapes, Triton's interpreter

Each section writes its rows to DIR/results.json as soon as it ends (a run cut short keeps what
it measured) and the whole run ends with DIR/results.md, one table per section, also printed.
A section starts no new configuration past its share of `--budget-s`; what it skips is a row
that says so. The dry run checks the plumbing and every code path on tiny shapes; its numbers
mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Run as a script, this file's folder would come first on sys.path and shadow installed packages.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

# (name, share of the budget): a section may use its share plus whatever earlier ones left.
SECTIONS = [
    ("ceilings", 0.02),
    ("attention_correctness", 0.10),
    ("fused_loss", 0.10),
    ("attention_speed", 0.10),
    ("lora_long_context", 0.33),
    ("attention_tiles", 0.20),
    ("rs_generation", 0.15),
]


def _section(name: str):
    from benchmarks.gpu import kernel_sections

    if hasattr(kernel_sections, name):
        return getattr(kernel_sections, name)
    from benchmarks.gpu import model_sections

    return getattr(model_sections, name)


def environment(dry_run: bool) -> dict:
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "dry_run": dry_run,
           "commit": os.environ.get("ALIGNLOOP_COMMIT", "unknown")}
    for name in ("triton", "transformers", "peft", "trl", "huggingface_hub", "accelerate"):
        env[name] = _dist_version(name)  # None: not installed, a fact about the machine
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, multiprocessors=props.multi_processor_count,
                   memory_gib=round(props.total_memory / 2**30, 1), capability=f"{props.major}.{props.minor}")
    return env


def _dist_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def markdown(results: dict) -> str:
    env = results["environment"]
    lines = [f"GPU suite: {env.get('gpu', 'CPU (dry run)')}, torch {env['torch']}, triton {env['triton']}, "
             f"transformers {env['transformers']}, peft {env['peft']}, trl {env['trl']}, commit {env['commit']}"
             + (" - DRY RUN, numbers mean nothing" if env["dry_run"] else ""), ""]
    for name, section in results["sections"].items():
        rows = section["rows"]
        lines.append(f"### {name} ({section['seconds']:.0f} s)")
        lines.append("")
        if not rows:
            lines += ["(no rows)", ""]
            continue
        keys = [k for k in dict.fromkeys(k for r in rows for k in r) if k != "section"]
        lines.append("| " + " | ".join(keys) + " |")
        lines.append("|" + "---|" * len(keys))
        for r in rows:
            lines.append("| " + " | ".join("" if r.get(k) is None else str(r.get(k)) for k in keys) + " |")
        lines.append("")
    if results["notes"]:
        lines += ["Notes:", *[f"- {n}" for n in results["notes"]], ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "runs" / "gpu"))
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, Triton's interpreter")
    parser.add_argument("--budget-s", type=float, default=480.0, help="seconds for all sections together")
    parser.add_argument("--only", default="", help="comma-separated section names (default: all)")
    args = parser.parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton
    sys.path.insert(0, str(ROOT))

    import torch

    from benchmarks.gpu.common import Context, release

    device = "cuda" if torch.cuda.is_available() and not args.dry_run else "cpu"
    if device == "cpu" and not args.dry_run:
        print("benchmarks/gpu/suite.py needs a CUDA GPU (torch.cuda.is_available() is False); "
              "use --dry-run to check it on a CPU.", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    chosen = [s for s in SECTIONS if not args.only or s[0] in args.only.split(",")]
    results = {"environment": environment(args.dry_run), "sections": {}, "notes": []}
    print(json.dumps(results["environment"]), flush=True)
    start = time.monotonic()
    total_share = sum(share for _, share in chosen)
    used_share = 0.0
    for name, share in chosen:
        used_share += share
        ctx = Context(dry_run=args.dry_run, device=device, out=out,
                      deadline=start + args.budget_s * used_share / total_share)
        t0 = time.monotonic()
        try:
            rows = _section(name)(ctx)
        except Exception as err:  # noqa: BLE001 - one broken section must not cost the others
            traceback.print_exc()
            rows = [{"section": name, "status": f"failed: {type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"}]
        finally:
            release(device)
        seconds = time.monotonic() - t0
        results["sections"][name] = {"seconds": round(seconds, 1), "rows": rows}
        results["notes"] += ctx.notes
        (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
        print(f"[{time.monotonic() - start:6.1f} s] {name}: {len(rows)} rows, "
              f"{sum(r.get('status') == 'ok' for r in rows)} ok, {seconds:.1f} s", flush=True)
    table = markdown(results)
    (out / "results.md").write_text(table)
    print(table)
    failed = [r for s in results["sections"].values() for r in s["rows"]
              if str(r.get("status", "")).startswith("failed")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
