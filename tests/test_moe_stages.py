"""Every stage that trains, on tiny Mixture-of-Experts models (docs/moe.md): SFT (Qwen3-MoE, LoRA
with merge, its coverage, aux loss and expert load in metrics.json and the report), DPO and the
reward model (Mixtral), distillation into an MoE student, and a LoRA target that matches nothing
stopping the stage with the recipe's file, line and key."""

import json
from pathlib import Path

import pytest
import torch

from alignloop.pipeline.errors import StageError
from alignloop.pipeline.runner import run_stage

pytestmark = pytest.mark.slow

TRAIN = {"max_steps": 4, "per_device_train_batch_size": 4, "logging_steps": 2, "save_steps": 1000,
         "activation_checkpointing": False, "disable_tqdm": True, "method": "lora",
         "lora": {"r": 8, "alpha": 16}}
PAIRS = Path(__file__).resolve().parents[1] / "recipes" / "data" / "example_preferences.jsonl"


def spec(tmp_path, architecture, stage, **section):
    data = ([{"builtin": "arithmetic", "count": 32}] if stage in ("sft", "distill") else
            [{"path": str(PAIRS)}])
    return {"seed": 0, "output_dir": str(tmp_path / "run"), "stages": [stage],
            "model": {"tiny": {"architecture": architecture, "num_hidden_layers": 2,
                               "initializer_range": 0.1}},
            stage: {**TRAIN, "learning_rate": 1e-3, "data": data, **section}}


def check_moe_metrics(metrics, kernel="alignloop"):
    """Coverage complete, the recipe's coefficient, an aux loss per log, and per layer each
    expert's share of the tokens (they sum to k = 2) with its coefficient of variation."""
    kinds = {row["kind"]: row for row in metrics["lora_coverage"]}
    assert kinds["routed experts"]["lora"] == kinds["routed experts"]["tensors"] == 4
    assert kinds["router"]["lora"] == kinds["router"]["full"] == 0
    moe = metrics["moe"]
    assert moe["experts_kernel"] == kernel and len(moe["aux_losses"]) == 2
    assert all(a >= 1.0 for a in moe["aux_losses"])  # E * sum f P >= 1
    assert len(moe["load"]["layers"]) == 2
    for layer in moe["load"]["layers"]:
        assert sum(layer["token_share"]) == pytest.approx(2.0, abs=1e-3)
        assert 0 <= layer["cv"] <= 3 ** 0.5  # at most everything on one of 4 experts
    assert metrics["load_cv"] == moe["load"]["mean_cv"]


def test_sft_on_a_tiny_qwen3_moe(tmp_path):
    """LoRA SFT with merge: the merged model's logits equal the adapter's (fp32, 1e-5); the
    report has the stage's expert-load column."""
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    from alignloop.config import load_recipe
    from alignloop.pipeline.report import write_report

    recipe = spec(tmp_path, "qwen3_moe", "sft", merge=True, max_length=96, learning_rate=1e-2)
    recipe["moe"] = {"aux_loss_coef": 0.02}
    result = run_stage("sft", recipe)
    check_moe_metrics(result.metrics)
    assert result.metrics["moe"]["aux_loss_coef"] == 0.02
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        adapter = AutoPeftModelForCausalLM.from_pretrained(result.path / "model").eval()(ids).logits
        merged = AutoModelForCausalLM.from_pretrained(result.path / "merged").eval()(ids).logits
    assert (adapter - merged).abs().max() <= 1e-5
    write_report(load_recipe(recipe, check_trainer=False), tmp_path / "run")
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert [row.get("sft_load_cv") for row in report["rows"]] == [result.metrics["load_cv"]]
    assert "SFT expert load CV" in (tmp_path / "run" / "report.md").read_text()


def test_dpo_on_a_tiny_mixtral(tmp_path):
    """The logged loss is the preference term + 0.2 x NLL + coef x aux (Mixtral's 0.001)."""
    result = run_stage("dpo", spec(tmp_path, "mixtral", "dpo"))
    check_moe_metrics(result.metrics)
    assert result.metrics["moe"]["aux_loss_coef"] == 0.001
    for entry in result.metrics["log"]:
        total = entry["loss/dpo"] + 0.2 * entry["loss/nll"] + 0.001 * entry["aux_loss"]
        assert entry["loss"] == pytest.approx(total, abs=1e-4)


def test_reward_model_on_a_tiny_mixtral(tmp_path):
    result = run_stage("reward", spec(tmp_path, "mixtral", "reward", eval_fraction=0.2))
    check_moe_metrics(result.metrics)


def test_reward_model_on_olmoe_says_there_is_no_head(tmp_path):
    with pytest.raises(StageError, match="no sequence-classification model"):
        run_stage("reward", spec(tmp_path, "olmoe", "reward", eval_fraction=0.2))


def test_distill_into_an_moe_student(tmp_path):
    """The student is the recipe's model (its own teacher): KD starts at 0, and the loss of the
    first log is coef x aux alone."""
    recipe = spec(tmp_path, "qwen3_moe", "distill", max_length=96, logging_steps=1, max_steps=2)
    result = run_stage("distill", recipe)
    metrics = result.metrics
    assert metrics["kd"][0] < 1e-3 and metrics["moe"]["experts_kernel"] == "alignloop"
    assert metrics["losses"][0] == pytest.approx(0.001 * metrics["moe"]["aux_losses"][0], abs=2e-4)


def test_a_target_that_matches_nothing_stops_the_stage_naming_file_line_and_key(tmp_path):
    import yaml

    recipe = spec(tmp_path, "mixtral", "sft", max_length=96)
    recipe["sft"]["lora"]["target_modules"] = ["q_proj", "w1"]  # Mixtral's expert name in v4
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if text.strip() == "- w1")
    with pytest.raises(StageError) as err:
        run_stage("sft", str(path))
    assert str(err.value).startswith(f"round_1/sft: {path}:{line}: sft.lora.target_modules.1: 'w1' "
                                     "matches no module of the model (a transformers 4 name")
