"""The trainers' arguments (alignloop.training): one set of defaults for TRL's configs and the
vision stages' TrainingArguments, the recipe's options over them, and the pass-through check."""

import os
from pathlib import Path

import pytest

from alignloop import hardware
from alignloop.config import load_recipe
from alignloop.dpo.config import DPOStageConfig
from alignloop.training import (VISION, check_trainer_options, tensorboard_logs, training_arguments,
                                trl_config)

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
# Every trainer's defaults (the recipes below leave them alone), built for fp32.
DEFAULTS = {"seed": 0, "save_strategy": "steps", "save_total_limit": 2, "report_to": [], "bf16": False,
            "fp16": False, "use_cpu": not hardware.cuda_available(), "dataloader_num_workers": 0,
            "disable_tqdm": False}


def build(cfg, stage: str, out: Path):
    return trl_config(stage, getattr(cfg, stage), seed=cfg.seed, precision="fp32", output_dir=out)


# What the recipe-wide builder (config.trainer_args) made of these recipes before issue 13 split
# it out, field by field: the recipe's values, our defaults for the rest, and for dpo Llama 3's
# loss (sigmoid + 0.2 NLL, from nll_weight) with reference log-probs precomputed when the stage
# trains in full (quickstart) and not for one epoch of LoRA (smollm2). Round 0 is initial_sft's
# keys over sft's: its own epochs, learning rate and warmup; sft's max_length and batch size.
EXPECTED = {
    ("quickstart.yaml", 0, "sft"): dict(learning_rate=3e-3, num_train_epochs=1, warmup_steps=50,
                                        per_device_train_batch_size=32, max_length=96, save_steps=100,
                                        logging_steps=10, lr_scheduler_type="cosine",
                                        activation_checkpointing=False),
    ("quickstart.yaml", 1, "sft"): dict(learning_rate=2e-4, num_train_epochs=2, warmup_steps=5,
                                        per_device_train_batch_size=32, max_length=96, save_steps=100,
                                        activation_checkpointing=False),
    ("quickstart.yaml", 1, "reward"): dict(learning_rate=1e-3, num_train_epochs=1, max_length=128,
                                           per_device_train_batch_size=32, lr_scheduler_type="linear",
                                           activation_checkpointing=False),
    ("quickstart.yaml", 1, "dpo"): dict(learning_rate=1e-5, num_train_epochs=1, max_length=128, beta=0.1,
                                        per_device_train_batch_size=16, loss_type=["sigmoid", "sft"],
                                        loss_weights=[1.0, 0.2], precompute_ref_log_probs=True,
                                        activation_checkpointing=False),
    ("smollm2_135m_loop.yaml", 0, "sft"): dict(learning_rate=5e-4, num_train_epochs=1, warmup_steps=4,
                                               per_device_train_batch_size=16, max_length=128,
                                               save_steps=20, logging_steps=5,
                                               activation_checkpointing=True),
    ("smollm2_135m_loop.yaml", 1, "reward"): dict(learning_rate=5e-4, max_length=128, save_steps=20,
                                                  activation_checkpointing=True),
    ("smollm2_135m_loop.yaml", 1, "dpo"): dict(learning_rate=1e-5, max_length=128, loss_weights=[1.0, 0.2],
                                               loss_type=["sigmoid", "sft"],
                                               precompute_ref_log_probs=False),
}


@pytest.mark.parametrize("name, rnd, stage", sorted(EXPECTED), ids=lambda v: str(v))
def test_recipes_build_the_arguments_they_built_before(name, rnd, stage, tmp_path):
    cfg = load_recipe(RECIPES / name, ["model.path=builtin:tiny"], check_trainer=False).for_round(rnd)
    args = build(cfg, stage, tmp_path)
    got = {key: getattr(args, key) for key in {**DEFAULTS, **EXPECTED[name, rnd, stage]}}
    assert got == {**DEFAULTS, **EXPECTED[name, rnd, stage]}
    assert args.output_dir == str(tmp_path)


def test_vision_arguments_share_the_defaults(tmp_path):
    cfg = load_recipe(RECIPES / "vision_quickstart.yaml", check_trainer=False)
    args = training_arguments(cfg.vision.adapter, seed=cfg.seed, precision="fp32", output_dir=tmp_path)
    assert {key: getattr(args, key) for key in DEFAULTS} == DEFAULTS
    assert (args.learning_rate, args.num_train_epochs, args.save_steps, args.logging_steps) == (3e-3, 3, 250, 25)
    assert args.remove_unused_columns is False and args.output_dir == str(tmp_path)


def test_dpo_learning_rate_default_lives_on_the_section(tmp_path):
    """Llama 3's 1e-5 (reference A5) is DPOStageConfig's default, not TRL's 1e-6; a recipe wins."""
    section = DPOStageConfig()
    assert section.learning_rate == 1e-5 and "learning_rate" not in section.trainer_options
    out = tmp_path / "out"
    assert trl_config("dpo", section, seed=0, precision="fp32", output_dir=out).learning_rate == 1e-5
    section = DPOStageConfig(learning_rate=3e-6)
    assert trl_config("dpo", section, seed=0, precision="fp32", output_dir=out).learning_rate == 3e-6


def test_one_option_check_for_trl_and_vision_sections():
    from alignloop.sft.config import SFTStageConfig
    from alignloop.vision.config import VisionTrainSection

    sft = SFTStageConfig(learnig_rate=1e-4, output_dir="x", num_train_epochs="lots")
    assert check_trainer_options(sft, "sft") == [
        ("learnig_rate", "unknown key (did you mean 'learning_rate'?); not an alignloop key nor a "
                         "SFTConfig field"),
        ("output_dir", "not settable here: set the top-level output_dir"),
        ("num_train_epochs", "Input should be a valid number, unable to parse string as a number "
                             "(got 'lots')")]
    vision = VisionTrainSection(remove_unused_columns=True, max_lenght=3)
    assert check_trainer_options(vision, VISION) == [
        ("remove_unused_columns", "not settable here: vision batches are built by alignloop's collator"),
        ("max_lenght", "unknown key (did you mean 'max_length'?); not an alignloop key nor a "
                       "TrainingArguments field")]


def test_tensorboard_logs_points_at_the_stage_log_dir_and_leaves_a_users_own(tmp_path, monkeypatch):
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    with tensorboard_logs(tmp_path / "logs"):
        assert os.environ["TENSORBOARD_LOGGING_DIR"] == str(tmp_path / "logs")
    assert "TENSORBOARD_LOGGING_DIR" not in os.environ
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", "mine")
    with tensorboard_logs(tmp_path / "logs"):
        assert os.environ["TENSORBOARD_LOGGING_DIR"] == "mine"
