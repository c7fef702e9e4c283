"""DPO as in Llama 3 (reference A5): the formatting-token mask (exact positions, and no loss from
the masked tokens), the NLL term in the logged loss, and tiny-model runs (full, LoRA, resume)."""

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from alignloop.config import load_recipe
from alignloop.data.tasks.arithmetic import QUESTIONS, problems, work
from alignloop.dpo.masking import formatting_ids, formatting_positions, loss_mask
from alignloop.pipeline.context import StageContext
from alignloop.pipeline.errors import StageError

QUESTION = "What is 25 plus 17?"
ANSWER = "5+7=12, 2+1+1=4, so the answer is 42."
WRONG = "5+7=12, 2+1=3, so the answer is 32."
FOLLOW_UP = "Check: 42 - 17 = 25."
TINY = {"initializer_range": 0.1}  # wider init: see tests/test_sft.py (LoRA on a 0.02 init barely moves)


def enc(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False)


def special(tokenizer, name):
    return tokenizer.convert_tokens_to_ids(name)


def pieces(tokenizer):
    """The Llama 3 format built piece by piece (reference section E): the prompt with its
    generation header, a one-message response and a two-message response, each as a list of
    (token ids, expected loss-mask value) pieces."""
    sh, eh = special(tokenizer, "<|start_header_id|>"), special(tokenizer, "<|end_header_id|>")
    eot = special(tokenizer, "<|eot_id|>")
    prompt = enc(tokenizer, f"<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n{QUESTION}"
                            "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    one = [(enc(tokenizer, WRONG), 1), ([eot], 0)]
    two = [(enc(tokenizer, ANSWER), 1), ([eot], 0),
           ([sh], 0), (enc(tokenizer, "assistant"), 0), ([eh], 0),  # the inner header: masked
           (enc(tokenizer, "\n\n"), 1), (enc(tokenizer, FOLLOW_UP), 1), ([eot], 0)]
    return prompt, one, two


def flat(parts):
    return [t for ids, _ in parts for t in ids], [keep for ids, keep in parts for _ in ids]


def test_mask_is_the_response_text_without_headers_and_terminators(tokenizer):
    """Expected masks are written piece by piece from the template; the pieces are checked against
    the chat template's own rendering first, so they are the real token ids."""
    prompt, one, two = pieces(tokenizer)
    fmt = formatting_ids(tokenizer)
    user = [{"role": "user", "content": QUESTION}]
    for parts, replies in ((one, [WRONG]), (two, [ANSWER, FOLLOW_UP])):
        ids, expected = flat(parts)
        messages = user + [{"role": "assistant", "content": r} for r in replies]
        assert tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"] == prompt + ids
        completion = [0] * len(prompt) + [1] * len(ids)
        assert loss_mask(prompt + ids, completion, fmt) == [0] * len(prompt) + expected
    # in the prompt, the headers (role names included) and <|eot_id|> are formatting, the text is not
    flags = formatting_positions(prompt, fmt)
    begin, header = enc(tokenizer, "<|begin_of_text|>"), enc(tokenizer, "<|start_header_id|>user<|end_header_id|>")
    assert flags[:len(begin) + len(header)] == [False] * len(begin) + [True] * len(header)
    assistant = enc(tokenizer, "<|start_header_id|>assistant<|end_header_id|>")
    assert sum(flags) == len(header) + 1 + len(assistant)  # user header, <|eot_id|>, assistant header


def test_eom_and_end_of_text_are_masked_and_a_cut_header_runs_to_the_end(tokenizer):
    """<|eom_id|> (a tool call pending) and <|end_of_text|> end a response like <|eot_id|>; a header
    cut by truncation (no <|end_header_id|>) masks the role name that follows it."""
    fmt = formatting_ids(tokenizer)
    text = enc(tokenizer, ANSWER)
    eom, end = special(tokenizer, "<|eom_id|>"), special(tokenizer, "<|end_of_text|>")
    sh = special(tokenizer, "<|start_header_id|>")
    ids = text + [eom] + text + [end] + [sh] + enc(tokenizer, "assistant")
    expected = [1] * len(text) + [0] + [1] * len(text) + [0] * (2 + len(enc(tokenizer, "assistant")))
    assert loss_mask(ids, [1] * len(ids), fmt) == expected


def test_pairs_come_from_rankings_and_rejection_sampling(tmp_path):
    """dpo.data: one edited > chosen > rejected ranking (3 pairs: ranks 0-1, 0-2, 1-2) and one
    preference record (1 pair); ctx.inputs["rs_pairs"]: one file of 2 pairs. 6 pairs in all."""
    from alignloop.dpo.stage import preference_pairs

    data = write_pairs(tmp_path / "user.jsonl", [
        {"prompt_id": "r", "prompt": QUESTION, "edited": ANSWER, "chosen": FOLLOW_UP, "rejected": WRONG},
        {"prompt_id": "p", "prompt": QUESTION, "chosen": ANSWER, "rejected": WRONG}])
    rs = write_pairs(tmp_path / "rs.jsonl", [
        {"prompt_id": f"s{i}", "prompt": f"Add {i} and 1.", "chosen": f"{i + 1}", "rejected": f"{i}"}
        for i in range(2)])
    ctx = context(tmp_path, tmp_path / "unused")
    ctx.inputs = {"rs_pairs": [rs]}
    records, report = preference_pairs(recipe(tmp_path, data), ctx)
    assert sorted(r["prompt_id"] for r in records) == ["p", "r", "r", "r", "s0", "s1"]
    ranked = {tuple(r["rank_pair"]): r for r in records if r["prompt_id"] == "r"}
    assert set(ranked) == {(0, 1), (0, 2), (1, 2)}
    assert ranked[(0, 2)]["chosen"][0]["content"] == ANSWER and ranked[(0, 2)]["rejected"][0]["content"] == WRONG
    assert [entry["read"] for entry in report] == [2, 2]


def test_safety_pairs_join_at_the_dpo_ratio(tmp_path):
    """safety.dpo_ratio 0.2 on 8 user pairs: round(8 * 0.2 / 0.8) = 2 safety pairs join, marked
    by metadata.safety (the safety section's own mixing, alignloop.safety.mixing)."""
    from alignloop.dpo.stage import preference_pairs

    data = write_pairs(tmp_path / "user.jsonl", [
        {"prompt": f"Add {i} and 1.", "chosen": f"{i + 1}", "rejected": f"{i}"} for i in range(8)])
    cfg = recipe(tmp_path, data, safety={"data": [{"builtin": "safety"}], "dpo_ratio": 0.2})
    records, report = preference_pairs(cfg, context(tmp_path, tmp_path / "unused"))
    safety = [r for r in records if "safety" in r.get("metadata", {})]
    assert len(records) == 10 and len(safety) == 2 and report[-1]["source"] == "safety"


def recipe(tmp_path, pairs_file, safety=None, **dpo):
    spec = {
        "seed": 0,
        "output_dir": str(tmp_path / "run"),
        "model": {"tiny": TINY},
        "stages": ["dpo"],
        "dpo": {"data": [{"path": str(pairs_file)}], "max_steps": 20, "per_device_train_batch_size": 8,
                "learning_rate": 1e-3, "logging_steps": 5, "save_steps": 1000,
                "activation_checkpointing": False, "disable_tqdm": True, **dpo},
    }
    if safety is not None:
        spec["safety"] = safety
    return load_recipe(spec)


def write_pairs(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def hand_pairs(tmp_path):
    """Pair 0: one-message responses; pair 1: chosen in two messages, rejected in one."""
    return write_pairs(tmp_path / "hand.jsonl", [
        {"prompt": QUESTION, "chosen": ANSWER, "rejected": WRONG},
        {"prompt": QUESTION, "chosen": [{"role": "assistant", "content": ANSWER},
                                        {"role": "assistant", "content": FOLLOW_UP}],
         "rejected": WRONG},
    ])


def one_batch_trainer(tmp_path, **dpo):
    from alignloop.dpo.stage import pairs_dataset, preference_pairs
    from alignloop.dpo.trainer import make_trainer
    from alignloop.hardware import resolve_precision
    from alignloop.models.loading import load_tokenizer, resolve_path
    from alignloop.training import trl_config

    cfg = recipe(tmp_path, hand_pairs(tmp_path), precompute_ref_log_probs=True, **dpo)
    ctx = context(tmp_path, resolve_path(cfg.model))
    records, _ = preference_pairs(cfg, ctx)
    records.sort(key=lambda r: len(r["chosen"]))  # pair 0, then pair 1
    tokenizer = load_tokenizer(cfg.model, ctx.policy)
    trainer = make_trainer(cfg, ctx.policy, tokenizer, pairs_dataset(records, ctx.work_dir),
                           trl_config("dpo", cfg.dpo, seed=cfg.seed, precision=resolve_precision(cfg.precision),
                                      output_dir=ctx.work_dir / "checkpoints"))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    return trainer, batch, tokenizer


def test_trainer_batches_carry_the_mask_for_chosen_and_rejected(tmp_path, tokenizer):
    """The rows TRL tokenizes and our collator pads: [chosen 0, chosen 1, rejected 0, rejected 1].
    Each row's mask is the expected one from the template pieces, zero-padded to the batch."""
    trainer, batch, _ = one_batch_trainer(tmp_path)
    prompt, one, two = pieces(tokenizer)
    chosen_one = [(enc(tokenizer, ANSWER), 1), ([special(tokenizer, "<|eot_id|>")], 0)]
    for row, parts in enumerate([chosen_one, two, one, one]):
        ids, keep = flat(parts)
        n = len(prompt) + len(ids)
        assert batch["input_ids"][row, :n].tolist() == prompt + ids
        assert batch["completion_mask"][row].tolist() == [0] * len(prompt) + keep + [0] * (batch["input_ids"].size(1) - n)


def hand_loss(model, batch, mask, ref_chosen, ref_rejected, beta=0.1, nll_weight=0.2,
              normalization="sequence"):
    """Llama 3's DPO loss from full logits: -log sigmoid(beta * ((c - c_ref) - (r - r_ref)))
    averaged over pairs, plus nll_weight times the NLL of the chosen loss tokens: per sequence
    (each chosen response's -sum log p / its length, averaged over pairs) or, with "token", the
    mean -log p over all chosen loss tokens."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
    keep = mask[:, 1:].float()  # the mask of each predicted token
    sums = (logp * keep).sum(1)
    c, r = sums.chunk(2)
    sigmoid = -F.logsigmoid(beta * ((c - ref_chosen) - (r - ref_rejected))).mean()
    chosen_keep = keep.chunk(2)[0]
    chosen_logp = logp.chunk(2)[0] * chosen_keep
    if normalization == "token":
        nll = -chosen_logp.sum() / chosen_keep.sum()
    else:
        nll = (-chosen_logp.sum(1) / chosen_keep.sum(1)).mean()
    return sigmoid, nll, sigmoid + nll_weight * nll


def test_loss_and_logged_terms_equal_a_hand_computation_with_the_mask(tmp_path):
    """TRL's loss on one batch (reference log-probs set by hand, so the sigmoid term depends on the
    policy's masked sums) equals `hand_loss` with the formatting-masked completion mask, and not
    with the unmasked one (the masked <|eot_id|> / header tokens really carry no loss). The logged
    `loss/nll` and `loss/dpo` equal the hand NLL and sigmoid terms."""
    trainer, batch, _ = one_batch_trainer(tmp_path)
    ref_chosen, ref_rejected = torch.tensor([-40.0, -55.0]), torch.tensor([-35.0, -30.0])
    batch["ref_chosen_logps"], batch["ref_rejected_logps"] = ref_chosen, ref_rejected
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch).item()
    sigmoid, nll, total = hand_loss(trainer.model, batch, batch["completion_mask"], ref_chosen, ref_rejected)
    assert loss == pytest.approx(total.item(), abs=1e-4)
    logged = trainer._metrics["train"]
    assert logged["loss/nll"][-1] == pytest.approx(nll.item(), abs=1e-4)
    assert logged["loss/dpo"][-1] == pytest.approx(sigmoid.item(), abs=1e-4)

    rows = [trainer.train_dataset[i] for i in range(2)]
    unmasked = dataclasses.replace(trainer.data_collator, formatting=None)(rows)["completion_mask"]
    assert (unmasked >= batch["completion_mask"]).all() and unmasked.sum() > batch["completion_mask"].sum()
    *_, total_unmasked = hand_loss(trainer.model, batch, unmasked, ref_chosen, ref_rejected)
    assert abs(total_unmasked.item() - loss) > 1e-2


def test_nll_per_sequence_and_per_token_on_a_hand_derived_example():
    """Two pairs; chosen 0 has 2 loss tokens, each with -log p = 4, chosen 1 has 10 with
    -log p = 0.5 (the rejected rows and masked positions hold other values that must not count).
    Per sequence (Pang et al. 2024): chosen 0's NLL is (4 + 4) / 2 = 4, chosen 1's is
    (10 x 0.5) / 10 = 0.5, averaged over the pairs (4 + 0.5) / 2 = 2.25. Per token (TRL):
    (2 x 4 + 10 x 0.5) / 12 = 13 / 12 = 1.0833. The short answer weighs half the term per
    sequence but 2/12 of it per token."""
    from alignloop.losses import chosen_nll

    T = 14  # 13 predicted positions after the shift
    mask = torch.zeros(4, T, dtype=torch.long)  # rows [chosen 0, chosen 1, rejected 0, rejected 1]
    mask[0, 3:5] = 1
    mask[1, 3:13] = 1
    mask[2:, 3:8] = 1
    log_probs = torch.full((4, T - 1), -7.0)  # off the chosen mask: must not count
    log_probs[0, 2:4] = -4.0  # predicted tokens 3 and 4
    log_probs[1, 2:12] = -0.5
    assert chosen_nll(log_probs, mask, "sequence").item() == pytest.approx(2.25)
    assert chosen_nll(log_probs, mask).item() == pytest.approx(2.25)  # the default
    assert chosen_nll(log_probs, mask, "token").item() == pytest.approx(13 / 12)


def test_trainer_loss_uses_the_chosen_normalisation(tmp_path):
    """On one batch of the tiny model: nll_normalization "token" gives TRL's own loss (hand_loss
    with the per-token NLL); "sequence" differs from it by exactly 0.2 x (per-sequence NLL -
    per-token NLL), and its gradient is the gradient of the per-sequence hand loss."""
    ref_chosen, ref_rejected = torch.tensor([-40.0, -55.0]), torch.tensor([-35.0, -30.0])
    losses = {}
    for normalization in ("token", "sequence"):
        (tmp_path / normalization).mkdir()
        trainer, batch, _ = one_batch_trainer(tmp_path / normalization, nll_normalization=normalization)
        batch["ref_chosen_logps"], batch["ref_rejected_logps"] = ref_chosen, ref_rejected
        trainer.model.train()
        loss = trainer.compute_loss(trainer.model, batch)
        _, nll, total = hand_loss(trainer.model, batch, batch["completion_mask"], ref_chosen,
                                  ref_rejected, normalization=normalization)
        assert loss.item() == pytest.approx(total.item(), abs=1e-4)
        assert trainer._metrics["train"]["loss/nll"][-1] == pytest.approx(nll.item(), abs=1e-4)
        losses[normalization] = loss.item()
        if normalization == "sequence":
            params = [p for p in trainer.model.parameters() if p.requires_grad]
            grads = torch.autograd.grad(loss, params)
            logits = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
            keep = batch["completion_mask"][:, 1:].float()
            c, r = (logp * keep).sum(1).chunk(2)
            chosen_keep = keep.chunk(2)[0]
            hand = (-F.logsigmoid(0.1 * ((c - ref_chosen) - (r - ref_rejected))).mean()
                    + 0.2 * (-(logp.chunk(2)[0] * chosen_keep).sum(1) / chosen_keep.sum(1)).mean())
            for got, want in zip(grads, torch.autograd.grad(hand, params)):
                torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert abs(losses["sequence"] - losses["token"]) > 1e-3  # the two chosen answers' lengths differ


def test_without_the_nll_term_only_the_sigmoid_loss_is_left(tmp_path):
    """nll_weight 0: TRL's loss types are ["sigmoid"], the loss equals the hand sigmoid term and
    no NLL term is logged."""
    trainer, batch, _ = one_batch_trainer(tmp_path, nll_weight=0)
    assert trainer.loss_types == ["sigmoid"]
    ref_chosen, ref_rejected = torch.tensor([-40.0, -55.0]), torch.tensor([-35.0, -30.0])
    batch["ref_chosen_logps"], batch["ref_rejected_logps"] = ref_chosen, ref_rejected
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch).item()
    sigmoid, _, _ = hand_loss(trainer.model, batch, batch["completion_mask"], ref_chosen, ref_rejected)
    assert loss == pytest.approx(sigmoid.item(), abs=1e-4)
    assert "loss/nll" not in trainer._metrics["train"]


# ---- tiny-model runs -------------------------------------------------------------------------


def context(tmp_path, policy, name="a"):
    return StageContext(name="dpo", round=1, policy=str(policy), base=str(policy),
                        work_dir=tmp_path / f"work-{name}", log_dir=tmp_path / "logs", seed=0)


def arithmetic_pairs(tmp_path, count=64):
    """chosen: the worked answer; rejected: the same work on b - 1, a wrong answer (off by one)."""
    rows = [{"prompt": QUESTIONS[op][t].format(a=a, b=b), "chosen": work(a, op, b),
             "rejected": work(a, op, b - 1)} for a, op, b, t in problems("train", count, 0)]
    return write_pairs(tmp_path / "pairs.jsonl", rows)


def run_dpo(tmp_path, ctx_name="a", out="out", **dpo):
    from alignloop.dpo.stage import run
    from alignloop.models.loading import resolve_path

    cfg = recipe(tmp_path, arithmetic_pairs(tmp_path, dpo.pop("pairs", 64)), **dpo)
    ctx = context(tmp_path, resolve_path(cfg.model), ctx_name)
    return run(cfg, ctx, tmp_path / out), tmp_path / out, ctx


def mean(values):
    return sum(values) / len(values)


@pytest.mark.slow
def test_full_dpo_loss_falls_and_the_margin_rises(tmp_path):
    """20 steps on 64 arithmetic pairs. Falls: the mean of the last two logged losses is below 0.8x
    the first two. The reward margin and the chosen-minus-rejected log-prob gap (64 pairs, before
    vs after) grow. Each logged loss is the sum of its logged terms, loss/dpo + 0.2 * loss/nll
    (both averaged over the same 5 steps)."""
    metrics, out, ctx = run_dpo(tmp_path, report_to="tensorboard")
    losses, log = metrics["losses"], metrics["log"]
    assert len(losses) == 4 and mean(losses[-2:]) < 0.8 * mean(losses[:2]), losses
    assert log[-1]["rewards/margins"] > max(0.5, log[0]["rewards/margins"]), log
    assert log[-1]["loss/dpo"] < 0.8 * log[0]["loss/dpo"], log  # the preference term itself falls
    before, after = metrics["log_probs"]["before"], metrics["log_probs"]["after"]
    assert after["chosen"] - after["rejected"] > before["chosen"] - before["rejected"] + 1.0, metrics["log_probs"]
    assert after["chosen"] > before["chosen"]  # the NLL term keeps the chosen from falling
    for entry in log:
        assert entry["loss"] == pytest.approx(entry["loss/dpo"] + 0.2 * entry["loss/nll"], abs=1e-4)
    assert metrics["masks"]["formatting_tokens"] == 2 * 64  # one <|eot_id|> per response
    files = {p.name for p in (out / "model").iterdir()}
    assert {"model.safetensors", "tokenizer.json", "training_args.json"} <= files
    assert not any(name.endswith((".bin", ".pt")) for name in files)
    assert len((out / "data.jsonl").read_text().splitlines()) == 64
    assert json.loads((out / "metrics.json").read_text())["losses"] == losses
    assert list(ctx.log_dir.rglob("events.out.tfevents.*"))


@pytest.mark.slow
def test_lora_saves_an_adapter_and_a_merged_model_with_the_same_logits(tmp_path):
    """LoRA (r 8) with merge: model/ holds only the adapter, merged/ a full model; both give the
    same logits on a probe conversation, different from the starting model's."""
    metrics, out, _ = run_dpo(tmp_path, method="lora", merge=True, lora={"r": 8, "alpha": 16},
                              learning_rate=1e-2)
    log = metrics["log"]
    assert log[-1]["rewards/margins"] > log[0]["rewards/margins"] and log[-1]["loss"] < log[0]["loss"], log
    assert (out / "model" / "adapter_model.safetensors").is_file()
    assert not (out / "model" / "model.safetensors").exists()
    assert (out / "merged" / "model.safetensors").is_file()

    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out / "model")
    ids = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION},
                                         {"role": "assistant", "content": ANSWER}],
                                        return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        adapter = AutoPeftModelForCausalLM.from_pretrained(out / "model").eval()(input_ids=ids).logits
        merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()(input_ids=ids).logits
        start = AutoModelForCausalLM.from_pretrained(metrics["policy"]).eval()(input_ids=ids).logits
    torch.testing.assert_close(merged, adapter, atol=1e-4, rtol=1e-4)
    assert (start - adapter).abs().max() > 1e-2


@pytest.mark.slow
def test_precomputed_reference_and_a_frozen_copy_give_the_same_losses(tmp_path):
    """Full DPO, 4 steps: the reference log-probs precomputed before training (no reference model
    in memory) and a frozen copy of the starting model evaluated at each step are the same
    reference, so the logged losses agree."""
    common = dict(pairs=32, max_steps=4, logging_steps=1)
    precomputed, _, _ = run_dpo(tmp_path, "a", "out-a", precompute_ref_log_probs=True, **common)
    frozen, _, _ = run_dpo(tmp_path, "b", "out-b", precompute_ref_log_probs=False, **common)
    assert precomputed["precompute_ref_log_probs"] and not frozen["precompute_ref_log_probs"]
    assert frozen["losses"] == pytest.approx(precomputed["losses"], abs=1e-4)


@pytest.mark.slow
def test_resumed_run_ends_where_an_uninterrupted_one_does(tmp_path):
    """Full DPO with precomputed reference log-probs and a constant learning rate: 3 steps, then a
    second attempt with max_steps 6 that resumes from checkpoint-3, gives the weights of 6 steps in
    one go. (Had the resumed run taken the checkpoint as its reference, the loss would differ.)"""
    common = dict(pairs=32, lr_scheduler_type="constant", save_steps=3, logging_steps=1,
                  precompute_ref_log_probs=True)
    straight, out_a, _ = run_dpo(tmp_path, "a", "out-a", max_steps=6, **common)
    run_dpo(tmp_path, "b", "out-b1", max_steps=3, **common)
    resumed, out_b, _ = run_dpo(tmp_path, "b", "out-b2", max_steps=6, **common)
    assert resumed["resumed_from"].endswith("checkpoint-3") and resumed["steps"] == 6
    # the log history comes back with the checkpoint: steps 1-3 from the first attempt
    assert resumed["losses"] == pytest.approx(straight["losses"], abs=1e-4)
    from safetensors.torch import load_file

    a, b = load_file(out_a / "model" / "model.safetensors"), load_file(out_b / "model" / "model.safetensors")
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-5, rtol=1e-5)


def test_no_pairs_is_a_stage_error_and_nothing_is_written(tmp_path):
    """An empty dpo.data file and no rejection-sampling pairs: StageError naming the stage."""
    from alignloop.dpo.stage import run

    cfg = recipe(tmp_path, write_pairs(tmp_path / "empty.jsonl", []))
    out = tmp_path / "out"
    with pytest.raises(StageError, match=r"round_1/dpo: no preference pairs"):
        run(cfg, context(tmp_path, tmp_path / "unused"), out)
    assert not out.exists()
