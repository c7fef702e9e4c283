"""Batch chat generation with transformers' `generate` (the `hf` backend of backends.py).

Prompts are chat message lists; each is rendered with the tokenizer's chat template plus the
assistant header, left-padded into batches, and sampled `n` times. Each sample keeps its token
ids and the model's own log-prob of each (raw logits, before temperature and top-p: what vLLM
reports too, so that alignloop.generation.logprobs can compare them). Rows written to disk carry
`prompt_id`, `sample_id` and the settings that produced them, never a row position.
"""

from __future__ import annotations

import logging
from dataclasses import asdict

import torch
from tqdm.auto import tqdm

from alignloop.generation.common import (SamplingSettings, check_settings, cut_at_stop, render,
                                         stop_token_ids)
from alignloop.generation.logprobs import token_logprobs

logger = logging.getLogger("alignloop.generation")

__all__ = ["SamplingSettings", "generate", "generate_samples", "completion_rows"]


def generate(model, tokenizer, prompts: list[list[dict]], settings: SamplingSettings,
             batch_size: int = 16, progress: bool = True) -> list[list[str]]:
    """For each prompt, `settings.n` completions (decoded text without special tokens)."""
    samples = generate_samples(model, tokenizer, prompts, settings, batch_size, progress)
    return [[s.text for s in group] for group in samples]


@torch.no_grad()
def generate_samples(model, tokenizer, prompts: list[list[dict]], settings: SamplingSettings,
                     batch_size: int = 16, progress: bool = True):
    """For each prompt, `settings.n` Samples (text, token ids, per-token log-probs, finish reason)."""
    from alignloop.generation.common import Sample

    check_settings(settings)
    torch.manual_seed(settings.seed)
    device = next(model.parameters()).device
    stops = _stop_tokens(model, tokenizer)
    out: list[list[Sample]] = []
    bar = tqdm(total=len(prompts), desc="generating", unit="prompt", disable=not progress)
    for start in range(0, len(prompts), batch_size):
        batch = render(tokenizer, prompts[start:start + batch_size])
        input_ids, attention = _left_pad(batch, tokenizer.pad_token_id)
        sampled = model.generate(
            input_ids=input_ids.to(device), attention_mask=attention.to(device),
            max_new_tokens=settings.max_new_tokens, do_sample=settings.temperature > 0,
            temperature=settings.temperature if settings.temperature > 0 else None,
            top_p=settings.top_p if settings.temperature > 0 else None,
            num_return_sequences=settings.n, eos_token_id=stops, pad_token_id=tokenizer.pad_token_id)
        completions = [cut_at_stop(row, stops) for row in sampled[:, input_ids.shape[1]:].tolist()]
        # A second forward pass gives the model's raw log-prob of each sampled token (what vLLM
        # reports); generate's output_logits would hold (B*n, T, vocab) floats at once.
        logprobs = token_logprobs(model, [ids for ids in batch for _ in range(settings.n)],
                                  [ids for ids, _ in completions], pad_id=tokenizer.pad_token_id,
                                  batch_size=batch_size)
        group = [Sample(text=tokenizer.decode(ids, skip_special_tokens=True), token_ids=ids,
                        logprobs=lp, finish_reason=reason)
                 for (ids, reason), lp in zip(completions, logprobs)]
        out += [group[i * settings.n:(i + 1) * settings.n] for i in range(len(batch))]
        bar.update(len(batch))
    bar.close()
    return out


def _left_pad(ids: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)  # (B, T)
    attention = torch.zeros((len(ids), width), dtype=torch.long)
    for row, seq in enumerate(ids):
        input_ids[row, width - len(seq):] = torch.tensor(seq)
        attention[row, width - len(seq):] = 1
    return input_ids, attention


def _stop_tokens(model, tokenizer) -> list[int]:
    return stop_token_ids(tokenizer, getattr(model.generation_config, "eos_token_id", None))


def completion_rows(prompt_records: list[dict], completions: list[list], settings: SamplingSettings,
                    generator: str | dict) -> list[dict]:
    """JSONL rows: one per sample, keyed by prompt_id and sample_id, with what produced it.

    `completions`: per prompt, texts or Samples (these add `finish_reason`); `generator`: the
    model's name, or a generator's `describe()`.
    """
    producer = generator if isinstance(generator, dict) else {"model": generator}
    rows = []
    for record, samples in zip(prompt_records, completions):
        for k, sample in enumerate(samples):
            row = {"prompt_id": record["prompt_id"], "sample_id": f"{record['prompt_id']}:{k}",
                   "prompt": record["prompt"], "completion": getattr(sample, "text", sample),
                   "generator": {**producer, **asdict(settings)}}
            if hasattr(sample, "finish_reason"):
                row["finish_reason"] = sample.finish_reason
            rows.append(row)
    return rows
