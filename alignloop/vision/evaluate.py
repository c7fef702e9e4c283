"""Held-out answer accuracy of a vision model, and its answers to text-only prompts.

Greedy answers to `vision_prompt` records (each with an `answer`) are checked by a verifier of
`alignloop.reward.verifiers` (the shapes demo: exact one-word answers). The text-only
prompts are answered without images: with a frozen language model their tokens must not change
after adapter training (reference C2: "the model starts identical to Llama 3.1", and stays so
on text).
"""

from __future__ import annotations

import hashlib
from collections import defaultdict

import torch


def evaluate(model, tokenizer, processor, records: list[dict],
             section) -> tuple[dict, list[dict], list[dict]]:
    """(metrics, one answer row per record, one row per text prompt) for `section`
    (VisionEvaluation: task, max_new_tokens, batch_size, text_prompts)."""
    from alignloop.reward.verifiers import resolve_verifier
    from alignloop.vision.data import VisionCollator

    verify = resolve_verifier(section.task)
    collator = VisionCollator(tokenizer, processor, "vision_prompt")
    from alignloop.vision.llama3v import Llama3V, Llama3VCollator

    if isinstance(model, Llama3V):  # image tokens in the text, features computed live
        collator = Llama3VCollator(tokenizer, processor, model.image_tokens, "vision_prompt")
    answers = []
    for i in range(0, len(records), section.batch_size):
        chunk = records[i:i + section.batch_size]
        responses = _generate(model, tokenizer, collator(chunk), section.max_new_tokens)
        for record, response in zip(chunk, responses):
            task = (record.get("metadata") or {}).get("task", section.task)
            answers.append({"prompt_id": record["prompt_id"], "task": task, "answer": record["answer"],
                            "response": response, "correct": bool(verify(record, response))})
    by_task = defaultdict(list)
    for row in answers:
        by_task[row["task"]].append(row["correct"])
    metrics = {"accuracy": sum(r["correct"] for r in answers) / max(len(answers), 1),
               "count": len(answers),
               "by_task": {task: sum(v) / len(v) for task, v in sorted(by_task.items())}}
    return metrics, answers, text_answers(model, tokenizer, section.text_prompts, section.max_new_tokens)


def text_answers(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[dict]:
    """Greedy answers to text-only chat prompts, with their token ids and a hash of the prompt's
    logits."""
    rows = []
    for prompt in prompts:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        tokens = _generate(model, tokenizer, {"input_ids": ids}, max_new_tokens, decode=False)[0]
        with torch.no_grad():  # the prompt's logits, bit for bit (a frozen LM must not move them)
            logits = model(ids.to(model.device)).logits.float().cpu().numpy()
        rows.append({"prompt": prompt, "tokens": tokens,
                     "response": tokenizer.decode(tokens, skip_special_tokens=True),
                     "logits_sha256": hashlib.sha256(logits.tobytes()).hexdigest()})
    return rows


@torch.no_grad()
def _generate(model, tokenizer, batch: dict, max_new_tokens: int, decode: bool = True) -> list:
    batch = {k: v.to(model.device) for k, v in batch.items()
             if k != "labels" and isinstance(v, torch.Tensor)}  # not Llama 3-V's image_keys
    eos = model.language_model.generation_config.eos_token_id or tokenizer.eos_token_id
    out = model.generate(**batch, max_new_tokens=max_new_tokens, eos_token_id=eos,
                         pad_token_id=tokenizer.pad_token_id)
    new = out[:, batch["input_ids"].shape[1]:].tolist()
    eos_ids = set([eos] if isinstance(eos, int) else eos)
    cut = [row[:next((i for i, t in enumerate(row) if t in eos_ids), len(row))] for row in new]
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in cut] if decode else cut
