"""Recipe validation: every problem is reported with the file, line and key, before anything runs."""

import re
from pathlib import Path
from textwrap import dedent

import pytest

from alignloop import config, hardware
from alignloop.config import RecipeError, load_recipe
from alignloop.training import trl_config

DATA = Path(__file__).resolve().parents[1] / "recipes" / "data" / "example_chat.jsonl"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(dedent(text).lstrip())
    return path


def problems(recipe, overrides=(), **kwargs) -> list[str]:
    with pytest.raises(RecipeError) as err:
        load_recipe(recipe, overrides, **kwargs)
    return err.value.problems


def test_minimal_recipe_gets_defaults_and_builds_sft_config(tmp_path):
    path = write(tmp_path, f"""
        sft:
          data:
            - path: {DATA}
          learning_rate: 2e-5
        """)
    cfg = load_recipe(path)
    assert cfg.model.path == "builtin:tiny" and cfg.sft.method == "full" and cfg.stages == ["sft"]
    args = trl_config("sft", cfg.sft, seed=cfg.seed, precision="fp32", output_dir=tmp_path / "out")
    assert args.learning_rate == 2e-5  # `2e-5` is a float, not the string YAML 1.1 makes of it
    assert args.output_dir == str(tmp_path / "out") and args.max_length == 1024


def test_unknown_key_names_file_line_and_suggests(tmp_path):
    path = write(tmp_path, f"""
        seed: 3
        sft:
          data:
            - path: {DATA}
          learnig_rate: 1.0e-4
        """)
    assert problems(path) == [f"{path}:5: sft.learnig_rate: unknown key (did you mean "
                              "'learning_rate'?); not an alignloop key nor a SFTConfig field"]


def test_unknown_top_level_and_nested_keys(tmp_path):
    path = write(tmp_path, f"""
        seeed: 3
        model:
          pth: x
        sft:
          data:
            - path: {DATA}
              wieght: 2
        """)
    found = problems(path)
    assert f"{path}:1: seeed: unknown key (did you mean 'seed'?)" in found
    assert f"{path}:3: model.pth: unknown key (did you mean 'path'?)" in found
    assert f"{path}:7: sft.data.0.wieght: unknown key (did you mean 'weight'?)" in found


def test_wrong_types_name_the_key(tmp_path):
    path = write(tmp_path, f"""
        seed: many
        sft:
          method: lora
          lora:
            r: -1
          data:
            - path: {DATA}
          num_train_epochs: lots
        """)
    found = problems(path)
    assert any(p.startswith(f"{path}:1: seed: Input should be a valid integer") for p in found)
    assert any(p.startswith(f"{path}:5: sft.lora.r: Input should be greater than 0") for p in found)


def test_trainer_option_type_checked_even_though_trl_accepts_it(tmp_path):
    path = write(tmp_path, f"""
        sft:
          data:
            - path: {DATA}
          num_train_epochs: lots
        """)
    (problem,) = problems(path)
    assert problem.startswith(f"{path}:4: sft.num_train_epochs: Input should be a valid number")


def test_missing_data_file(tmp_path):
    path = write(tmp_path, """
        sft:
          data:
            - path: data/missing.jsonl
        """)
    assert problems(path) == [f"{path}:3: sft.data.0.path: no such file or directory: "
                              f"{tmp_path / 'data' / 'missing.jsonl'}"]


def test_relative_paths_resolve_against_the_recipe(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text(DATA.read_text())
    path = write(tmp_path, """
        sft:
          data:
            - path: data/train.jsonl
        """)
    assert load_recipe(path, check_trainer=False).sft.data[0].path == tmp_path / "data" / "train.jsonl"


@pytest.mark.parametrize("section, expected", [
    ("method: full\n  lora: {r: 8}", "sft.lora: only used when method is lora or qlora (it is 'full')"),
    ("method: full\n  merge: true", "sft.merge: merging needs method lora or qlora"),
    ("method: lora\n  quantization: {bits: 4}", "sft.quantization: quantization is for method: qlora"),
    ("output_dir: elsewhere", "sft.output_dir: not settable here: set the top-level output_dir"),
    ("assistant_only_loss: true", "sft.assistant_only_loss: not settable here: the loss is always on "
                                  "assistant tokens only (our masks)"),
])
def test_impossible_combinations(tmp_path, section, expected):
    path = write(tmp_path, f"sft:\n  data:\n    - path: {DATA}\n  {section}\n")
    (problem,) = problems(path)
    assert problem.endswith(expected) and problem.startswith(f"{path}:")


def test_qlora_without_bitsandbytes(tmp_path, monkeypatch):
    monkeypatch.setattr(hardware, "has_module", lambda name: name != "bitsandbytes")
    path = write(tmp_path, f"sft:\n  method: qlora\n  data:\n    - path: {DATA}\n")
    assert problems(path) == [f"{path}:2: sft.method: qlora needs bitsandbytes, which is not "
                              "installed (pip install bitsandbytes), or use method: lora"]


def test_bf16_without_hardware_support(tmp_path, monkeypatch):
    monkeypatch.setattr(hardware, "bf16_supported", lambda: False)
    path = write(tmp_path, f"precision: bf16\nsft:\n  data:\n    - path: {DATA}\n")
    (problem,) = problems(path)
    assert problem.startswith(f"{path}:1: precision: bf16 was asked for, but this machine has no CUDA GPU")
    # the same through the trainer option
    path = write(tmp_path, f"sft:\n  bf16: true\n  data:\n    - path: {DATA}\n")
    (problem,) = problems(path)
    assert problem.startswith(f"{path}:2: sft.bf16: bf16 was asked for")


def test_fp16_needs_cuda(tmp_path, monkeypatch):
    monkeypatch.setattr(hardware, "cuda_available", lambda: False)
    path = write(tmp_path, f"precision: fp16\nsft:\n  data:\n    - path: {DATA}\n")
    assert problems(path) == [f"{path}:1: precision: fp16 mixed precision needs a CUDA GPU; "
                              "use precision: auto or fp32"]


def test_trl_config_rejection_is_reported(tmp_path):
    path = write(tmp_path, f"""
        sft:
          data:
            - path: {DATA}
          load_best_model_at_end: true
          save_strategy: epoch
        """)
    (problem,) = problems(path)
    assert problem.startswith(f"{path}:1: sft: SFTConfig rejected these options: "
                              "--load_best_model_at_end requires the save and eval strategy to match")


def test_set_overrides(tmp_path):
    path = write(tmp_path, f"sft:\n  data:\n    - path: {DATA}\n")
    cfg = load_recipe(path, ["sft.learning_rate=2e-5", "sft.method=lora", "sft.lora.r=4",
                             "sft.data.0.count=5", "seed=7"])
    assert cfg.sft.trainer_options["learning_rate"] == 2e-5 and cfg.seed == 7
    assert cfg.sft.method == "lora" and cfg.sft.lora.r == 4 and cfg.sft.data[0].count == 5


def test_bad_override_is_named_as_such(tmp_path):
    path = write(tmp_path, f"sft:\n  data:\n    - path: {DATA}\n")
    found = problems(path, ["sft.learning_rate=abc", "sft.foo.bar=1"])
    assert "--set sft.learning_rate: Input should be a valid number, unable to parse string as a " \
           "number (got 'abc')" in found
    assert any(p.startswith("--set sft.foo: unknown key") for p in found)


def test_override_syntax_error(tmp_path):
    path = write(tmp_path, f"sft:\n  data:\n    - path: {DATA}\n")
    with pytest.raises(RecipeError, match="learning_rate"):
        load_recipe(path, ["learning_rate"])


def test_dict_recipe_and_unknown_evaluation_task():
    found = problems({"sft": {"data": [{"path": str(DATA)}]},
                      "evaluation": {"task": "poetry", "data": [{"builtin": "arithmetic"}]}},
                     check_trainer=False)
    assert len(found) == 1
    assert found[0].startswith("<dict>: evaluation.task: unknown verifier 'poetry' (known: arithmetic")


def test_sft_without_data(tmp_path):
    path = write(tmp_path, "seed: 1\n")
    assert problems(path, check_trainer=False) == [f"{path}: sft.data: the sft stage needs at "
                                                   "least one data source"]


def test_data_source_needs_exactly_one_origin(tmp_path):
    path = write(tmp_path, f"sft:\n  data:\n    - path: {DATA}\n      builtin: arithmetic\n")
    (problem,) = problems(path, check_trainer=False)
    assert problem.startswith(f"{path}:3: sft.data.0: ") and "exactly one of 'path', 'hub' or 'builtin'" in problem


def test_gradient_checkpointing_is_an_alias(tmp_path):
    path = write(tmp_path, f"sft:\n  data:\n    - path: {DATA}\n  gradient_checkpointing: false\n")
    cfg = load_recipe(path)
    args = trl_config("sft", cfg.sft, seed=cfg.seed, precision="fp32", output_dir=tmp_path)
    assert args.activation_checkpointing is False


def test_unknown_builtin_dataset(tmp_path):
    path = write(tmp_path, "sft:\n  data:\n    - builtin: arithmetics\n")
    assert problems(path, check_trainer=False) == [
        f"{path}:3: sft.data.0.builtin: unknown builtin dataset 'arithmetics' (known: arithmetic, safety, shapes)"]


def test_trainer_option_at_top_level_points_to_the_stage(tmp_path):
    path = write(tmp_path, f"learning_rate: 1.0e-4\nsft:\n  data:\n    - path: {DATA}\n")
    assert problems(path) == [f"{path}:1: learning_rate: unknown key (did you mean "
                              "'sft.learning_rate'? trainer options go in the stage's section: sft, reward or dpo)"]


LOOP = """
rounds: 1
stages: [reward, rejection_sampling, sft, dpo]
reward: {data: [{builtin: arithmetic, count: 8}]}
rejection_sampling:
  prompts: [{builtin: arithmetic, count: 8}]
  num_samples: 4
  temperatures: [0.7, 1.0]
sft: {data: [{builtin: arithmetic, count: 8}]}
"""


def test_the_loop_template_itself_is_valid(tmp_path):
    cfg = load_recipe(write(tmp_path, LOOP), check_trainer=False)
    assert cfg.stages == ["reward", "rejection_sampling", "sft", "dpo"]


@pytest.mark.parametrize("edit, key, reason", [
    ({"num_samples: 4": "num_samples: 1", "[0.7, 1.0]": "[1.0]"},
     "rejection_sampling.num_samples", "needs at least 2 samples per prompt (got 1)"),
    ({"num_samples: 4": "num_samples: 3\n  system_prompts: [null, Be brief.]"},
     "rejection_sampling.num_samples", "3 samples cannot cover 2 temperature(s) x 2 system prompt(s)"),
    ({"prompts: [{builtin: arithmetic, count: 8}]": "prompts: []"}, "rejection_sampling.prompts",
     "rejection sampling needs prompts"),
    ({"reward: {data: [{builtin: arithmetic, count: 8}]}": "reward: {data: []}"}, "reward.data",
     "the reward stage needs preference data"),
    ({"[reward, rejection_sampling, sft, dpo]": "[rejection_sampling, sft]"},
     "rejection_sampling.scoring.reward_model", "needs a reward stage in the round or "
                                                "rejection_sampling.reward_model"),
    ({"[reward, rejection_sampling, sft, dpo]": "[sft, dpo]"}, "dpo.data",
     "the dpo stage needs preference pairs"),
    ({"rounds: 1": "rounds: 1\nsafety: {classifier: llama_guard, data: [{builtin: safety}]}"},
     "safety.llama_guard", "needs the path of a Llama Guard 3 checkpoint"),
    ({"rounds: 1": "rounds: 1\nevaluation: {task: arithmetic}"}, "evaluation.data",
     "task accuracy needs prompts with answers"),
])
def test_loop_recipe_problems_name_file_line_and_key(tmp_path, edit, key, reason):
    """Each cross-stage problem of a loop recipe is one message naming the file, line and key."""
    text = LOOP
    for old, new in edit.items():
        assert old in text
        text = text.replace(old, new)
    path = write(tmp_path, text)
    found = problems(path, check_trainer=False)
    assert len(found) == 1, found
    assert re.match(rf"{re.escape(str(path))}:\d+: {re.escape(key)}: .*{re.escape(reason)}", found[0]), found


def test_a_loop_problem_from_the_command_line_names_the_override(tmp_path):
    found = problems(write(tmp_path, LOOP), ["rejection_sampling.prompts=[]"], check_trainer=False)
    assert found == ["--set rejection_sampling.prompts: rejection sampling needs prompts"]


# ---- a section's own rules: validators that name the key inside the section ------------------

def test_section_problems_extend_pydantic_loc_to_the_key():
    """pydantic's loc for a model validator stops at the section (`section.0`); the validator
    raises SectionProblems with the key inside it (`high`), which schema_problems appends, and
    Where finds that key's line (4)."""
    from pydantic import ValidationError, model_validator

    from alignloop.options import Strict, raise_problems
    from alignloop.recipe_source import Where, schema_problems

    class Inner(Strict):
        low: int = 0
        high: int = 1

        @model_validator(mode="after")
        def _rules(self):
            raise_problems([("high", "must be above low")] if self.high <= self.low else [])
            return self

    class Root(Strict):
        section: list[Inner]

    with pytest.raises(ValidationError) as err:
        Root.model_validate({"section": [{"low": 2, "high": 1}]})
    lines = {"section": 1, "section.0": 2, "section.0.low": 3, "section.0.high": 4}
    assert schema_problems(err.value, Root, Where("r.yaml", lines)) == [
        "r.yaml:4: section.0.high: must be above low"]
    with pytest.raises(ValueError, match="high: must be above low"):  # outside a recipe
        Inner(low=2, high=1)


def test_a_trainer_section_rule_names_file_line_and_key(tmp_path):
    path = write(tmp_path, f"""
        stages: [dpo]
        dpo:
          data:
            - path: {DATA}
          merge: true
        """)
    assert problems(path, check_trainer=False) == [f"{path}:5: dpo.merge: merging needs method lora or qlora"]


def test_initial_sft_keys_are_checked_merged_over_sft(tmp_path):
    """initial_sft may give a `lora` block alone (the method is sft's); the rules apply to the
    merged section, reported under initial_sft (its line, as `merge` is not in it)."""
    text = f"""
        sft:
          method: lora
          merge: true
          data:
            - path: {DATA}
        initial_sft:
          lora: {{r: 4}}
        """
    cfg = load_recipe(write(tmp_path, text), check_trainer=False)
    assert cfg.initial_sft_section.method == "lora" and cfg.initial_sft_section.lora.r == 4
    path = write(tmp_path, text.replace("lora: {r: 4}", "method: full"))
    assert problems(path, check_trainer=False) == [
        f"{path}:6: initial_sft.merge: merging needs method lora or qlora"]


def test_samples_per_prompt_rule_once_for_text_and_vision(tmp_path):
    """One rule (RejectionSamplingConfig.problems), reached through the text section and through
    the vision section that subclasses it; each message names the file, the line and the key."""
    text = write(tmp_path, """
        stages: [rejection_sampling]
        rejection_sampling:
          prompts: [{builtin: arithmetic, count: 4}]
          num_samples: 1
          scoring: {reward_model: 0, verifiers: {arithmetic: 1.0}}
        """)
    pairs = ("rejection_sampling.num_samples: building best/worst pairs needs at least 2 samples "
             "per prompt (got 1); raise it or set pairs: false")
    assert problems(text, check_trainer=False) == [f"{text}:4: {pairs}"]
    vision = tmp_path / "vision.yaml"
    vision.write_text(dedent("""
        vision:
          adapter_config: {encoder: tiny}
          stages: [rejection_sampling]
          rejection_sampling:
            prompts: [{builtin: shapes, count: 4}]
            temperatures: [0.7, 1.0]
            num_samples: 1
            scoring: {reward_model: 0, verifiers: {shapes: 1.0}}
        """).lstrip())
    assert problems(vision, check_trainer=False) == [
        f"{vision}:7: vision.{pairs}",
        f"{vision}:7: vision.rejection_sampling.num_samples: 1 samples cannot cover 2 temperature(s) "
        "x 1 system prompt(s)"]


def test_vision_rejection_sampling_adds_its_own_rule(tmp_path):
    from alignloop.rejection_sampling.config import RejectionSamplingConfig
    from alignloop.vision.config import VisionRejectionSamplingSection

    assert issubclass(VisionRejectionSamplingSection, RejectionSamplingConfig)
    RejectionSamplingConfig(system_prompts=[None, "Be brief."])
    with pytest.raises(ValueError, match="system_prompts: not supported for vision prompts yet"):
        VisionRejectionSamplingSection(system_prompts=[None, "Be brief."])


def test_the_resolved_recipe_loads_as_the_same_recipe(tmp_path):
    """recipe.yaml (dump_recipe) keeps initial_sft to the keys it replaces: written out in full,
    its defaults (method: full) would replace the sft section's LoRA in round 0."""
    from alignloop.config import dump_recipe

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "smollm2_135m_loop.yaml"
    cfg = load_recipe(recipe, ["model.path=builtin:tiny"], check_trainer=False)
    (tmp_path / "recipe.yaml").write_text(dump_recipe(cfg))
    again = load_recipe(tmp_path / "recipe.yaml", check_trainer=False)
    assert again.initial_sft_section == cfg.initial_sft_section and again.initial_sft_section.method == "lora"
    assert again.model_dump() == cfg.model_dump()
