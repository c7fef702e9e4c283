"""Model sections of the GPU suite: a 1B LoRA step at 32K-128K tokens, and RS-style generation.

- `lora_long_context`: one LoRA training step (forward, backward, AdamW) of a Llama-3.2-1B-shaped
  random model on one sequence of random tokens, every token a label, activation checkpointing
  on. Two paths on the same weights, adapter and tokens: "plain" (sdpa attention, transformers'
  own loss over the full (tokens, 128,256) logits) and "alignloop" (`alignloop_triton` attention
  and the fused linear + cross-entropy). The goal the docs state against it: 1B LoRA at 128K
  within 40 GB.
- `rs_generation`: rejection-sampling-shaped generation with transformers' `generate` (16 prompts
  x K=8 samples in one batch), and a bf16-vs-fp32 check of the generated tokens' log-probs.

Only torch, transformers, peft and `alignloop.kernels` are imported: the device image has no TRL,
pydantic or datasets. The dry run (CPU, Triton's interpreter) takes the same code paths on a tiny
model in fp32; its numbers mean nothing, but the two LoRA paths' losses must agree.
"""

from __future__ import annotations

import logging
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from benchmarks.gpu.common import Context, failure, peak_gib, release, reset_peak, synchronize

# Llama 3.2 1B (../shared/reference/llama3-post-training.md, section D) and a tiny stand-in.
LLAMA32_1B = dict(vocab_size=128256, hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                  num_key_value_heads=8, head_dim=64, intermediate_size=8192)
TINY = dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, intermediate_size=128)
# alignloop.models.tiny.LLAMA32_ROPE, copied: this file imports only what the device image has
# been checked for (torch, transformers, peft, alignloop.kernels).
LLAMA32_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
K = 1024


def model_config(ctx: Context) -> LlamaConfig:
    shape = TINY if ctx.dry_run else LLAMA32_1B
    return LlamaConfig(**shape, tie_word_embeddings=True, rms_norm_eps=1e-5, rope_parameters=LLAMA32_ROPE,
                       max_position_embeddings=131072, bos_token_id=0, eos_token_id=None,
                       pad_token_id=0)


def build_model(ctx: Context, seed: int = 0) -> LlamaForCausalLM:
    """The random model on ctx.device with sdpa attention: bf16 on a GPU, fp32 in the dry run.

    Built in its dtype, as from_pretrained(dtype=...) does: `.to(bf16)` afterwards would also
    round RoPE's fp32 inverse frequencies, which matters at 128K positions."""
    torch.manual_seed(seed)
    with torch.device(ctx.device):
        return AutoModelForCausalLM.from_config(model_config(ctx), attn_implementation="sdpa",
                                                dtype=torch.float32 if ctx.dry_run else torch.bfloat16)


def random_tokens(ctx: Context, shape: tuple[int, ...], vocab: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed)).to(ctx.device)


def _gib(device: str) -> float | None:
    peak = peak_gib(device)
    return None if peak is None else round(peak, 2)


# ---------------------------------------------------------------------------------------------
# LoRA at long context


def lora_long_context(ctx: Context) -> list[dict]:
    """Rows (section "lora_1b"): path, tokens, step_s, peak_gib, loss, loss_diff, status.

    Order: alignloop then plain at each length, so that the path that should fit runs first.
    Every configuration starts from the same adapter weights and a fresh AdamW; `loss_diff` (plain
    rows) is the plain loss minus the alignloop loss on the same tokens."""
    import alignloop.kernels

    alignloop.kernels.register()
    lengths = [64, 128] if ctx.dry_run else [32 * K, 64 * K, 128 * K]
    warmup_tokens = 32 if ctx.dry_run else 2 * K
    if ctx.out_of_time(_step_reserve_s(ctx, lengths[0])):  # not even worth building the model
        return [{"section": "lora_1b", "path": path, "tokens": tokens, "status": "skipped: out of time"}
                for tokens in lengths for path in ("alignloop", "plain")]
    model = _lora_model(ctx)
    start = _trainable_state(model)
    kernel_log = _KernelWarnings()
    logging.getLogger("alignloop.kernels").addHandler(kernel_log)
    rows, blocked, warmed, losses = [], {}, set(), {}
    try:
        for tokens in lengths:
            for path in ("alignloop", "plain"):
                row = {"section": "lora_1b", "path": path, "tokens": tokens, "step_s": None,
                       "peak_gib": None, "loss": None, "loss_diff": None}
                reserve = _step_reserve_s(ctx, tokens)
                if path in blocked:
                    row["status"] = f"skipped: {blocked[path]}"
                elif ctx.out_of_time(reserve):
                    row["status"] = f"skipped: out of time (needs ~{reserve:.0f} s)"
                else:
                    row.update(_lora_config(ctx, model, start, path, tokens,
                                            None if path in warmed else warmup_tokens, kernel_log))
                    warmed.add(path)
                if row["status"] == "ok":
                    losses[path, tokens] = row["loss"]
                    row["loss"] = round(row["loss"], 5)
                    if path == "plain" and ("alignloop", tokens) in losses:
                        row["loss_diff"] = float(f"{losses[path, tokens] - losses['alignloop', tokens]:.3g}")
                elif row["status"] == "oom" or row["status"].startswith("failed"):
                    blocked[path] = f"{row['status'].split(':')[0]} at {_length(tokens)}"
                rows.append(row)
    finally:
        logging.getLogger("alignloop.kernels").removeHandler(kernel_log)
        del model
        release(ctx.device)
    if kernel_log.messages:
        ctx.notes.append("lora_1b: alignloop.kernels warned: " + "; ".join(kernel_log.messages))
    return rows


def _length(tokens: int) -> str:
    return f"{tokens // K}K" if tokens >= K else f"{tokens} tokens"


def _step_reserve_s(ctx: Context, tokens: int) -> float:
    """A configuration's rough cost: attention is quadratic, and dominates at 128K (~40 s)."""
    return 5.0 if ctx.dry_run else 8.0 + 40.0 * (tokens / (128 * K)) ** 2


def _lora_model(ctx: Context):
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LORA_TARGETS,
                      task_type="CAUSAL_LM")
    model = build_model(ctx)
    model.config.use_cache = False
    # use_reentrant=False: the frozen embedding's output needs no requires_grad hook
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, lora)
    model.train()
    return model


def _trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def _restore(model, state: dict[str, torch.Tensor]) -> None:
    for n, p in model.named_parameters():
        if n in state:
            p.copy_(state[n])
    model.zero_grad(set_to_none=True)


def _lora_config(ctx: Context, model, start, path: str, tokens: int, warmup_tokens: int | None,
                 kernel_log: _KernelWarnings) -> dict:
    """One timed step of `path` at `tokens` (after a warm-up step at `warmup_tokens`, if given)."""
    vocab = model.config.vocab_size
    loss_fn = _fused_loss if path == "alignloop" else _plain_loss
    seen = len(kernel_log.messages)
    result: dict = {}
    try:
        model.get_base_model().set_attn_implementation("alignloop_triton" if path == "alignloop" else "sdpa")
        if warmup_tokens:
            _step(model, loss_fn, random_tokens(ctx, (1, warmup_tokens), vocab, seed=warmup_tokens))
            _restore(model, start)
        ids = random_tokens(ctx, (1, tokens), vocab, seed=tokens)  # (1, T), the same for both paths
        reset_peak(ctx.device)
        synchronize(ctx.device)
        t0 = time.perf_counter()
        loss = _step(model, loss_fn, ids)
        synchronize(ctx.device)
        result = {"step_s": round(time.perf_counter() - t0, 3), "peak_gib": _gib(ctx.device),
                  "loss": loss, "status": "ok"}
        fallback = [m for m in kernel_log.messages[seen:] if "using torch sdpa" in m]
        if path == "alignloop" and fallback:  # the numbers would be sdpa's, not the kernel's
            result["status"] = f"failed: attention fell back to sdpa ({fallback[0][:120]})"
    except Exception as err:  # noqa: BLE001 - a failed configuration is a row, not the end
        result = {"status": failure(err)}
    finally:
        _restore(model, start)
        release(ctx.device)  # the exception's frames are gone here: its tensors can go too
    return result


def _step(model, loss_fn, ids: torch.Tensor) -> float:
    """Forward, backward and one AdamW step on the adapter; returns the loss."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    loss = loss_fn(model, ids)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    value = loss.item()
    del loss, optimizer
    return value


def _plain_loss(model, ids: torch.Tensor) -> torch.Tensor:
    """transformers' forward with labels: full logits (1, T, V) and its shifted cross-entropy."""
    return model(input_ids=ids, labels=ids, use_cache=False).loss


def _fused_loss(model, ids: torch.Tensor) -> torch.Tensor:
    """The backbone to the last hidden state, then alignloop's fused linear + cross-entropy.

    What `alignloop.kernels.fused_head.install` routes `model(..., fused_lm_head=True)` to (its
    `fused_forward`), without its TRL output class: that import needs TRL, which the device
    image does not have. Same maths: per-token log-probs with the logging statistics, loss =
    -sum / number of labels."""
    from alignloop.kernels.fused_loss import linear_log_probs

    base = model.get_base_model()
    hidden = getattr(base, base.base_model_prefix)(input_ids=ids, use_cache=False).last_hidden_state  # (1, T, H)
    head = base.get_output_embeddings()
    targets = ids[:, 1:]  # (1, T-1): every next token is a label
    out = linear_log_probs(hidden[:, :-1], head.weight, targets, head.bias, stats=True, backend="triton")
    return -out.log_probs.sum() / targets.numel()


class _KernelWarnings(logging.Handler):
    """Collects alignloop.kernels' warnings (e.g. "...; using torch sdpa for these calls")."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


# ---------------------------------------------------------------------------------------------
# Generation


def rs_generation(ctx: Context) -> list[dict]:
    """Rows (section "generation"): backend "hf" (prompts, k, new_tokens, seconds, tokens_per_s),
    backend "vllm" (skipped, with why), and backend "logprob_check" (sequences, tokens,
    max_abs_diff, mean_abs_diff of the generated tokens' log-probs, bf16 vs fp32 forward)."""
    prompts, k, prompt_len, new = (2, 2, 8, 8) if ctx.dry_run else (16, 8, 64, 64)
    shape = {"prompts": prompts, "k": k, "new_tokens": new}
    hf = {"section": "generation", "backend": "hf", **shape, "seconds": None, "tokens_per_s": None}
    check = {"section": "generation", "backend": "logprob_check", **shape, "sequences": None,
             "max_abs_diff": None, "mean_abs_diff": None}
    vllm = {"section": "generation", "backend": "vllm", **shape, "status": (
        "skipped: vLLM's CUDA wheel (hundreds of MB) exceeds the device tool's 64 MiB carry limit "
        "and the image has no vLLM, so vLLM-CUDA generation and the vLLM log-prob guard on CUDA "
        "remain unmeasured")}
    if ctx.out_of_time(5.0 if ctx.dry_run else 30.0):
        why = "skipped: out of time (needs ~30 s)"
        return [{**hf, "status": why}, vllm, {**check, "status": why}]
    model, sequences = None, None
    try:
        model = build_model(ctx).eval()
        ids = random_tokens(ctx, (prompts, prompt_len), model.config.vocab_size, seed=1)  # (P, L)
        sequences, seconds = _generate(ctx, model, ids, k, new)  # (P*K, L+new)
        made = sequences.shape[1] - prompt_len
        hf.update(seconds=round(seconds, 3), tokens_per_s=round(prompts * k * made / seconds, 1),
                  status="ok" if made == new and sequences.shape[0] == prompts * k
                  else f"failed: got {sequences.shape[0]} x {made} new tokens, wanted {prompts * k} x {new}")
    except Exception as err:  # noqa: BLE001
        hf["status"] = failure(err)
    rows = [hf, vllm]
    if hf["status"] != "ok":
        rows.append({**check, "status": "skipped: generation failed"})
    elif ctx.out_of_time(3.0 if ctx.dry_run else 15.0):
        rows.append({**check, "status": "skipped: out of time (needs ~15 s)"})
    else:
        rows.append({**check, **_logprob_check(model, sequences[:8], prompt_len)})
    del model, sequences
    release(ctx.device)
    return rows


@torch.no_grad()
def _generate(ctx: Context, model, ids: torch.Tensor, k: int, new: int) -> tuple[torch.Tensor, float]:
    """All P*K samples in one batch, exactly `new` tokens each (no end-of-sequence token)."""
    options = dict(attention_mask=torch.ones_like(ids), do_sample=True, temperature=0.8, top_p=1.0,
                   top_k=0, num_return_sequences=k, eos_token_id=None, pad_token_id=0)
    model.generate(ids, max_new_tokens=2, **options)  # warm-up: kernels, cuBLAS handles, caches
    torch.manual_seed(0)
    synchronize(ctx.device)
    t0 = time.perf_counter()
    out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, **options)
    synchronize(ctx.device)
    return out, time.perf_counter() - t0


def _logprob_check(model, sequences: torch.Tensor, prompt_len: int) -> dict:
    """log p(generated token) from one forward pass in bf16 and in fp32 (the same bf16 weights).

    A numerics sanity figure for CUDA (how far bf16 log-probs sit from fp32 ones), not vLLM's
    guard, which compares vLLM's reported log-probs with transformers'."""
    try:
        if model.dtype != torch.bfloat16:  # the dry run's fp32 model (RoPE's buffer rounds too)
            model.to(torch.bfloat16)
        low = _token_logprobs(model, sequences, prompt_len)  # (B, new)
        high = _token_logprobs(model.float(), sequences, prompt_len)  # bf16 -> fp32 is exact
        diff = (low - high).abs()
        return {"sequences": sequences.shape[0], "max_abs_diff": round(diff.max().item(), 5),
                "mean_abs_diff": round(diff.mean().item(), 5), "status": "ok"}
    except Exception as err:  # noqa: BLE001
        return {"status": failure(err)}


@torch.no_grad()
def _token_logprobs(model, sequences: torch.Tensor, prompt_len: int) -> torch.Tensor:
    new = sequences.shape[1] - prompt_len
    # only the last new + 1 positions' logits: (B, new + 1, V), the last one predicts nothing
    logits = model(input_ids=sequences, use_cache=False, logits_to_keep=new + 1).logits[:, :-1]
    logp = torch.log_softmax(logits.float(), dim=-1)  # (B, new, V)
    return logp.gather(-1, sequences[:, prompt_len:, None])[..., 0]  # (B, new)
