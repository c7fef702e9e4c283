"""The Llama 3-V variant on the shapes demo: held-out exact accuracy before and after training.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/llama3v_shapes.py [--steps 600] [--tasks colour,side]
        [--train-encoder]

The tiny Llama and a tiny random SigLIP; features are precomputed into a FeatureCache and
training reads the cache (the encoder frozen), unless --train-encoder computes them live. Prints
the accuracy per task before and after; docs/vision.md ("Llama 3-V variant") records the numbers.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's alignloop, also when run from another worktree


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--tasks", default="colour,shape,side")
    parser.add_argument("--train-count", type=int, default=3000)
    parser.add_argument("--heldout-count", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--train-encoder", action="store_true")
    args = parser.parse_args()

    import torch
    from torch.utils.data import DataLoader
    from transformers import AutoTokenizer, LlamaForCausalLM

    from alignloop.data.contracts import validate_record
    from alignloop.models.tiny import build_tiny
    from alignloop.data.tasks import shapes
    from alignloop.vision.data import image_paths, image_token_id
    from alignloop.vision.llama3v import (FeatureCache, Llama3V, Llama3VCollator, image_processor,
                                          tiny_encoder, train)

    tasks = tuple(args.tasks.split(","))
    tiny = build_tiny()
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    torch.manual_seed(0)
    model = Llama3V(LlamaForCausalLM.from_pretrained(tiny), tiny_encoder(), image_token_id(tokenizer))
    processor = image_processor(model.encoder)
    train_records = [validate_record(r, "vision_chat")
                     for r in shapes.records("train", args.train_count, 0, tasks=tasks)]
    heldout = [validate_record(r, "vision_prompt")
               for r in shapes.records("heldout", args.heldout_count, 0, kind="prompt", tasks=tasks)]

    cache = None
    if not args.train_encoder:
        cache = FeatureCache(Path(tempfile.mkdtemp()) / "features", model.encoder, processor)
        start = time.perf_counter()
        count = cache.precompute([p for r in train_records for p in image_paths(r)])
        print(f"precomputed {count} pictures' features in {time.perf_counter() - start:.1f} s")

    def accuracy() -> str:
        collate = Llama3VCollator(tokenizer, processor, model.image_tokens, kind="vision_prompt")
        eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
        by_task = defaultdict(list)
        for i in range(0, len(heldout), 50):
            chunk = heldout[i:i + 50]
            batch = collate(chunk)
            out = model.generate(batch["input_ids"], batch["attention_mask"],
                                 pixel_values=batch["pixel_values"], max_new_tokens=4,
                                 do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=eot)
            for record, tokens in zip(chunk, out[:, batch["input_ids"].shape[1]:]):  # new tokens
                answer = tokenizer.decode(tokens, skip_special_tokens=True)
                by_task[record["metadata"]["task"]].append(shapes.check(answer, record["answer"]))
        total = sum(sum(v) for v in by_task.values()) / len(heldout)
        return f"{total:.2f} (" + ", ".join(f"{t} {sum(v) / len(v):.2f}" for t, v in sorted(by_task.items())) + ")"

    print("held-out accuracy before:", accuracy())
    loader = DataLoader(train_records, batch_size=args.batch_size, shuffle=True,
                        collate_fn=Llama3VCollator(tokenizer, processor, model.image_tokens,
                                                   pixels=cache is None))
    start = time.perf_counter()
    losses = train(model, loader, args.steps, lr=args.lr, cache=cache, train_lm=True,
                   train_encoder=args.train_encoder)
    print(f"{args.steps} steps in {time.perf_counter() - start:.0f} s; loss "
          f"{sum(losses[:10]) / 10:.3f} -> {sum(losses[-10:]) / 10:.3f}")
    print("held-out accuracy after:", accuracy())


if __name__ == "__main__":
    main()
