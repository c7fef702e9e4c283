"""The fused loss inside the trainers: the tiny Llama's log-probs and gradients through our head
equal TRL's head and the plain full-logits loss (full, LoRA, activation checkpointing); SFT and
DPO trained with `fused_loss` on and off give the same loss curves and DPO values.

Tolerances: one step's values differ only by fp32 summation order (1e-5). Over a few optimizer
steps those differences are amplified by Adam's normalisation of tiny gradients; the curves are
compared to 1e-3 relative, far below what a wrong token, mask or normalisation would change.
"""

import os
import subprocess
import sys

import torch

import pytest  # noqa: E402

from alignloop.kernels import fused_head  # noqa: E402

STATS = ("log_probs", "entropy", "mean_logits", "is_top1")


def tiny_model(**overrides):
    from transformers import LlamaForCausalLM

    from alignloop.models.tiny import tiny_config

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_config(num_hidden_layers=2, initializer_range=0.1, **overrides))


def batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 1000, (3, 41), generator=g)
    labels = ids.clone()
    labels[:, :9] = -100  # a prompt
    labels[1, 30:] = -100  # padding
    return ids, labels


def plain_loss(model, ids, labels):
    logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1))


def with_heads(model, ours: bool):
    from trl.trainer.utils import add_fused_lm_head

    add_fused_lm_head(fused_head.unwrap(model), outputs=STATS)
    if ours:
        fused_head.install(model)
    return model


def trainable_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("method", ["full", "lora"])
def test_our_head_equals_trls_and_the_plain_loss(method):
    """Loss, per-token statistics and every trainable parameter's gradient, with activation
    checkpointing on, through TRL's fused head, ours, and the full logits."""
    ids, labels = batch()
    models = []
    for variant in ("plain", "trl", "ours"):
        model = tiny_model()
        if method == "lora":
            from peft import get_peft_model

            from alignloop.models.loading import lora_config
            from alignloop.options import LoraOptions

            model = get_peft_model(model, lora_config(LoraOptions(dropout=0.0)))  # no random dropout
            model.enable_input_require_grads()
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        if variant != "plain":
            with_heads(model, ours=variant == "ours")
        models.append(model)
    plain, trl, ours = models
    losses = [plain_loss(plain, ids, labels)]
    outs = [m(input_ids=ids, labels=labels, fused_lm_head=True) for m in (trl, ours)]
    losses += [o.loss for o in outs]
    for loss in losses:
        loss.backward()
    assert abs(losses[2].item() - losses[0].item()) < 1e-5 and abs(losses[2].item() - losses[1].item()) < 1e-5
    assert torch.allclose(outs[1].log_probs, outs[0].log_probs, atol=1e-5)
    assert torch.allclose(outs[1].entropy, outs[0].entropy, atol=1e-4)
    assert torch.equal(outs[1].is_top1, outs[0].is_top1) and torch.equal(outs[1].label_mask, outs[0].label_mask)
    want, got = trainable_grads(plain), trainable_grads(ours)
    assert want.keys() == got.keys() and len(got) > 0
    if method == "lora":
        assert all("lora_" in n for n in got)
    for name in want:
        assert torch.allclose(got[name], want[name], atol=1e-5, rtol=1e-4), name


def test_generation_and_plain_calls_keep_the_original_forward():
    model = with_heads(tiny_model().eval(), ours=True)
    ids, labels = batch()
    reference = tiny_model().eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reference(input_ids=ids).logits)
        assert torch.allclose(model(input_ids=ids, labels=ids).loss, reference(input_ids=ids, labels=ids).loss)
    assert model.generate(ids[:1, :5], max_new_tokens=3, do_sample=False).shape == (1, 8)


def test_a_lora_lm_head_is_refused_with_the_reason():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model(tie_word_embeddings=False),
                           LoraConfig(r=4, target_modules=["q_proj", "lm_head"], task_type="CAUSAL_LM"))
    assert "not a plain Linear" in fused_head.check_head(model)
    with pytest.raises(ValueError, match="fused_loss: the LM head is a"):
        fused_head.install(model)


def test_auto_turns_on_from_4096_tokens_or_a_real_vocabulary(monkeypatch):
    monkeypatch.setattr(fused_head, "AUTO_MIN_LENGTH", 4096)  # whatever the environment says
    monkeypatch.setattr(fused_head, "AUTO_MIN_VOCAB", 32768)
    assert not fused_head.wanted("auto", 1024) and fused_head.wanted("auto", 4096)
    assert not fused_head.wanted("auto", 128, 512) and fused_head.wanted("auto", 128, 49152)
    assert fused_head.wanted(True, 16) and not fused_head.wanted(False, 131072, 128256)


def test_installed_says_whether_the_fused_head_is_on():
    model = tiny_model()
    assert fused_head.vocab_size(model) == model.config.vocab_size
    assert not fused_head.installed(model)
    fused_head.install(model)
    assert fused_head.installed(model)


def test_the_environment_moves_auto_s_threshold():
    code = "from alignloop.kernels import fused_head as f; print(f.AUTO_MIN_LENGTH, f.wanted('auto', 96))"
    env = {k: v for k, v in os.environ.items() if k != "ALIGNLOOP_FUSED_LOSS_MIN_LENGTH"}
    default = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    always = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**env, "ALIGNLOOP_FUSED_LOSS_MIN_LENGTH": "0"})
    assert default.stdout.split() == ["4096", "False"], default.stderr[-2000:]
    assert always.stdout.split() == ["0", "True"], always.stderr[-2000:]


# ---- trainers ---------------------------------------------------------------------------------

def sft_spec(tmp_path, fused, method, name):
    return {
        "seed": 0, "output_dir": str(tmp_path / name),
        "model": {"tiny": {"initializer_range": 0.1, "num_hidden_layers": 2}},
        "sft": {"method": method, "data": [{"builtin": "arithmetic", "count": 48}], "fused_loss": fused,
                "max_steps": 6, "per_device_train_batch_size": 8, "learning_rate": 3e-3,
                "logging_steps": 1, "save_steps": 1000, "max_length": 96,
                "activation_checkpointing": True, "disable_tqdm": True},
    }


@pytest.mark.slow
@pytest.mark.parametrize("method", ["full", "lora"])
def test_sft_loss_curve_is_the_same_with_and_without_the_fused_loss(tmp_path, method):
    from alignloop.pipeline.runner import run_stage

    runs = {fused: run_stage("sft", sft_spec(tmp_path, fused, method, f"run-{fused}")).metrics
            for fused in (True, False)}
    assert runs[True]["fused_loss"] is True and runs[False]["fused_loss"] is False
    on, off = runs[True]["losses"], runs[False]["losses"]
    assert len(on) == len(off) == 6
    assert on[-1] < on[0]  # it trains
    for a, b in zip(on, off):
        assert abs(a - b) <= 1e-3 * abs(b), (on, off)


@pytest.mark.slow
def test_dpo_log_probs_and_loss_equal_trls_path(tmp_path):
    """One DPO batch (chosen and rejected rows) through the trainer: the policy's per-token
    log-probs, the loss (sigmoid + 0.2 NLL, reference log-probs by hand) and the logged terms
    are the same with our head and TRL's."""
    import json

    from alignloop.config import load_recipe
    from alignloop.dpo.stage import pairs_dataset
    from alignloop.dpo.trainer import make_trainer
    from alignloop.hardware import resolve_precision
    from alignloop.models.loading import load_tokenizer, resolve_path
    from alignloop.training import trl_config

    pairs = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"What is {i} plus {i}?", "chosen": f"{i} plus {i} is {2 * i}.",
             "rejected": f"It is {2 * i + 1}." + " No." * i} for i in range(1, 5)]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    results = {}
    for fused in (True, False):
        cfg = load_recipe({"seed": 0, "output_dir": str(tmp_path / "run"), "stages": ["dpo"],
                           "model": {"tiny": {"initializer_range": 0.1, "num_hidden_layers": 2}},
                           "dpo": {"data": [{"path": str(pairs)}], "fused_loss": fused, "method": "lora",
                                   "per_device_train_batch_size": 4, "disable_tqdm": True}})
        policy = resolve_path(cfg.model)
        tokenizer = load_tokenizer(cfg.model, policy)
        work = tmp_path / f"work-{fused}"
        work.mkdir()
        trainer = make_trainer(cfg, policy, tokenizer, pairs_dataset(rows, work),
                               trl_config("dpo", cfg.dpo, seed=cfg.seed, output_dir=work / "checkpoints",
                                          precision=resolve_precision(cfg.precision)))
        inputs = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
        inputs["ref_chosen_logps"] = torch.tensor([-40.0, -55.0, -30.0, -20.0])
        inputs["ref_rejected_logps"] = torch.tensor([-35.0, -30.0, -45.0, -25.0])
        trainer.model.train()
        mask = inputs["completion_mask"]
        out = trainer.model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                            labels=inputs["input_ids"].masked_fill(mask == 0, -100), fused_lm_head=True)
        loss = trainer.compute_loss(trainer.model, inputs)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
        metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
        results[fused] = (out.log_probs.detach(), loss.item(), grads, metrics)
    (lp_on, loss_on, g_on, m_on), (lp_off, loss_off, g_off, m_off) = results[True], results[False]
    assert torch.allclose(lp_on, lp_off, atol=1e-5) and (lp_on != 0).any()
    assert loss_on == pytest.approx(loss_off, abs=1e-5)
    for key in ("loss/nll", "loss/dpo", "rewards/chosen", "rewards/margins"):
        assert m_on[key] == pytest.approx(m_off[key], abs=1e-4), key
    assert g_on.keys() == g_off.keys() and len(g_on) > 0
    for name in g_on:
        assert torch.allclose(g_on[name], g_off[name], atol=1e-6, rtol=1e-4), name


def test_the_triton_backend_in_the_head_equals_the_torch_one():
    """The tiny Llama with LoRA through our head on the Triton kernels (the interpreter on CPU):
    the same log-probs, statistics and adapter gradients as the torch backend (fp32, 1e-5)."""
    pytest.importorskip("triton")
    from peft import get_peft_model

    from alignloop.models.loading import lora_config
    from alignloop.options import LoraOptions

    ids, labels = batch()
    results = []
    for backend in ("torch", "triton"):
        model = with_heads(get_peft_model(tiny_model(), lora_config(LoraOptions(dropout=0.0))).train(),
                           ours=False)
        fused_head.install(model, backend=backend)
        out = model(input_ids=ids, labels=labels, fused_lm_head=True)
        out.loss.backward()
        results.append((out, trainable_grads(model)))
    (a, ga), (b, gb) = results
    assert torch.allclose(a.log_probs, b.log_probs, atol=1e-5) and torch.equal(a.is_top1, b.is_top1)
    assert torch.allclose(a.entropy, b.entropy, atol=1e-4)
    assert ga.keys() == gb.keys() and all(torch.allclose(ga[n], gb[n], atol=1e-5) for n in ga)
