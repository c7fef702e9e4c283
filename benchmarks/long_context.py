"""Peak memory and time of one LoRA training step versus sequence length (issue 5, 6a).

Three paths on the same model, LoRA settings and data, one configuration per fresh subprocess
(its peak RSS is the subprocess's own `ru_maxrss`):

- plain: transformers' forward with `labels` (full logits, its cross-entropy) + backward + AdamW
- trl:   TRL 1.16's SFTTrainer, one step with its default loss (TRL's chunked fused LM head)
- ours:  the same SFTTrainer with alignloop's fused linear + cross-entropy installed
         (`alignloop.kernels.fused_head`), as the sft stage runs it with `fused_loss: true`

The model: a Llama with hidden 256, 2 layers, 4 heads (2 KV heads), MLP 1024, tied embeddings and
the real Llama 3 vocabulary of 128,256 tokens (random weights), activation checkpointing on,
sdpa attention, fp32, LoRA r=16 on all linear layers. One sequence of random token ids, every
token a label (a long document).

    OMP_NUM_THREADS=2 flock /tmp/alignloop-bench.lock .venv/bin/python benchmarks/long_context.py

A configuration whose estimated peak exceeds the memory cap (the plain path past ~8K: its
logits, their fp32 copy, log-softmax and gradient are 16 bytes x tokens x vocabulary) is skipped
with the estimate as the reason; a running one is killed if its RSS crosses the cap.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

VOCAB = 128256
PATHS = ("plain", "trl", "ours")
GiB = 2**30


def build_model():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from alignloop.models.tiny import LLAMA32_ROPE

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=1024,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=64, tie_word_embeddings=True, rope_parameters=LLAMA32_ROPE,
                         max_position_embeddings=131072, bos_token_id=0, eos_token_id=1,
                         pad_token_id=2)
    return LlamaForCausalLM(config)


def lora():
    from peft import LoraConfig

    return LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                      task_type="CAUSAL_LM")


def tokens(length: int):
    import torch

    return torch.randint(3, 128000, (1, length), generator=torch.Generator().manual_seed(length))


def step_plain(length: int) -> float:
    import torch
    from peft import get_peft_model

    model = get_peft_model(build_model(), lora())
    model.gradient_checkpointing_enable()
    model.enable_input_require_grads()
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = tokens(length)
    start = time.perf_counter()
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return time.perf_counter() - start


def step_trainer(length: int, fused: bool) -> float:
    import tempfile

    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    ids = tokens(length)[0].tolist()
    data = Dataset.from_dict({"input_ids": [ids], "labels": [ids]})
    args = SFTConfig(output_dir=tempfile.mkdtemp(), max_length=length, max_steps=1,
                     per_device_train_batch_size=1, activation_checkpointing=True, bf16=False,
                     use_cpu=True, report_to="none", save_strategy="no", logging_steps=1,
                     learning_rate=1e-4, disable_tqdm=True, dataloader_num_workers=0)
    timer = _StepTimer()
    from alignloop.models.tiny import train_tokenizer  # only for padding: the data is token ids

    trainer = SFTTrainer(model=build_model(), args=args, train_dataset=data, peft_config=lora(),
                         processing_class=train_tokenizer(), callbacks=[timer])
    if fused:
        from alignloop.kernels import fused_head

        fused_head.install(trainer.model)
    trainer.train()
    return timer.seconds


def _StepTimer():
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        seconds = None

        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.seconds = time.perf_counter() - self.start

    return StepTimer()


def child(path: str, length: int) -> None:
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    seconds = step_plain(length) if path == "plain" else step_trainer(length, fused=path == "ours")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    print(json.dumps({"path": path, "length": length, "seconds": seconds, "peak_bytes": peak}))


# ---- parent ---------------------------------------------------------------------------------

def estimate(path: str, length: int) -> float:
    """A rough peak in bytes, to skip what cannot fit (from the measurements in docs/benchmarks.md)."""
    base = 0.9 * GiB
    if path == "plain":
        return base + 16 * length * VOCAB
    if path == "trl":
        return base + 5 * GiB
    return base + 2 * GiB * length / 32768


def available() -> int:
    import psutil

    return psutil.virtual_memory().available


def run_one(path: str, length: int, cap: int, timeout: int) -> dict:
    import psutil

    need = estimate(path, length)
    room = min(cap, available() - int(1.5 * GiB))
    if need > room:
        return {"path": path, "length": length,
                "skipped": f"estimated {need / GiB:.1f} GB > {room / GiB:.1f} GB allowed"}
    proc = subprocess.Popen([sys.executable, __file__, "--child", path, str(length)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    watched, start, seen = psutil.Process(proc.pid), time.time(), 0
    while proc.poll() is None:
        try:
            seen = max(seen, watched.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        if seen > room or time.time() - start > timeout:
            proc.kill()
            proc.wait()
            why = "memory" if seen > room else "time"
            return {"path": path, "length": length,
                    "skipped": f"killed: {why} limit ({seen / GiB:.1f} GB, {time.time() - start:.0f} s)"}
        time.sleep(0.2)
    out, err = proc.communicate()
    if proc.returncode != 0:
        return {"path": path, "length": length, "skipped": f"failed: {err.strip().splitlines()[-1:]}"}
    return json.loads(out.strip().splitlines()[-1])


def table(results: list[dict], lengths: list[int], paths: list[str]) -> str:
    by = {(r["path"], r["length"]): r for r in results}
    head = "| tokens | " + " | ".join(f"{p} peak (GB) | {p} step (s)" for p in paths) + " |"
    lines = [head, "|" + "---|" * (1 + 2 * len(paths))]
    for n in lengths:
        cells = []
        for p in paths:
            r = by.get((p, n))
            if r is None or "skipped" in r:
                cells += ["skipped", "-"]
            else:
                cells += [f"{r['peak_bytes'] / 1e9:.2f}", f"{r['seconds']:.1f}"]
        lines.append(f"| {n // 1024}K | " + " | ".join(cells) + " |")
    notes = [f"- {r['path']} {r['length'] // 1024}K: {r['skipped']}" for r in results if "skipped" in r]
    return "\n".join(lines + ([""] + notes if notes else []))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--child", nargs=2, metavar=("PATH", "LENGTH"), help=argparse.SUPPRESS)
    parser.add_argument("--lengths", default="1024,2048,4096,8192,16384,32768")
    parser.add_argument("--paths", default=",".join(PATHS))
    parser.add_argument("--cap-gb", type=float, default=18.0, help="kill a configuration above this RSS")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per configuration")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]))
        return
    lengths = [int(x) for x in args.lengths.split(",")]
    paths = args.paths.split(",")
    results = []
    for n in lengths:
        for p in paths:
            r = run_one(p, n, int(args.cap_gb * GiB), args.timeout)
            results.append(r)
            shown = r.get("skipped") or f"{r['peak_bytes'] / 1e9:.2f} GB, {r['seconds']:.1f} s"
            print(f"{p:>5} {n:>6}: {shown}", flush=True)
    import platform

    import torch
    import transformers
    import trl

    print(f"\n{platform.machine()}, {os.cpu_count()} cores, OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS')}; torch {torch.__version__}, transformers "
          f"{transformers.__version__}, trl {trl.__version__}\n")
    print(table(results, lengths, paths))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
