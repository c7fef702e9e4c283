"""Every recipe in recipes/ validates (real-model paths replaced by the tiny model), and every
accelerate config parses as one."""

from pathlib import Path

import pytest

import importlib.util

from alignloop.config import RecipeError, load_recipe
from alignloop.hardware import resolve_precision
from alignloop.training import trl_config

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
NOT_RECIPES = {"accelerate", "data"}  # accelerate launch configs and example data


def recipe_files():
    return sorted(p for p in RECIPES.rglob("*.yaml")
                  if not NOT_RECIPES & set(p.relative_to(RECIPES).parts[:-1]))


def test_there_are_recipes():
    names = {p.name for p in recipe_files()}
    assert {"quickstart.yaml", "llama3_2_1b_lora_sft.yaml", "llama3_1_8b_qlora_sft.yaml",
            "llama3_2_3b_loop.yaml", "llama3_2_1b_lora_128k.yaml", "llama3_1_8b_lora_128k.yaml",
            "qwen3_30b_a3b_lora_sft.yaml"} <= names


@pytest.mark.parametrize("path", recipe_files(), ids=lambda p: str(p.relative_to(RECIPES)))
def test_recipe_validates(path, tmp_path):
    overrides = ["model.path=builtin:tiny"]
    if "backend: vllm" in path.read_text() and importlib.util.find_spec("vllm") is None:
        # vLLM lives in .venv-vllm here, not beside transformers 5.23: the recipe must say so
        # clearly, and validate in every other respect
        with pytest.raises(RecipeError, match=r"generation.backend: backend vllm needs vLLM"):
            load_recipe(path, overrides)
        overrides.append("generation.backend=hf")
    cfg = load_recipe(path, overrides)
    for rnd in ([0] if cfg.initial_sft else []) + [1]:
        for stage in cfg.for_round(rnd).trained_stages:
            args = trl_config(stage, getattr(cfg.for_round(rnd), stage), seed=cfg.seed,
                              precision=resolve_precision(cfg.precision), output_dir=tmp_path)
            assert args.output_dir == str(tmp_path)


def test_real_recipes_name_real_checkpoints():
    for name, hub_id in [("llama3_2_1b_lora_sft.yaml", "meta-llama/Llama-3.2-1B-Instruct"),
                         ("llama3_1_8b_qlora_sft.yaml", "meta-llama/Llama-3.1-8B-Instruct"),
                         ("llama3_2_3b_loop.yaml", "meta-llama/Llama-3.2-3B-Instruct")]:
        cfg = load_recipe(RECIPES / name, ["generation.backend=hf"], check_trainer=False)
        assert cfg.model.path == hub_id and cfg.sft.method in ("lora", "qlora")


def test_vision_recipes_name_real_checkpoints():
    """The vision recipes (docs/vision.md) validate with their real hub ids and data files."""
    lora = load_recipe(RECIPES / "llama3_2_11b_vision_lora.yaml")
    assert lora.model.path == "meta-llama/Llama-3.2-11B-Vision-Instruct"
    assert lora.vision.start == "mllama" and lora.vision.stages == ["sft"] and lora.vision.sft.lora
    adapter = load_recipe(RECIPES / "llama3_1_8b_vision_adapter.yaml")
    assert adapter.model.path == "meta-llama/Llama-3.1-8B-Instruct"
    assert adapter.vision.start == "new" and adapter.vision.stages == ["adapter", "sft"]
    assert adapter.vision.adapter_config.cross_layers(32) == [3, 7, 11, 15, 19, 23, 27, 31]
    quick = load_recipe(RECIPES / "vision_quickstart.yaml")
    assert quick.model.path == "builtin:tiny" and quick.vision.evaluation is not None


@pytest.mark.parametrize("path", sorted((RECIPES / "accelerate").glob("*.yaml")), ids=lambda p: p.name)
def test_accelerate_configs_parse(path):
    from accelerate.commands.config.config_args import ClusterConfig

    config = ClusterConfig.from_yaml_file(str(path))
    assert config.num_processes >= 2 and config.distributed_type is not None


@pytest.mark.parametrize("name,hub_id,offload", [
    ("llama3_2_1b_lora_128k.yaml", "meta-llama/Llama-3.2-1B-Instruct", False),
    ("llama3_1_8b_lora_128k.yaml", "meta-llama/Llama-3.1-8B-Instruct", True)])
def test_128k_recipes_ask_for_what_makes_128k_fit(name, hub_id, offload, tmp_path):
    """LoRA at 131,072 tokens with checkpointing, the fused loss, our Triton attention, packing
    and long documents split (docs/long_context.md); offloading only where it helps (8B)."""
    from alignloop.kernels import ATTENTION
    from alignloop.kernels.fused_head import wanted

    cfg = load_recipe(RECIPES / name, check_trainer=False)
    assert cfg.model.path == hub_id and cfg.model.attn_implementation == ATTENTION
    assert cfg.sft.method == "lora" and "lm_head" not in cfg.sft.lora.target_modules
    assert cfg.sft.fused_loss is True and cfg.sft.long_examples == "split"
    tiny = load_recipe(RECIPES / name, ["model.path=builtin:tiny"])
    args = trl_config("sft", tiny.sft, seed=tiny.seed, precision=resolve_precision(tiny.precision),
                      output_dir=tmp_path)
    assert args.max_length == 131072 and args.activation_checkpointing and args.packing
    assert args.activation_offloading is offload and wanted(cfg.sft.fused_loss, args.max_length)


def moe_recipes():
    return [p for p in recipe_files() if "\nmoe:" in p.read_text()]


@pytest.mark.parametrize("path", moe_recipes(), ids=lambda p: p.name)
def test_moe_recipes_resolve_on_a_tiny_moe(path, tmp_path):
    """A recipe with a `moe` section also validates against a tiny Qwen3-MoE, and its LoRA
    options resolve on one (docs/moe.md): every routed expert adapted, the router as the recipe
    says, the audit passes."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from alignloop.models.loading import lora_config
    from alignloop.models.moe import check_coverage, coverage
    from alignloop.models.tiny import tiny_config

    cfg = load_recipe(path, ["model.path=builtin:tiny", "model.tiny.architecture=qwen3_moe"])
    assert cfg.model.tiny == {"architecture": "qwen3_moe"}
    model = AutoModelForCausalLM.from_config(tiny_config("qwen3_moe", num_hidden_layers=1))
    for stage in cfg.trained_stages:
        options = getattr(cfg, stage).lora
        peft = get_peft_model(model, lora_config(options, model=model, key=f"{stage}.lora"))
        kinds = {row["kind"]: row for row in coverage(peft)}
        assert kinds["routed experts"]["lora"] == kinds["routed experts"]["tensors"] == 2
        assert kinds["router"]["lora"] == (2 if options.router == "lora" else 0)
        check_coverage(coverage(peft), options, f"{stage}.lora")


def test_qwen3_moe_recipe_names_the_real_checkpoint():
    cfg = load_recipe(RECIPES / "qwen3_30b_a3b_lora_sft.yaml", check_trainer=False)
    assert cfg.model.path == "Qwen/Qwen3-30B-A3B" and cfg.sft.method == "lora"
    assert cfg.sft.lora.experts and cfg.sft.lora.router == "frozen" and cfg.moe.aux_loss_coef == 0.001
