"""Shared by tests/test_generation.py and tests/test_vllm.py: a LoRA adapter that changes the
tiny Llama's outputs, prompts, and an independent log-prob reference."""

from pathlib import Path

PROMPTS = [[{"role": "user", "content": f"What is {a} + {b}?"}]
           for a, b in [(12, 7), (103, 250), (5, 5), (77, 8), (640, 99)]]


def make_adapter(base: Path, out: Path, std: float = 0.05) -> Path:
    """A rank-8 LoRA on every linear layer of `base`, saved with the tokenizer (as a stage saves
    one). peft initialises B to zero (the adapter would change nothing); B ~ N(0, std) instead.
    With std 0.05 the tiny Llama's per-token log-probs move by ~0.2 on average (measured)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                            lora_dropout=0.0))
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if "lora_B" in name:
                param.normal_(0, std)
    peft.save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    return out


def reference_logprobs(model_dir, pairs: list[tuple[list[dict], list[int]]]):
    """For each (chat prompt, completion ids): an unpadded fp32 forward pass over prompt +
    completion, written out here rather than through alignloop. Returns, per pair, three lists over
    the completion's positions: the sampled token's log-prob, the best and the second-best log-prob."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (Path(model_dir) / "adapter_config.json").is_file():
        from peft import AutoPeftModelForCausalLM as loader
    else:
        loader = AutoModelForCausalLM
    model = loader.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    out = []
    for prompt, completion in pairs:
        ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True,
                                            return_dict=True)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([ids + completion])).logits[0]  # (L, V)
        logp = logits[len(ids) - 1:-1].log_softmax(-1)  # (T, V): each completion token's distribution
        top2 = logp.topk(2, dim=-1).values  # (T, 2)
        picked = logp.gather(-1, torch.tensor(completion)[:, None])[:, 0]  # (T,)
        out.append((picked.tolist(), top2[:, 0].tolist(), top2[:, 1].tolist()))
    return out
