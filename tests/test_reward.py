"""The reward stage on the tiny Llama: it learns a toy preference, expands rankings, trains full or
LoRA, passes margins to the loss, averages checkpoints, and refuses bad input with StageError; the
scorer tokenizes as TRL does and does not depend on the batch size."""

import json
import shutil

import pytest
import torch

from alignloop.config import load_recipe
from alignloop.data.tasks import arithmetic
from alignloop.models.loading import resolve_path
from alignloop.pipeline.context import StageContext
from alignloop.pipeline.errors import StageError
from alignloop.reward.scoring import RewardScorer, pairwise_accuracy, render
from alignloop.reward.stage import held_out_prompt, load_pairs, run


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """On a machine shared with other jobs, two intra-op threads spin-wait on each other: one
    tiny training step took 3.5 s with 2 threads and 0.1 s with 1 (measured here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def op_swap_pairs(count, seed=0):
    """Arithmetic prompts; chosen = the worked answer of the asked operation, rejected = the worked
    answer of the other one (plus for minus and back). Chosen and rejected texts have the same
    distribution overall, so an untrained head cannot tell them apart; the model must match the
    answer's operation to the question's wording."""
    out = []
    for a, op, b, template in arithmetic.problems("train", count, seed):
        other = "-" if op == "+" else "+"
        out.append({"prompt": arithmetic.QUESTIONS[op][template].format(a=a, b=b),
                     "chosen": arithmetic.work(a, op, b), "rejected": arithmetic.work(a, other, b)})
    return out


def setup(tmp_path, records, steps=4, model=None, top=None, **reward):
    """(recipe, context, out_dir) for a reward stage on `records` (a JSONL written in tmp_path);
    `top`: top-level recipe keys, `reward`: keys of the reward section."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = write_jsonl(tmp_path / "pairs.jsonl", records)
    spec = {"seed": 0, "output_dir": str(tmp_path / "run"), "stages": ["reward"],
            "model": {"tiny": model or {}},
            "reward": {"data": [{"path": str(data)}], "max_steps": steps,
                       "per_device_train_batch_size": 8, "learning_rate": 1e-3, "logging_steps": 2,
                       "save_steps": 1000, "activation_checkpointing": False, "disable_tqdm": True,
                       **reward}, **(top or {})}
    cfg = load_recipe(spec)
    base = resolve_path(cfg.model)
    ctx = StageContext(name="reward", round=1, policy=base, base=base, work_dir=tmp_path / "work",
                       log_dir=tmp_path / "logs", seed=1)
    return cfg, ctx, tmp_path / "out"


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---------------------------------------------------------------------------------------------
# training


@pytest.mark.slow
def test_learns_a_separable_toy_set(tmp_path):
    """200 op-swap prompts, 20% held out by prompt hash (49 pairs with this seed-independent
    split), 80 steps of 8 pairs. Measured: held-out accuracy 0.59 untrained -> 0.98 trained. The
    bound 0.9 is far above chance (0.5); the untrained bound 0.75 checks that the toy set does not
    separate by itself under a random head."""
    cfg, ctx, out = setup(tmp_path, op_swap_pairs(200), steps=80, model={"initializer_range": 0.1},
                          eval_fraction=0.2, report_to="tensorboard")
    metrics = run(cfg, ctx, out)
    assert metrics["accuracy"] >= 0.9, metrics
    assert metrics["accuracy_before"] < 0.75 and metrics["accuracy"] > metrics["accuracy_before"]
    assert metrics["losses"][-1] < 0.5 * metrics["losses"][0]
    assert metrics["train_pairs"] + metrics["eval_pairs"] == 200 and metrics["eval_pairs"] > 20
    assert list(ctx.log_dir.rglob("events.out.tfevents.*"))

    files = {p.name for p in (out / "model").iterdir()}
    assert {"model.safetensors", "tokenizer.json", "training_args.json", "config.json"} <= files
    assert not any(name.endswith((".bin", ".pt")) for name in files)
    train, held_out = read_jsonl(out / "data.jsonl"), read_jsonl(out / "eval.jsonl")
    assert len(train) == metrics["train_pairs"] and len(held_out) == metrics["eval_pairs"]
    assert not {p["prompt_id"] for p in train} & {p["prompt_id"] for p in held_out}
    assert json.loads((out / "metrics.json").read_text())["accuracy"] == metrics["accuracy"]

    # the saved model, reloaded by the scoring API, gives the accuracy measured in memory
    reloaded = pairwise_accuracy(RewardScorer(out / "model"), held_out)
    assert reloaded["accuracy"] == metrics["accuracy"]
    assert reloaded["mean_margin"] == pytest.approx(metrics["mean_margin"], abs=1e-4)


@pytest.mark.slow
def test_lora_ranking_and_checkpoint_averaging(tmp_path):
    """A LoRA reward model on 40 op-swap pairs plus one 3-response ranking, averaging its last two
    checkpoints (steps 3 and 6). Checks: data.jsonl holds the ranking's 3 ordered pairs; the
    adapter file carries the score head; the saved adapter is the mean of the two checkpoints'
    adapters; RewardScorer (base + adapter merged) reproduces the in-memory mean margin; with
    eval_fraction 0 the accuracy is None and says why."""
    ranking = {"prompt_id": "rank-1", "prompt": "What is 2 plus 3?", "edited": "2+3=5, so the answer is 5.",
               "chosen": "The answer is 5.", "rejected": "The answer is 6."}
    write_jsonl(tmp_path / "held.jsonl", op_swap_pairs(12, seed=7))
    cfg, ctx, out = setup(tmp_path, op_swap_pairs(40) + [ranking], steps=6,
                          model={"initializer_range": 0.1}, method="lora", lora={"r": 8, "alpha": 16},
                          eval_fraction=0.0, eval_data=[{"path": str(tmp_path / "held.jsonl")}],
                          save_steps=3, average_checkpoints=2)
    metrics = run(cfg, ctx, out)
    assert metrics["averaged"] == {"averaged": [3, 6]} and metrics["losses"][-1] < metrics["losses"][0]

    pairs = [p for p in read_jsonl(out / "data.jsonl") if p["prompt_id"] == "rank-1"]
    assert [(p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in pairs] == [
        (ranking["edited"], ranking["chosen"]), (ranking["edited"], ranking["rejected"]),
        (ranking["chosen"], ranking["rejected"])]
    assert [p["rank_pair"] for p in pairs] == [[0, 1], [0, 2], [1, 2]]

    from safetensors.torch import load_file

    saved = load_file(out / "model" / "adapter_model.safetensors")
    assert any(".score." in k for k in saved) and not (out / "model" / "model.safetensors").exists()
    ckpts = [load_file(ctx.work_dir / "checkpoints" / f"checkpoint-{s}" / "adapter_model.safetensors")
             for s in (3, 6)]
    for name, value in saved.items():
        torch.testing.assert_close(value, (ckpts[0][name] + ckpts[1][name]) / 2)

    held_out = read_jsonl(out / "eval.jsonl")
    reloaded = pairwise_accuracy(RewardScorer(out / "model"), held_out)
    assert metrics["eval_pairs"] == 12 and reloaded["accuracy"] == metrics["accuracy"]
    assert reloaded["mean_margin"] == pytest.approx(metrics["mean_margin"], abs=1e-4)
    assert abs(metrics["mean_margin"] - metrics["mean_margin_before"]) > 1e-3  # it trained


@pytest.mark.slow
def test_zero_held_out_pairs_give_no_accuracy_and_say_why(tmp_path):
    """Also: center_rewards_coefficient, a RewardConfig option, passes through the recipe."""
    cfg, ctx, out = setup(tmp_path, op_swap_pairs(8), steps=1, eval_fraction=0.0,
                          center_rewards_coefficient=0.01)
    metrics = run(cfg, ctx, out)
    assert metrics["accuracy"] is None and metrics["eval_pairs"] == 0
    assert "eval_fraction is 0" in metrics["accuracy_note"]
    assert metrics["center_rewards_coefficient"] == 0.01
    assert json.loads((out / "model" / "training_args.json").read_text())["center_rewards_coefficient"] == 0.01


@pytest.mark.slow
def test_full_model_checkpoint_averaging(tmp_path):
    """save_steps 2, max_steps 6, average_checkpoints 3: the saved weights must equal the mean of
    checkpoint-2, checkpoint-4 and checkpoint-6 (the final weights), computed here from disk."""
    cfg, ctx, out = setup(tmp_path, op_swap_pairs(24), steps=6, eval_fraction=0.0, save_steps=2,
                          average_checkpoints=3)
    metrics = run(cfg, ctx, out)
    assert metrics["averaged"] == {"averaged": [2, 4, 6]}

    from safetensors.torch import load_file

    saved = load_file(out / "model" / "model.safetensors")
    ckpts = [load_file(ctx.work_dir / "checkpoints" / f"checkpoint-{s}" / "model.safetensors")
             for s in (2, 4, 6)]
    assert set(saved) == set(ckpts[0]) and "score.weight" in saved
    for name, value in saved.items():
        torch.testing.assert_close(value, sum(c[name] for c in ckpts) / 3)
    assert not torch.equal(saved["score.weight"], ckpts[2]["score.weight"])  # not just the last


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_weights(tmp_path, monkeypatch):
    """4 steps with a checkpoint every 2: an attempt that dies in step 3 and a second attempt that
    resumes from checkpoint-2 end with the weights of an uninterrupted run (same data order, no
    dropout, CPU maths: equal within 1e-6)."""
    from safetensors.torch import load_file
    from trl import RewardTrainer

    records = op_swap_pairs(32)
    cfg, ctx, out = setup(tmp_path / "whole", records, eval_fraction=0.0, save_steps=2)
    run(cfg, ctx, out)
    whole = load_file(out / "model" / "model.safetensors")

    cfg, ctx, out = setup(tmp_path / "killed", records, eval_fraction=0.0, save_steps=2)
    original = RewardTrainer.training_step

    def dies_in_step_3(self, *args, **kwargs):
        if self.state.global_step == 2:
            raise KeyboardInterrupt("killed")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(RewardTrainer, "training_step", dies_in_step_3)
    with pytest.raises(KeyboardInterrupt):
        run(cfg, ctx, out)
    assert not out.exists() and (ctx.work_dir / "checkpoints" / "checkpoint-2").is_dir()
    monkeypatch.setattr(RewardTrainer, "training_step", original)
    metrics = run(cfg, ctx, out)
    assert metrics["resumed_from"].endswith("checkpoint-2") and metrics["steps"] == 4
    resumed = load_file(out / "model" / "model.safetensors")
    for name, value in whole.items():
        torch.testing.assert_close(resumed[name], value, atol=1e-6, rtol=0)


@pytest.mark.slow
def test_margin_reaches_the_loss(tmp_path, monkeypatch):
    """Each record's metadata.gap becomes the `margin` column; TRL's compute_loss receives it
    (spied on here) with exactly the values of the records in its batches."""
    from trl import RewardTrainer

    records = [r | {"metadata": {"gap": float(i % 3)}} for i, r in enumerate(op_swap_pairs(8))]
    cfg, ctx, out = setup(tmp_path, records, steps=2, eval_fraction=0.0, margin_field="gap",
                          per_device_train_batch_size=4)
    seen = []
    original = RewardTrainer.compute_loss

    def spy(self, model, inputs, *args, **kwargs):
        seen.append(inputs["margin"].tolist())
        return original(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(RewardTrainer, "compute_loss", spy)
    metrics = run(cfg, ctx, out)
    assert metrics["margin"] == "gap" and len(seen) == 2 and all(len(batch) == 4 for batch in seen)
    assert {m for batch in seen for m in batch} <= {0.0, 1.0, 2.0}
    assert len({m for batch in seen for m in batch}) > 1
    assert sorted(p["margin"] for p in read_jsonl(out / "data.jsonl")) == sorted(float(i % 3) for i in range(8))


# ---------------------------------------------------------------------------------------------
# bad input: StageError before anything is written


def test_missing_margin_names_the_record(tmp_path):
    records = [r | {"metadata": {"gap": 1.0}} for r in op_swap_pairs(4)]
    records[2] = records[2] | {"prompt_id": "p-without-gap", "metadata": {}}
    cfg, ctx, out = setup(tmp_path, records, eval_fraction=0.0, margin_field="gap")
    with pytest.raises(StageError, match=r"pairs\.jsonl: the record with prompt_id 'p-without-gap' .* "
                                         r"no usable metadata\.gap \(missing\)"):
        run(cfg, ctx, out)
    assert not out.exists()


def test_reward_model_with_another_tokenizer(tmp_path, tiny_dir):
    """A reward.init checkpoint whose tokenizer has one token more than the policy's."""
    from transformers import AutoTokenizer

    other = tmp_path / "other"
    shutil.copytree(tiny_dir, other)
    tokenizer = AutoTokenizer.from_pretrained(other)
    tokenizer.add_tokens(["<|extra|>"])
    tokenizer.save_pretrained(other)
    cfg, ctx, out = setup(tmp_path, op_swap_pairs(4), init=str(other))
    with pytest.raises(StageError, match=r"round_1/reward: reward.init .* has another tokenizer \(1025 "
                                         r"tokens\) than the policy \(1024 tokens; only in the reward "
                                         r"model's: \['<\|extra\|>'\]\)"):
        run(cfg, ctx, out)
    assert not out.exists()


def test_missing_init_checkpoint(tmp_path, tiny_dir):
    gone = tmp_path / "gone"
    shutil.copytree(tiny_dir, gone)
    cfg, ctx, out = setup(tmp_path, op_swap_pairs(4), init=str(gone))
    shutil.rmtree(gone)  # deleted after the recipe was validated
    with pytest.raises(StageError, match=r"reward.init: no checkpoint at .*gone"):
        run(cfg, ctx, out)
    assert not out.exists()


def test_no_pairs_at_all(tmp_path):
    bad = [{"prompt": "hi", "chosen": "same", "rejected": "same"}]  # skipped: identical responses
    cfg, ctx, out = setup(tmp_path, bad, top={"bad_records": "skip"})
    with pytest.raises(StageError, match=r"no preference pairs to train on \(0 read, 0 held out\)"):
        run(cfg, ctx, out)
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# data and scoring, without training


def test_held_out_split_keeps_a_prompts_pairs_together(tmp_path):
    """Two rankings of 3 responses (3 pairs each) and 60 plain pairs: every prompt's pairs land
    on one side, the side is held_out_prompt(prompt_id), and about eval_fraction of the prompts
    are held out (binomial: 62 prompts x 0.3 = 18.6 expected, sd 3.6; the bounds are +-2.5 sd)."""
    rankings = [{"prompt_id": f"r{i}", "prompt": f"Question {i}?", "responses": ["a", "b", "c"]}
                for i in range(2)]
    cfg, ctx, _ = setup(tmp_path, rankings + op_swap_pairs(60), eval_fraction=0.3)
    train, held_out, report = load_pairs(cfg, ctx)
    assert len(train) + len(held_out) == 66 and report[0]["read"] == 62
    for side, expected in ((train, False), (held_out, True)):
        assert all(held_out_prompt(p["prompt_id"], 0.3) is expected for p in side)
    assert 9 <= len({p["prompt_id"] for p in held_out}) <= 28
    ranked = [p for p in train + held_out if p["prompt_id"] == "r0"]
    assert [p["pair_id"] for p in ranked] == ["r0:0>1", "r0:0>2", "r0:1>2"]


def test_round_pairs_join_the_training_data(tmp_path):
    """Rejection-sampling pairs of earlier rounds (ctx.inputs["rs_pairs"]) are read as pairs
    named by their file; with round_pairs: false they are ignored."""
    rs = write_jsonl(tmp_path / "rs_pairs.jsonl", [{"prompt_id": "rs-1", "prompt": "Q?", "chosen": "good",
                                                   "rejected": "bad", "metadata": {"best": "s1"}}])
    cfg, ctx, _ = setup(tmp_path, op_swap_pairs(5), eval_fraction=0.0)
    ctx.inputs["rs_pairs"] = [rs]
    train, _, _ = load_pairs(cfg, ctx)
    assert len(train) == 6 and [p["origin"] for p in train if p["prompt_id"] == "rs-1"] == [str(rs)]
    cfg.reward.round_pairs = False
    assert len(load_pairs(cfg, ctx)[0]) == 5


def test_scorer_tokenizes_as_the_trainer(tiny_dir):
    """TRL's RewardTrainer tokenizes apply_chat_template(prompt + chosen); the scorer renders the
    text and tokenizes it without special tokens: the ids must be the same."""
    from transformers import AutoTokenizer
    from trl.data_utils import _tokenize

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    for pair in op_swap_pairs(5):
        prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": pair["prompt"]}]
        chosen = [{"role": "assistant", "content": pair["chosen"]}]
        trl_ids = _tokenize(tokenizer, prompt + chosen)["input_ids"]
        ours = tokenizer(render(tokenizer, prompt, pair["chosen"]), add_special_tokens=False)["input_ids"]
        assert ours == trl_ids


def test_scores_do_not_depend_on_the_batch_size(tmp_path, tiny_dir):
    """Eleven responses of different lengths scored one at a time and in batches of 7 (so rows
    are padded): equal within 1e-5 (measured: 2e-6). The tokenizer is set to left padding on
    purpose: the scorer pads as TRL's collator does (right) and restores the setting."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_dir, num_labels=1)
    model.score.weight.data.normal_(0, 1.0)  # rewards of order 1, not 0.02
    model.save_pretrained(tmp_path / "rm")
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(tiny_dir).save_pretrained(tmp_path / "rm")
    pairs = op_swap_pairs(11)
    prompts = [[{"role": "user", "content": p["prompt"]}] for p in pairs]
    responses = [p["chosen"][: 10 + 7 * i] for i, p in enumerate(pairs)]
    one = RewardScorer(tmp_path / "rm", batch_size=1)
    one.tokenizer.padding_side = "left"
    seven = RewardScorer(tmp_path / "rm", batch_size=7)
    seven.tokenizer.padding_side = "left"
    single, batched = one.score(prompts, responses), seven.score(prompts, responses)
    assert seven.tokenizer.padding_side == "left"
    assert max(abs(a - b) for a, b in zip(single, batched)) < 1e-5
    assert max(single) - min(single) > 1e-2  # the responses get different rewards


def test_check_tokenizer_with_an_added_token(tmp_path, tiny_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    AutoModelForSequenceClassification.from_pretrained(tiny_dir, num_labels=1).save_pretrained(tmp_path / "rm")
    AutoTokenizer.from_pretrained(tiny_dir).save_pretrained(tmp_path / "rm")
    scorer = RewardScorer(tmp_path / "rm")
    same = AutoTokenizer.from_pretrained(tiny_dir)
    scorer.check_tokenizer(same)  # no error
    same.add_tokens(["<|tool|>"])
    with pytest.raises(StageError, match=r"round_2/rejection_sampling: the reward model in .*rm has "
                                         r"another tokenizer \(1024 tokens\) than the policy \(1025 "
                                         r"tokens; only in the policy's: \['<\|tool\|>'\]\)"):
        scorer.check_tokenizer(same, where="round_2/rejection_sampling")
