"""Batch chat generation with transformers' `generate` (vLLM arrives with rejection sampling).

Prompts are chat message lists; each is rendered with the tokenizer's chat template plus the
assistant header, left-padded into batches, and sampled `n` times. Rows written to disk carry
`prompt_id`, `sample_id` and the settings that produced them, never a row position.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

logger = logging.getLogger("alignloop.generation")


@dataclass
class SamplingSettings:
    n: int = 1
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int = 0


def generate(model, tokenizer, prompts: list[list[dict]], settings: SamplingSettings,
             batch_size: int = 16, progress: bool = True) -> list[list[str]]:
    """For each prompt, `settings.n` completions (decoded text without special tokens)."""
    samples = generate_samples(model, tokenizer, prompts, settings, batch_size, progress)
    return [[s.text for s in group] for group in samples]


@torch.no_grad()
def generate_samples(model, tokenizer, prompts: list[list[dict]], settings: SamplingSettings,
                     batch_size: int = 16, progress: bool = True):
    """For each prompt, `settings.n` Samples (text, token ids, per-token log-probs, finish reason)."""
    from alignloop.generation.backends import Sample

    if settings.n > 1 and settings.temperature == 0:
        raise ValueError("n > 1 samples with temperature 0 would repeat the same greedy answer; "
                         "set a temperature > 0")
    torch.manual_seed(settings.seed)
    device = next(model.parameters()).device
    eos = _stop_tokens(model, tokenizer)
    out: list[list[str]] = []
    bar = tqdm(total=len(prompts), desc="generating", unit="prompt", disable=not progress)
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        ids = [tokenizer.apply_chat_template(p, tokenize=True, add_generation_prompt=True,
                                             return_dict=True)["input_ids"] for p in batch]
        input_ids, attention = _left_pad(ids, tokenizer.pad_token_id)
        sampled = model.generate(
            input_ids=input_ids.to(device), attention_mask=attention.to(device),
            max_new_tokens=settings.max_new_tokens, do_sample=settings.temperature > 0,
            temperature=settings.temperature if settings.temperature > 0 else None,
            top_p=settings.top_p if settings.temperature > 0 else None,
            num_return_sequences=settings.n, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id,
            output_logits=True, return_dict_in_generate=True)
        # log-probs of the model itself (before temperature / top-p), per sampled token
        logits = torch.stack(sampled.logits, dim=1)  # (B*n, T, V)
        completion = sampled.sequences[:, input_ids.shape[1]:]  # (B*n, T)
        logprobs = torch.log_softmax(logits.float(), -1).gather(-1, completion[..., None])[..., 0]
        group = []
        for row in range(completion.shape[0]):
            ids = completion[row].tolist()
            stop = next((i for i, t in enumerate(ids) if t in eos), None)
            end = len(ids) if stop is None else stop + 1
            group.append(Sample(text=tokenizer.decode(ids[:end], skip_special_tokens=True),
                                token_ids=ids[:end], logprobs=logprobs[row, :end].tolist(),
                                finish_reason="length" if stop is None else "stop"))
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
    """End of turn and end of text: a chat answer stops at whichever comes first."""
    stops = {tokenizer.eos_token_id}
    configured = getattr(model.generation_config, "eos_token_id", None)
    stops.update(configured if isinstance(configured, list) else [configured])
    for token in ("<|eot_id|>", "<|end_of_text|>", "<|eom_id|>"):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
            stops.add(token_id)
    return sorted(t for t in stops if t is not None)


def completion_rows(prompt_records: list[dict], completions: list[list[str]],
                    settings: SamplingSettings, generator: str) -> list[dict]:
    """JSONL rows: one per sample, keyed by prompt_id and sample_id, with what produced it."""
    rows = []
    for record, samples in zip(prompt_records, completions):
        for k, text in enumerate(samples):
            rows.append({"prompt_id": record["prompt_id"], "sample_id": f"{record['prompt_id']}:{k}",
                         "prompt": record["prompt"], "completion": text,
                         "generator": {"model": generator, **asdict(settings)}})
    return rows
