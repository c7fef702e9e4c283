"""Vision stages on the tiny Llama: the frozen language model stays bit-identical, LoRA changes
it, DPO's loss starts at log 2 and trains, and vision recipes validate strictly (issue 4, item 5)."""

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM, MllamaForConditionalGeneration

from alignloop.config import RecipeError, load_recipe
from alignloop.pipeline.context import StageContext
from alignloop.vision import stage as vision_stage
from alignloop.vision.convert import from_mllama

TRAIN = dict(per_device_train_batch_size=8, learning_rate=3.0e-3, num_train_epochs=1, logging_steps=1,
             save_steps=100, max_length=64)


def _recipe(tmp_path, stages, **sections):
    spec = {"output_dir": str(tmp_path / "run"), "model": {"path": "builtin:tiny"},
            "vision": {"adapter_config": {"encoder": "tiny", "cross_attention_every": 2},
                       "stages": stages, **sections}}
    return load_recipe(spec)


def _shapes(kind="vision_chat", count=32):
    return [{"builtin": "shapes", "split": "train", "count": count}]


def _ctx(tmp_path, name, policy):
    return StageContext(name=name, round=1, policy=str(policy), base=str(policy), seed=1,
                        work_dir=tmp_path / ".work" / name, log_dir=tmp_path / "logs" / name)


def _load(model_dir):
    return from_mllama(MllamaForConditionalGeneration.from_pretrained(model_dir)).eval()


@pytest.fixture(scope="module")
def adapter_run(tmp_path_factory, tiny_dir):
    tmp_path = tmp_path_factory.mktemp("adapter")
    cfg = _recipe(tmp_path, ["adapter"], adapter={"data": _shapes(), **TRAIN})
    metrics = vision_stage.adapter(cfg, _ctx(tmp_path, "vision_adapter", tiny_dir), tmp_path / "out")
    return tmp_path / "out", metrics


def test_adapter_training_leaves_the_language_model_bit_identical(adapter_run, tiny_dir):
    out, metrics = adapter_run
    assert metrics["steps"] == 4 and len(metrics["losses"]) == 4
    assert set(metrics["trained"]) == {"encoder", "projector", "cross_attention", "image_rows"}
    trained = _load(out / "model")
    base = LlamaForCausalLM.from_pretrained(tiny_dir)
    lm = trained.language_model.state_dict()
    for name, value in base.state_dict().items():
        assert torch.equal(lm[name], value), name
    gates = [layer.cross_attn_attn_gate.item() for layer in trained.cross_attention_layers.values()]
    assert all(g != 0.0 for g in gates)  # the adapter did train
    assert json.loads((out / "metrics.json").read_text())["steps"] == 4


def test_lora_on_the_language_model_changes_it_and_merges(tmp_path, tiny_dir):
    cfg = _recipe(tmp_path, ["sft"], sft={"data": _shapes(), "train": ["cross_attention"],
                                          "lora": {"r": 4, "alpha": 8, "dropout": 0.0}, **TRAIN})
    metrics = vision_stage.sft(cfg, _ctx(tmp_path, "vision_sft", tiny_dir), tmp_path / "out")
    assert set(metrics["trained"]) == {"cross_attention", "lm_lora"}
    trained = _load(tmp_path / "out" / "model")
    base = LlamaForCausalLM.from_pretrained(tiny_dir)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(trained.language_model.state_dict()[q], base.state_dict()[q])
    assert "lora" not in " ".join(trained.state_dict())  # merged: a plain Mllama


def test_dpo_loss_starts_at_log_2_and_falls(tmp_path, adapter_run):
    """DPO from the adapter stage's Mllama checkpoint. At step 0 the policy is the reference, so
    each pair's term is -log sigmoid(0) = log 2; training on the same 16 pairs lowers it."""
    cfg = _recipe(tmp_path, ["dpo"], dpo={"data": [{"builtin": "shapes", "split": "train", "count": 16}],
                                          "nll_weight": 0.0, **TRAIN, "learning_rate": 2.0e-2,
                                          "num_train_epochs": 3})
    metrics = vision_stage.dpo(cfg, _ctx(tmp_path, "vision_dpo", adapter_run[0] / "model"), tmp_path / "out")
    assert metrics["losses"][0] == pytest.approx(math.log(2), abs=1e-4)
    assert metrics["losses"][-1] < math.log(2) - 0.01
    rows = [json.loads(line) for line in (tmp_path / "out" / "data.jsonl").read_text().splitlines()]
    assert len(rows) == 16 and all("_reference" not in r for r in rows)


def test_token_log_probs_by_hand():
    """Uniform logits over 4 tokens: each label token has log-prob log(1/4); 2 of 3 predicted
    positions are labelled, so the summed response log-prob is 2 log(1/4)."""
    from alignloop.losses import token_log_probs

    logits = torch.zeros(1, 4, 4)
    labels = torch.tensor([[-100, 2, -100, 1]])
    log_probs, mask = token_log_probs(logits, labels)
    assert mask.tolist() == [[1, 0, 1]]
    assert log_probs.sum().item() == pytest.approx(2 * math.log(0.25))


def test_vision_dpo_loss_is_the_shared_maths_with_the_nll_per_sequence():
    """Vision DPO's loss is alignloop.losses' maths. Logits give token 1 probability 1/2 and the
    other three 1/6 each. Two pairs; chosen 0 is token 1 (-log p = log 2), chosen 1 is tokens 1
    and 2 (log 2 + log 6 = log 12). The reference log-probs equal the policy's, so the sigmoid
    term is log 2. The NLL term per sequence (Llama 3, the default) is (log 2 / 1 + log 12 / 2) / 2
    = 0.9678; per token it would be (log 2 + log 12) / 3 = 1.0594. With nll_weight 0.5 the loss
    is log 2 + 0.5 x 0.9678."""
    from alignloop.vision.trainer import VisionDPOTrainer

    class Model(torch.nn.Module):
        def forward(self, input_ids):
            logits = torch.zeros(*input_ids.shape, 4)
            logits[..., 1] = math.log(3)
            return type("Out", (), {"logits": logits})()

    ids = torch.zeros(2, 4, dtype=torch.long)
    half, sixth = math.log(0.5), math.log(1 / 6)
    inputs = {"chosen": {"input_ids": ids, "labels": torch.tensor([[-100, 1, -100, -100], [-100, 1, 2, -100]])},
              "rejected": {"input_ids": ids, "labels": torch.tensor([[-100, 3, 3, -100], [-100, 2, -100, -100]])},
              "reference": torch.tensor([[half, 2 * sixth], [half + sixth, sixth]])}
    trainer = VisionDPOTrainer.__new__(VisionDPOTrainer)  # compute_loss only: no Trainer set-up
    expected = {"sequence": (math.log(2) + math.log(12) / 2) / 2, "token": (math.log(2) + math.log(12)) / 3}
    for normalization, nll in expected.items():
        trainer.beta, trainer.nll_weight, trainer.nll_normalization = 0.1, 0.5, normalization
        batch = {k: (dict(v) if isinstance(v, dict) else v) for k, v in inputs.items()}
        loss = trainer.compute_loss(Model(), batch)
        assert loss.item() == pytest.approx(math.log(2) + 0.5 * nll, rel=1e-5), normalization


def test_vision_recipes_are_strict(tmp_path):
    base = {"model": {"path": "builtin:tiny"}, "vision": {"stages": ["adapter"], "adapter": {"data": _shapes()}}}
    assert load_recipe(base).stages == []
    with pytest.raises(RecipeError, match="a vision recipe runs vision.stages"):
        load_recipe({**base, "stages": ["sft"]})
    with pytest.raises(RecipeError, match=r"vision.adapter.learning_rat: unknown key \(did you mean 'learning_rate'"):
        load_recipe({**base, "vision": {"stages": ["adapter"], "adapter": {"data": _shapes(), "learning_rat": 1}}})
    with pytest.raises(RecipeError, match="vision.sft.data: the vision sft stage needs at least one data source"):
        load_recipe({**base, "vision": {"stages": ["sft"]}})
    with pytest.raises(RecipeError, match="vision stages run in the order adapter, sft, reward, dpo"):
        load_recipe({**base, "vision": {"stages": ["sft", "adapter"]}})
    # the evaluation task resolves through the one verifier registry (alignloop.reward.verifiers)
    evaluation = {"data": _shapes(), "task": "shapez"}
    with pytest.raises(RecipeError, match=r"vision.evaluation.task: unknown verifier 'shapez' \(known: "
                                          r"arithmetic, safety, shapes"):
        load_recipe({**base, "vision": {**base["vision"], "evaluation": evaluation}})
    evaluation["task"] = "alignloop.data.tasks.shapes:verify"  # a module:function path works too
    assert load_recipe({**base, "vision": {**base["vision"], "evaluation": evaluation}}).vision.evaluation


def test_vision_run_accuracy_rises_text_unchanged_and_resumes(tmp_path, capsys):
    """The quickstart recipe, shrunk (512 training pictures, 48 held-out questions), through the
    pipeline like a text recipe: greedy answers of the untrained model are never right (accuracy
    0), after the adapter stage some are; text-only answers are token-identical; the run
    directory has manifest.json, report.md and report.png; a second run skips the completed stage."""
    from alignloop.manifest import read_manifest
    from alignloop.pipeline.runner import run

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "vision_quickstart.yaml"
    overrides = ["vision.adapter.data.0.count=512", "vision.adapter.per_device_train_batch_size=16",
                 "vision.evaluation.data.0.count=48",
                 "vision.adapter.logging_steps=8"]
    cfg = load_recipe(recipe, overrides, output_dir=tmp_path / "run")
    run(cfg)
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    rows = {row["label"]: row for row in report["rows"]}
    assert rows["base"]["accuracy"] == 0.0 and rows["round_1"]["accuracy"] > 0.0
    assert rows["round_1"]["text_only_unchanged"] is True
    assert rows["round_1"]["adapter_loss"] is not None
    change = report["changes"][0]
    assert (change["point"], change["against"]) == ("round_1", "base") and change["accuracy"]["n"] == 48
    assert (tmp_path / "run" / "report.png").is_file()
    assert "held-out task accuracy" in (tmp_path / "run" / "report.md").read_text()
    assert read_manifest(tmp_path / "run")["stages"]["round_1/vision_adapter"]["status"] == "complete"
    assert "eval before: accuracy 0.000" in capsys.readouterr().out
    again = run(load_recipe(recipe, overrides, output_dir=tmp_path / "run"))
    assert again.stages["round_1/vision_adapter"].skipped


def test_kill_9_in_the_vision_adapter_stage_then_resume(tmp_path):
    """`alignloop run` of a vision recipe killed with SIGKILL while the adapter trains: no stage
    directory is half-written; the same command continues from the last checkpoint and ends with
    the same losses as a run that was never interrupted."""
    import subprocess
    import sys

    import yaml
    from conftest import kill_at_first_checkpoint

    from alignloop.manifest import read_manifest

    root = Path(__file__).resolve().parents[1]
    spec = {"seed": 0, "model": {"path": "builtin:tiny"},
            "vision": {"adapter_config": {"encoder": "tiny", "cross_attention_every": 2},
                       "stages": ["adapter"],
                       "adapter": {"data": _shapes(count=96), **TRAIN, "num_train_epochs": 4,
                                   "save_steps": 4, "disable_tqdm": True}}}
    paths = {}
    for name in ("a", "b"):
        paths[name] = tmp_path / f"{name}.yaml"
        paths[name].write_text(yaml.safe_dump({**spec, "output_dir": str(tmp_path / name)}))
    cli = [sys.executable, "-m", "alignloop.cli", "run"]
    out = subprocess.run([*cli, str(paths["a"])], capture_output=True, text=True, cwd=root)
    assert out.returncode == 0, out.stderr[-3000:]

    kill_at_first_checkpoint([*cli, str(paths["b"])],
                             tmp_path / "b" / ".work" / "round_1" / "vision_adapter" / "checkpoints", root)
    assert not (tmp_path / "b" / "round_1" / "vision_adapter").exists()

    out = subprocess.run([*cli, str(paths["b"])], capture_output=True, text=True, cwd=root)
    assert out.returncode == 0, out.stderr[-3000:]
    record = read_manifest(tmp_path / "b")["stages"]["round_1/vision_adapter"]
    assert len(record["attempts"]) == 2 and "checkpoint-" in record["attempts"][1]["resumed_from"]
    losses = [json.loads((tmp_path / n / "round_1" / "vision_adapter" / "metrics.json").read_text())["losses"]
              for n in ("a", "b")]
    assert losses[0] == losses[1]
    assert (tmp_path / "b" / "report.md").is_file() and (tmp_path / "b" / "manifest.json").is_file()


def test_vision_reward_model_trains_encoder_and_cross_layers_only(tmp_path, adapter_run):
    """Llama 3 §7.5: self-attention frozen, encoder + cross-attention + score head trained, the
    language RM's transformer and head copied in. Training on 16 pairs (3 epochs) lowers the loss
    and the saved head reloads."""
    from transformers import LlamaForSequenceClassification

    from alignloop.models.tiny import tiny_config
    from alignloop.vision.reward import load_reward_model

    torch.manual_seed(5)
    config = tiny_config()
    config.num_labels = 1
    text_rm = LlamaForSequenceClassification(config)
    text_rm.save_pretrained(tmp_path / "text_rm")
    cfg = _recipe(tmp_path, ["reward"], reward={
        "data": [{"builtin": "shapes", "split": "train", "count": 16}], "penalty": 0.01,
        "text_reward_model": str(tmp_path / "text_rm"), **TRAIN, "learning_rate": 1.0e-2,
        "num_train_epochs": 3})
    metrics = vision_stage.reward(cfg, _ctx(tmp_path, "vision_reward", adapter_run[0] / "model"), tmp_path / "out")
    assert set(metrics["trained"]) == {"encoder", "cross_attention", "score"}
    assert metrics["losses"][-1] < metrics["losses"][0]
    vision = _load(tmp_path / "out" / "model")
    lm = vision.language_model.state_dict()
    for name, value in text_rm.model.state_dict().items():  # the language RM's, untouched
        assert torch.equal(lm[f"model.{name}"], value), name
    reward = load_reward_model(vision, tmp_path / "out" / "model")
    assert not torch.equal(reward.score.weight, text_rm.score.weight)  # trained from the RM's head


def test_reward_loss_by_hand():
    """Equal rewards: -log sigmoid(0) = log 2; the penalty adds coef x mean(r^2) = 0.1 x 4."""
    from alignloop.vision.reward import reward_loss

    zeros, twos = torch.zeros(3), torch.full((3,), 2.0)
    assert reward_loss(zeros, zeros, 0.1).item() == pytest.approx(math.log(2))
    assert reward_loss(twos, twos, 0.1).item() == pytest.approx(math.log(2) + 0.4)


def test_cli_validates_vision_recipes_and_names_their_stages(tmp_path, capsys):
    from alignloop.cli import main

    recipe = str(Path(__file__).resolve().parents[1] / "recipes" / "vision_quickstart.yaml")
    assert main(["validate", recipe]) == 0
    assert "stages: vision_adapter;" in capsys.readouterr().out
    assert main(["stage", "vision_dpo", recipe, "--output-dir", str(tmp_path / "run")]) == 2
    assert "stage 'vision_dpo' is not in this recipe's stages (vision_adapter" in capsys.readouterr().err


def test_killed_adapter_training_resumes_to_the_same_result(tmp_path, tiny_dir):
    """8 steps with a checkpoint (trainable tensors only) every 4; the last checkpoint removed, as
    if killed after step 4: the rerun resumes from checkpoint-4 and ends with the same losses and
    bit-identical weights as the uninterrupted run."""
    import shutil

    cfg = _recipe(tmp_path, ["adapter"], adapter={"data": _shapes(), **TRAIN, "num_train_epochs": 2,
                                                  "save_steps": 4})
    full = vision_stage.adapter(cfg, _ctx(tmp_path, "vision_adapter", tiny_dir), tmp_path / "full")
    shutil.rmtree(tmp_path / ".work" / "vision_adapter" / "checkpoints" / "checkpoint-8")
    again = vision_stage.adapter(cfg, _ctx(tmp_path, "vision_adapter", tiny_dir), tmp_path / "again")
    assert again["resumed_from"].endswith("checkpoint-4") and again["losses"] == full["losses"]
    first, second = _load(tmp_path / "full" / "model"), _load(tmp_path / "again" / "model")
    assert all(torch.equal(v, second.state_dict()[k]) for k, v in first.state_dict().items())


def test_lora_init_does_not_depend_on_earlier_random_draws(tiny_dir):
    """LoRA's A matrices are drawn from the stage's seed, not from whatever the process did before
    (a second stage in one process, or a Trainer that already seeded)."""
    from alignloop.vision.config import AdapterConfig, VisionTrainSection
    from alignloop.vision.model import build
    from alignloop.vision.trainer import prepare_for_training

    section = VisionTrainSection(train=["cross_attention"], lora={"r": 4})
    weights = []
    for draws in (0, 5):
        torch.rand(draws)
        model = build(str(tiny_dir), AdapterConfig(encoder="tiny"))
        prepare_for_training(model, section, seed=3)
        weights.append({n: p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n})
    assert weights[0] and all(torch.equal(v, weights[1][k]) for k, v in weights[0].items())
