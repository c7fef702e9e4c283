"""Every cross-section rule of alignloop/recipe_checks.py, triggered once each: the recipe fails to
load with exactly one problem, `<file>:<line>: <key>: <message>`, where <line> is the line marked
`# <-` in the recipe (the key's own line, or the nearest enclosing key that the file has)."""

import re

import pytest

from alignloop.config import RecipeError, load_recipe

ARITHMETIC = "[{builtin: arithmetic, count: 8}]"
SHAPES = "[{builtin: shapes, split: train, count: 8}]"
VERIFIED = "scoring: {reward_model: 0, verifiers: {arithmetic: 1.0}}"
VISION_VERIFIED = "scoring: {reward_model: 0, verifiers: {shapes: 1.0}}"

CASES = {
    "prune needs calibration data": ("stages: [prune]\nprune:\n  data: []  # <-\n"
                                     "  target: {num_hidden_layers: 2}\n", "prune.data",
                                     "importance 'activation' needs calibration records"),
    "prune needs a target": (f"stages: [prune]\nprune:  # <-\n  data: {ARITHMETIC}\n",
                             "prune.target", "nothing to prune"),
    "distill needs data": ("stages: [distill]\ndistill:\n  data: []  # <-\n",
                           "distill.data", "the distill stage needs text or chat records"),
    "sft needs data": ("stages: [sft]\nsft:\n  data: []  # <-\n",
                       "sft.data", "the sft stage needs at least one data source"),
    "round 0 needs data": (f"stages: [sft]\nsft: {{data: {ARITHMETIC}}}\ninitial_sft:\n  data: []  # <-\n",
                           "initial_sft.data", "round 0's SFT has no data"),
    "reward needs pairs": ("stages: [reward]\nreward:\n  data: []  # <-\n",
                           "reward.data", "the reward stage needs preference data"),
    "rs needs prompts": (f"stages: [rejection_sampling]\nrejection_sampling:\n  prompts: []  # <-\n  {VERIFIED}\n",
                         "rejection_sampling.prompts", "rejection sampling needs prompts"),
    "rs reward weight": (f"stages: [rejection_sampling]\nrejection_sampling:\n  prompts: {ARITHMETIC}\n"
                         "  scoring:\n    reward_model: 1.0  # <-\n",
                         "rejection_sampling.scoring.reward_model", "weight 1 but no reward model"),
    "synth_data needs seeds": ("stages: [synth_data]\nsynth_data:  # <-\n  scoring: {reward_model: 0}\n",
                               "synth_data", "synthetic data needs seed documents or prompts"),
    "synth_data reward weight": (f"stages: [synth_data]\nsynth_data:\n  prompts: {ARITHMETIC}\n"
                                 "  scoring:\n    reward_model: 0.5  # <-\n",
                                 "synth_data.scoring.reward_model", "weight 0.5 but no reward model"),
    "dpo needs pairs": ("stages: [dpo]\ndpo:\n  data: []  # <-\n",
                        "dpo.data", "the dpo stage needs preference pairs"),
    "safety needs data": (f"stages: [sft]\nsft: {{data: {ARITHMETIC}}}\nsafety:  # <-\n  sft_ratio: 0.1\n",
                          "safety.data", "the safety section needs data or eval_data"),
    "llama guard needs a path": (f"stages: [sft]\nsft: {{data: {ARITHMETIC}}}\nsafety:  # <-\n"
                                 "  data: [{builtin: safety}]\n  classifier: llama_guard\n",
                                 "safety.llama_guard", "needs the path of a Llama Guard 3 checkpoint"),
    "nothing to evaluate": (f"stages: [sft]\nsft: {{data: {ARITHMETIC}}}\nevaluation:  # <-\n  reward: false\n",
                            "evaluation", "nothing to evaluate"),
    "accuracy needs answers": (f"stages: [sft]\nsft: {{data: {ARITHMETIC}}}\nevaluation:  # <-\n"
                               "  task: arithmetic\n", "evaluation.data", "task accuracy needs prompts"),
    "safety evaluation needs prompts": (f"stages: [sft]\nsft: {{data: {ARITHMETIC}}}\nevaluation:\n"
                                        "  safety: true  # <-\n", "evaluation.safety",
                                        "needs safety.eval_data"),
    "unknown builtin": ("stages: [sft]\nsft:\n  data:\n    - builtin: nonsense  # <-\n",
                        "sft.data.0.builtin", "unknown builtin dataset 'nonsense'"),
    "unknown verifier": (f"stages: [sft]\nsft: {{data: {ARITHMETIC}}}\nevaluation:\n  task: nonsense  # <-\n"
                         f"  data: {ARITHMETIC}\n", "evaluation.task", "unknown verifier 'nonsense'"),
    "packing needs document masks": (f"model: {{attn_implementation: flex_attention}}\nsft:\n"
                                     f"  data: {ARITHMETIC}\n  packing: true  # <-\n",
                                     "sft.packing", "flex_attention attends across them"),
    "vllm backend needs vllm": (f"stages: [sft]\nsft: {{data: {ARITHMETIC}}}\ngeneration:\n"
                                "  backend: vllm  # <-\n", "generation.backend",
                                "backend vllm needs vLLM in this Python environment"),
    "vllm server needs an address": (f"stages: [sft]\nsft: {{data: {ARITHMETIC}}}\ngeneration:\n"
                                     "  backend: vllm_server  # <-\n", "generation.backend",
                                     "vllm_server needs server_url"),
    "vision stage needs data": ("vision:\n  stages: [adapter]\n  adapter:\n    data: []  # <-\n",
                                "vision.adapter.data", "the vision adapter stage needs at least one"),
    "vision rs needs prompts": ("vision:\n  stages: [rejection_sampling]\n  rejection_sampling:\n"
                                f"    prompts: []  # <-\n    {VISION_VERIFIED}\n",
                                "vision.rejection_sampling.prompts", "rejection sampling needs vision_prompt"),
    "vision rs reward weight": ("vision:\n  stages: [rejection_sampling]\n  rejection_sampling:\n"
                                "    prompts: [{builtin: shapes, split: train, count: 4}]\n"
                                "    scoring:\n      reward_model: 1.0  # <-\n",
                                "vision.rejection_sampling.scoring.reward_model",
                                "weight 1 but no vision reward model"),
    "vision sft after rs trains on chats": (
        "vision:\n  stages: [rejection_sampling, sft]\n  rejection_sampling:\n"
        f"    prompts: [{{builtin: shapes, split: train, count: 4}}]\n    {VISION_VERIFIED}\n"
        "  sft:\n    kind: image_text  # <-\n", "vision.sft.kind", "set kind: vision_chat"),
    "vision accuracy needs answers": (f"vision:\n  stages: [adapter]\n  adapter: {{data: {SHAPES}}}\n"
                                      "  evaluation:\n    data: []  # <-\n", "vision.evaluation.data",
                                      "answer accuracy needs prompts with answers"),
    "vision evaluation verifier": (f"vision:\n  stages: [adapter]\n  adapter: {{data: {SHAPES}}}\n"
                                   f"  evaluation:\n    task: nonsense  # <-\n    data: {SHAPES}\n",
                                   "vision.evaluation.task", "nonsense"),
    "vision rs samples with transformers": (
        "generation:\n  backend: vllm_server  # <-\n  server_url: http://localhost:8000\n"
        "vision:\n  stages: [rejection_sampling]\n  rejection_sampling:\n"
        f"    prompts: [{{builtin: shapes, split: train, count: 4}}]\n    {VISION_VERIFIED}\n",
        "generation.backend", "vision rejection sampling samples with transformers only"),
    "vision text reward model": (f"vision:\n  stages: [adapter]\n  adapter: {{data: {SHAPES}}}\n"
                                 "  reward:\n    text_reward_model: ./missing-rm  # <-\n",
                                 "vision.reward.text_reward_model", "no such directory: ./missing-rm"),
    "vision rs reward model": ("vision:\n  stages: [rejection_sampling]\n  rejection_sampling:\n"
                               "    prompts: [{builtin: shapes, split: train, count: 4}]\n"
                               "    reward_model: ./missing-rm  # <-\n",
                               "vision.rejection_sampling.reward_model", "no such directory: ./missing-rm"),
    "llama3v encoder": (f"vision:\n  architecture: llama3v\n  llama3v:\n    encoder: ./missing-siglip  # <-\n"
                        f"  stages: [adapter]\n  adapter: {{data: {SHAPES}}}\n",
                        "vision.llama3v.encoder", "no such directory: ./missing-siglip"),
    "moe coefficient twice": (f"stages: [sft]\nmoe: {{aux_loss_coef: 0.01}}\nsft:\n  data: {ARITHMETIC}\n"
                              "  router_aux_loss_coef: 0.02  # <-\n", "sft.router_aux_loss_coef",
                              "moe.aux_loss_coef already sets the load-balancing coefficient"),
}
# These build the trainers' arguments (imports TRL): one recipe load each.
TRAINER_CASES = {
    "unknown trainer option": (f"stages: [sft]\nsft:\n  data: {ARITHMETIC}\n  learnig_rate: 0.1  # <-\n",
                               "sft.learnig_rate", "unknown key (did you mean 'learning_rate'?)"),
    "unknown vision trainer option": (f"vision:\n  stages: [adapter]\n  adapter:\n    data: {SHAPES}\n"
                                      "    learnig_rate: 0.1  # <-\n", "vision.adapter.learnig_rate",
                                      "unknown key (did you mean 'learning_rate'?)"),
    "rejected by TRL": (f"stages: [sft]\nsft:  # <-\n  data: {ARITHMETIC}\n  lr_scheduler_type: nonsense\n",
                        "sft", "SFTConfig rejected these options"),
}


def _check(tmp_path, text: str, key: str, message: str, check_trainer: bool) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_text("model: {path: builtin:tiny}\n" + text)
    line = 1 + next(i for i, row in enumerate(path.read_text().splitlines()) if row.endswith("# <-"))
    with pytest.raises(RecipeError) as err:
        load_recipe(path, check_trainer=check_trainer)
    assert len(err.value.problems) == 1, err.value.problems
    assert re.match(rf"{re.escape(str(path))}:{line}: {re.escape(key)}: .*{re.escape(message)}",
                    err.value.problems[0]), err.value.problems[0]


@pytest.mark.parametrize("name", list(CASES))
def test_each_cross_section_rule_names_file_line_and_key(tmp_path, name):
    _check(tmp_path, *CASES[name], check_trainer=False)


@pytest.mark.parametrize("name", list(TRAINER_CASES))
def test_trainer_option_rules_name_file_line_and_key(tmp_path, name):
    _check(tmp_path, *TRAINER_CASES[name], check_trainer=True)


@pytest.mark.parametrize("stages", ["[]", "[prune]"])
def test_round_zero_sft_alone_takes_its_data_from_initial_sft(tmp_path, stages):
    """SFT in round 0 only (`initial_sft` with its own data, no `sft` in the stages, as a pruned
    student's cross-entropy baseline): the empty `sft.data` is not an error, and round 0's SFT
    section reads initial_sft's data."""
    path = tmp_path / "recipe.yaml"
    prune = f"prune: {{data: {ARITHMETIC}, target: {{num_hidden_layers: 1}}}}\n" if "prune" in stages else ""
    path.write_text(f"model: {{path: builtin:tiny}}\nstages: {stages}\n{prune}"
                    f"initial_sft:\n  data: {ARITHMETIC}\n")
    cfg = load_recipe(path)
    assert cfg.sft.data == [] and "sft" in cfg.all_stages
    assert [s.builtin for s in cfg.for_round(0).sft.data] == ["arithmetic"]
