"""The guard against stale weights: does the generator sample from the model we think it does?

A generator reports, for each sampled token, the log-prob its weights gave that token. Here
transformers recomputes the same numbers in fp32 from `model_dir` (prompt + earlier sampled
tokens, one forward pass) and compares. Weights that are stale (a server still serving last
round's policy), or the base without its adapter, give different numbers: the check fails.

Like for like: vLLM reports *raw* log-probs (`logprobs_mode="raw_logprobs"`, its default in 0.32,
which our backends also set explicitly): log_softmax of the model's logits before temperature,
top-p or any logits processor (vllm/v1/sample/sampler.py). The hf backend reports the same
quantity, and so do we here. docs/generation.md derives the tolerances.
"""

from __future__ import annotations

import math

from alignloop.generation.common import load_tokenizer, render, resolve_model
from alignloop.pipeline.errors import StageError

# |generator - transformers fp32| per token, for weights that are the same. fp32 generators differ
# from the fp32 recomputation only by summation order (measured on the tiny Llama: < 1e-5, see
# docs/generation.md); bf16/fp16 weights and activations round every product to 8/11 mantissa bits
# and the log-probs drift by ~1e-2 (measured below 0.05). Different weights move them by far more
# (a LoRA adapter on the tiny Llama: 0.3 on average).
TOLERANCE = {"float32": 1e-3, "bfloat16": 0.1, "float16": 0.1}


class StalePolicyError(StageError):
    """The generator's log-probs are not those of the model it was asked to sample from."""


def check_logprobs(model_dir, prompts: list[list[dict]], samples, tolerance: float, *,
                   checker: "LogprobChecker | None" = None) -> dict:
    """Recompute the log-prob of every sampled token with transformers (fp32) and compare.

    prompts: chat message lists; samples: per prompt, the Samples drawn from it (as
    `Generator.generate` returns them). Returns {max_abs_diff, mean_abs_diff, tokens, samples,
    tolerance, ok}; `ok` is max_abs_diff <= tolerance.
    """
    checker = checker or LogprobChecker(model_dir)
    pairs = [(p, s) for p, group in zip(prompts, samples, strict=True) for s in group]
    missing = [s for _, s in pairs if s.logprobs is None]
    if missing:
        raise StalePolicyError(f"{model_dir}: the generator reported no log-probs for "
                               f"{len(missing)} of {len(pairs)} samples; the check needs them")
    expected = checker.logprobs([p for p, _ in pairs], [s.token_ids for _, s in pairs])
    diffs = [abs(a - b) for (_, s), ref in zip(pairs, expected) for a, b in zip(s.logprobs, ref)]
    worst = max(diffs, default=0.0)
    return {"max_abs_diff": worst, "mean_abs_diff": sum(diffs) / max(len(diffs), 1),
            "tokens": len(diffs), "samples": len(pairs), "tolerance": tolerance,
            "ok": not math.isnan(worst) and worst <= tolerance}


def raise_if_stale(model_dir, prompts, samples, tolerance: float, *, checker=None) -> dict:
    """`check_logprobs`, raising StalePolicyError when the difference exceeds `tolerance`."""
    report = check_logprobs(model_dir, prompts, samples, tolerance, checker=checker)
    if not report["ok"]:
        raise StalePolicyError(
            f"{model_dir}: the generator's log-probs differ from this model's by up to "
            f"{report['max_abs_diff']:.4g} (mean {report['mean_abs_diff']:.4g}, over "
            f"{report['tokens']} tokens of {report['samples']} samples; tolerance {tolerance:g}): "
            "it is sampling from other weights (a server started on another checkpoint, a stale "
            "engine, the base without the adapter). Restart the generator on this model, or "
            "raise generation.logprob_tolerance if the dtype explains the gap")
    return report


class LogprobChecker:
    """`model_dir` in transformers, fp32 on the CPU (it must not compete with the generator for
    GPU memory; it only scores a few samples). Loaded once, reused across calls."""

    def __init__(self, model_dir, batch_size: int = 8):
        import torch
        from transformers import AutoModelForCausalLM

        ref = resolve_model(model_dir)
        self.tokenizer = load_tokenizer(ref)
        if ref.adapter is None:
            model = AutoModelForCausalLM.from_pretrained(ref.base, dtype=torch.float32)
        else:
            try:
                from peft import PeftModel
            except ImportError as err:
                raise StalePolicyError(f"{model_dir}: checking an adapter's log-probs needs peft "
                                       "in this Python environment (pip install peft)") from err
            base = AutoModelForCausalLM.from_pretrained(ref.base, dtype=torch.float32)
            model = PeftModel.from_pretrained(base, ref.adapter)
        self.model, self.batch_size = model.eval(), batch_size

    def logprobs(self, prompts: list[list[dict]], completions: list[list[int]]) -> list[list[float]]:
        return token_logprobs(self.model, render(self.tokenizer, prompts), completions,
                              pad_id=self.tokenizer.pad_token_id or 0, batch_size=self.batch_size)


def token_logprobs(model, prompts: list[list[int]], completions: list[list[int]], *,
                   pad_id: int, batch_size: int = 8) -> list[list[float]]:
    """log p(completion[t] | prompt, completion[:t]) for each pair, in one forward pass per batch.

    Sequences are left-padded so that they all end at the last position; only the logits of the
    last (longest completion + 1) positions are computed (`logits_to_keep`), so memory is
    batch x completion length x vocabulary, never the prompt's.
    """
    import torch

    device = next(model.parameters()).device
    out: list[list[float]] = []
    for start in range(0, len(prompts), batch_size):
        chunk = slice(start, start + batch_size)
        seqs = [p + c for p, c in zip(prompts[chunk], completions[chunk])]
        lengths = [len(c) for c in completions[chunk]]
        width, keep = max(map(len, seqs)), max(lengths) + 1
        ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)  # (B, L)
        mask = torch.zeros_like(ids)
        for row, seq in enumerate(seqs):
            ids[row, width - len(seq):], mask[row, width - len(seq):] = torch.tensor(seq), 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, L): 0 at each prompt's first token
        with torch.no_grad():
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                           position_ids=positions.to(device), logits_to_keep=keep).logits  # (B, keep, V)
        # logits[:, j] predicts token L - keep + j + 1; a completion of length n ends at L - 1
        logp = torch.log_softmax(logits[:, :-1].float(), -1)  # (B, keep - 1, V)
        targets = ids[:, width - keep + 1:].to(device)  # (B, keep - 1)
        picked = logp.gather(-1, targets[..., None])[..., 0].cpu()  # (B, keep - 1)
        out += [picked[row, picked.shape[1] - n:].tolist() if n else [] for row, n in enumerate(lengths)]
    return out
