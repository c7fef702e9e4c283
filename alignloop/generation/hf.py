"""Batch generation with transformers' `generate` (the `hf` backend of backends.py).

`generate_samples`: chat prompts (message lists), each rendered with the tokenizer's chat
template plus the assistant header, left-padded into batches, and sampled `n` times; each sample
keeps its token ids and the model's own log-prob of each (raw logits, before temperature and
top-p: what vLLM reports too, so that alignloop.generation.logprobs can compare them).
`sample_batches`: the same loop over batches the caller builds, e.g. Mllama batches with images
(vision rejection sampling and evaluation), for a model the caller holds. Rows written to disk
carry `prompt_id`, `sample_id` and the settings that produced them, never a row position.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import Callable

import torch
from tqdm.auto import tqdm

from alignloop.generation.common import (Sample, SamplingSettings, check_settings, cut_at_stop,
                                         render, stop_token_ids)
from alignloop.generation.logprobs import token_logprobs

logger = logging.getLogger("alignloop.generation")

__all__ = ["SamplingSettings", "generate", "generate_samples", "sample_batches", "completion_rows"]


def generate(model, tokenizer, prompts: list[list[dict]], settings: SamplingSettings,
             batch_size: int = 16, progress: bool = True) -> list[list[str]]:
    """For each prompt, `settings.n` completions (decoded text without special tokens)."""
    samples = generate_samples(model, tokenizer, prompts, settings, batch_size, progress)
    return [[s.text for s in group] for group in samples]


def generate_samples(model, tokenizer, prompts: list[list[dict]], settings: SamplingSettings,
                     batch_size: int = 16, progress: bool = True) -> list[list[Sample]]:
    """For each chat prompt (a message list), `settings.n` Samples (text, token ids, per-token
    log-probs, finish reason). Each prompt is rendered with the tokenizer's chat template and the
    assistant header; a batch is left-padded."""
    def build(chunk: list[list[dict]]) -> dict:
        input_ids, attention = _left_pad(render(tokenizer, chunk), tokenizer.pad_token_id)
        return {"input_ids": input_ids, "attention_mask": attention}

    return sample_batches(model, tokenizer, prompts, settings, build, batch_size, progress,
                          logprobs=True)


@torch.no_grad()
def sample_batches(model, tokenizer, prompts: list, settings: SamplingSettings,
                   build_batch: Callable[[list], dict], batch_size: int = 16, progress: bool = True,
                   logprobs: bool = False) -> list[list[Sample]]:
    """For each prompt, `settings.n` Samples from `model.generate`, over batches the caller builds.

    `build_batch(chunk)` turns up to `batch_size` prompts (anything: message lists, vision prompt
    records) into one left-padded batch: input_ids (B, L) and attention_mask (B, L), plus whatever
    else the model's `generate` takes, e.g. an Mllama batch's pixel_values (B, N, T, 3, H, W),
    aspect_ratio_ids (B, N), aspect_ratio_mask (B, N, T) and cross_attention_mask (B, L, N, T)
    (alignloop/vision/data.py's collator), or Llama 3-V's cached image features. `labels` and
    values that are not tensors are left out. Every batch stops on the same ids (stop_token_ids).
    The call draws from its own RNG, seeded once with `settings.seed` (forked: the caller's
    generator is left as it was), so a rerun draws the same samples. Sampling is transformers'
    with the model's generation_config, which includes its default top_k (50; vLLM has none, see
    docs/generation.md). With `logprobs`, a second forward pass over prompt + completion
    gives each sampled token's raw log-prob (text batches only: it passes no image inputs);
    otherwise `Sample.logprobs` is None.
    """
    check_settings(settings)
    device = next(model.parameters()).device
    stops = _stop_tokens(model, tokenizer)
    sampling = (dict(do_sample=True, temperature=settings.temperature, top_p=settings.top_p)
                if settings.temperature > 0 else dict(do_sample=False, temperature=None, top_p=None))
    out: list[list[Sample]] = []
    bar = tqdm(total=len(prompts), desc="generating", unit="prompt", disable=not progress)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(settings.seed)
        for start in range(0, len(prompts), batch_size):
            out += _sample_batch(model, tokenizer, build_batch(prompts[start:start + batch_size]),
                                 settings, sampling, stops, logprobs, batch_size)
            bar.update(min(batch_size, len(prompts) - start))
    bar.close()
    return out


def _sample_batch(model, tokenizer, batch: dict, settings: SamplingSettings, sampling: dict,
                  stops: list[int], logprobs: bool, batch_size: int) -> list[list[Sample]]:
    """`settings.n` Samples for each row of one built batch."""
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items() if k != "labels" and isinstance(v, torch.Tensor)}
    sampled = model.generate(**batch, **sampling, num_return_sequences=settings.n,
                             max_new_tokens=settings.max_new_tokens, eos_token_id=stops,
                             pad_token_id=tokenizer.pad_token_id)  # (B * n, L + new)
    width = batch["input_ids"].shape[1]
    completions = [cut_at_stop(row, stops) for row in sampled[:, width:].tolist()]
    scores = (_logprobs(model, tokenizer, batch, completions, settings.n, batch_size)
              if logprobs else [None] * len(completions))
    group = [Sample(text=tokenizer.decode(ids, skip_special_tokens=True), token_ids=ids,
                    logprobs=lp, finish_reason=reason)
             for (ids, reason), lp in zip(completions, scores)]
    return [group[i:i + settings.n] for i in range(0, len(group), settings.n)]  # rows b*n..


def _logprobs(model, tokenizer, batch: dict, completions, n: int, batch_size: int) -> list[list[float]]:
    """The model's raw log-prob of each sampled token (what vLLM reports), from a second forward
    pass over the unpadded prompt + completion; generate's output_logits would hold
    (B * n, T, vocab) floats at once."""
    prompts = [row[mask.bool()].tolist() for row, mask in zip(batch["input_ids"], batch["attention_mask"])]
    return token_logprobs(model, [ids for ids in prompts for _ in range(n)],
                          [ids for ids, _ in completions], pad_id=tokenizer.pad_token_id,
                          batch_size=batch_size)


def _left_pad(ids: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)  # (B, T)
    attention = torch.zeros((len(ids), width), dtype=torch.long)
    for row, seq in enumerate(ids):
        input_ids[row, width - len(seq):] = torch.tensor(seq)
        attention[row, width - len(seq):] = 1
    return input_ids, attention


def _stop_tokens(model, tokenizer) -> list[int]:
    """stop_token_ids with the model's generation_config eos (a model without one, e.g. our
    cross-attention VisionLlama, stops on the tokenizer's and the chat template's end tokens)."""
    return stop_token_ids(tokenizer, getattr(getattr(model, "generation_config", None), "eos_token_id", None))


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
