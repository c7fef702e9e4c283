"""Held-out answer accuracy of a vision model, and its answers to text-only prompts.

Answers are greedy, drawn by alignloop.generation.hf.sample_batches (the stop tokens of every
other sampler). The answers to `vision_prompt` records (each with an `answer`) are checked by a
verifier of `alignloop.reward.verifiers` (the shapes demo: exact one-word answers). The text-only
prompts are answered without images: with a frozen language model their tokens must not change
after adapter training (reference C2: "the model starts identical to Llama 3.1", and stays so
on text).
"""

from __future__ import annotations

import hashlib
from collections import defaultdict

import torch

from alignloop.generation.common import SamplingSettings
from alignloop.generation.hf import sample_batches


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
    greedy = SamplingSettings(max_new_tokens=section.max_new_tokens)
    answers = []
    drawn = sample_batches(model, tokenizer, records, greedy, collator, section.batch_size, progress=False)
    for record, (sample,) in zip(records, drawn):
        response = sample.text.strip()
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
    encoded = [tokenizer(tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                       tokenize=False, add_generation_prompt=True),
                         add_special_tokens=False, return_tensors="pt")["input_ids"]  # (1, L)
               for prompt in prompts]
    drawn = sample_batches(model, tokenizer, encoded, SamplingSettings(max_new_tokens=max_new_tokens),
                           lambda chunk: {"input_ids": chunk[0]}, batch_size=1, progress=False)
    rows = []
    for prompt, ids, (sample,) in zip(prompts, encoded, drawn):
        # the answer's tokens without the stop token, as text.json has always held them
        tokens = sample.token_ids[:-1] if sample.finish_reason == "stop" else sample.token_ids
        with torch.no_grad():  # the prompt's logits, bit for bit (a frozen LM must not move them)
            logits = model(ids.to(model.device)).logits.float().cpu().numpy()
        rows.append({"prompt": prompt, "tokens": tokens,
                     "response": tokenizer.decode(tokens, skip_special_tokens=True),
                     "logits_sha256": hashlib.sha256(logits.tobytes()).hexdigest()})
    return rows
