"""Expert LoRA on a Mixture-of-Experts model: alignloop's kernel vs peft's target_parameters path,
with attention-only LoRA as the floor (issue 15, docs/moe.md).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/moe_lora.py --steps 25   # docs/benchmarks.md
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/moe_lora.py --batch 1 --tokens 16

(One thread on a shared machine: with two threads on the 2 busy cores of the development machine
every arm ran 10-30x slower and the ratios drifted from run to run.)

One random Qwen3-MoE (8 routed experts, 2 per token, hidden 256, expert width 512, 4 layers,
vocabulary 1,024), fp32, LoRA rank 16 on q/k/v/o in every arm, and:

- attention only: the experts frozen, untouched (the memory floor);
- peft: + a LoRA per expert on gate_up_proj and down_proj through peft 0.21's target_parameters
  (transformers' grouped_mm experts computing with W + BA);
- alignloop: the same adapter, computed by alignloop_lora (x A B per expert, no W + BA).

Per arm: what autograd saves for the backward of one step (alignloop.models.memory.SavedTensors:
every saved storage once, the parameters left out), and the time of a training step (forward,
backward, AdamW), the median of `--steps` steps after one warm-up, the arms interleaved step by
step so that a busy machine slows them alike. The first step's losses of peft and alignloop must
agree (the same adapter): the script stops if they do not.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from alignloop.kernels import moe_lora  # noqa: E402
from alignloop.models.memory import SavedTensors  # noqa: E402

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def build(args, arm: str):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    config = Qwen3MoeConfig(vocab_size=1024, hidden_size=args.hidden, num_hidden_layers=args.layers,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=args.hidden // 4,
                            moe_intermediate_size=args.width, intermediate_size=2 * args.width,
                            num_experts=args.experts, num_experts_per_tok=2, decoder_sparse_step=1)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    lora = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules=ATTENTION,
                      target_parameters=None if arm == "attention only" else EXPERTS)
    model = get_peft_model(model, lora)
    generator = torch.Generator().manual_seed(1)
    for name, param in model.named_parameters():  # a trained-looking adapter: B != 0
        if "lora_B" in name:
            param.data = torch.randn(param.shape, generator=generator) * 0.02
    if arm == "alignloop":
        assert moe_lora.install(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return model.train(), optimizer


def step(model, optimizer, ids) -> tuple[float, int, float]:
    """(seconds, bytes saved for backward, loss) of one training step."""
    start = time.perf_counter()
    with SavedTensors(model.parameters()) as saved:
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start, saved.bytes, loss.item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=9)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()

    arms = ["attention only", "peft", "alignloop"]
    built = {arm: build(args, arm) for arm in arms}
    ids = torch.randint(0, 1024, (args.batch, args.tokens), generator=torch.Generator().manual_seed(0))
    times, saved, first = {a: [] for a in arms}, {}, {}
    for i in range(args.steps + 1):
        for arm in arms:
            seconds, nbytes, loss = step(*built[arm], ids)
            if i == 0:  # warm-up: memory and the loss check only
                saved[arm], first[arm] = nbytes, loss
            else:
                times[arm].append(seconds)
    if abs(first["peft"] - first["alignloop"]) > 1e-5 * abs(first["peft"]):
        raise SystemExit(f"peft's and alignloop's first losses differ: {first}")

    weights = args.layers * args.experts * 3 * args.hidden * args.width * 4
    print(f"{args.layers} layers x {args.experts} experts (hidden {args.hidden}, width {args.width}; "
          f"expert weights {weights / 2**20:.1f} MiB fp32), rank {args.rank}, "
          f"{args.batch} x {args.tokens} tokens, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {date.today()}")
    print(f"first-step loss: peft {first['peft']:.6f}, alignloop {first['alignloop']:.6f}\n")
    print("| LoRA on | saved for backward (MiB) | vs attention only | step (s), median | vs peft |")
    print("|---|---|---|---|---|")
    floor, peft_time = saved["attention only"], statistics.median(times["peft"])
    for arm in arms:
        median = statistics.median(times[arm])
        print(f"| {arm} | {saved[arm] / 2**20:.1f} | {saved[arm] / floor:.2f}x | {median:.3f} | "
              f"{median / peft_time:.2f}x |")


if __name__ == "__main__":
    main()
