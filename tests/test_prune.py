"""The prune stage on tiny GQA Llamas (8 query heads in 2 KV groups, head_dim 32): keeping every
unit changes nothing; units that contribute nothing are the ones removed, and removing them
leaves the logits as they were; kept query heads stay in their KV group; RoPE pairs stay
together at their frequencies; targets the model cannot have are errors that name the key."""

import json
from pathlib import Path
from textwrap import dedent

import pytest
import torch

from alignloop.config import Recipe, load_recipe
from alignloop.pipeline.context import StageContext
from alignloop.pipeline.errors import StageError
from alignloop.prune.config import parse_count
from alignloop.prune.stage import run
from alignloop.recipe_source import RecipeError

GQA = {"num_attention_heads": 8, "num_key_value_heads": 2}  # 4 query heads per KV group
CALIBRATION = {"data": [{"builtin": "arithmetic", "count": 24}], "samples": 16, "max_length": 48}
SMALL = {"num_hidden_layers": 3, "hidden_size": 96, "heads_per_group": 2, "head_dim": 16,
         "intermediate_size": 200}


@pytest.fixture(scope="module")
def gqa_dir(alignloop_cache):
    from alignloop.models.tiny import build_tiny

    return build_tiny(**GQA)


def prune(tmp_path, policy, name="out", seed=0, **section):
    """Runs the stage on `policy` with CALIBRATION and `section`; (metrics, output directory)."""
    cfg = Recipe.model_validate({"model": {"path": str(policy)}, "precision": "fp32",
                                 "prune": {**CALIBRATION, **section}})
    ctx = StageContext(name="prune", round=0, policy=str(policy), base=str(policy),
                       work_dir=tmp_path / "work", log_dir=tmp_path / "logs", seed=seed)
    out = tmp_path / name
    out.mkdir()
    return run(cfg, ctx, out), out


def load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("tie", [None, False])
def test_keeping_every_unit_gives_the_original_logits(tmp_path, gqa_dir, tie):
    """A target equal to the model's shape keeps every unit in its place: the logits are the
    original's (<= 1e-5, fp32). Untying copies the embeddings into a separate output layer."""
    same = {"num_hidden_layers": 4, "hidden_size": 128, "num_attention_heads": 8, "head_dim": 32,
            "intermediate_size": 384}
    metrics, out = prune(tmp_path, gqa_dir, target=same, tie_embeddings=tie)
    original, pruned = load(gqa_dir), load(out / "model")
    assert (logits(original, IDS) - logits(pruned, IDS)).abs().max() <= 1e-5
    assert pruned.config.tie_word_embeddings is (tie is None)
    extra = 0 if tie is None else 1024 * 128  # an untied output layer
    assert metrics["params_after"] == metrics["params_before"] + extra == pruned.num_parameters()
    assert metrics["kept"]["layers"] == [0, 1, 2, 3]
    assert metrics["calibration"]["records"] == 16 and metrics["calibration"]["tokens"] > 16 * 10
    assert json.loads((out / "metrics.json").read_text())["importance"] == "activation"
    kept = json.loads((out / "importance.json").read_text())["kept"]
    assert kept["hidden"] == list(range(128)) and kept["heads"][0] == [[0, 1, 2, 3], [0, 1, 2, 3]]
    files = {p.name for p in (out / "model").iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= files


def silenced(tmp_path, gqa_dir, heads: bool) -> Path:
    """The GQA model with units that contribute nothing: layer 2 is the identity (o_proj and
    down_proj zero); per layer 184 of 384 neurons are zero; q is zero on the odd RoPE pairs
    (channels j, j + 16 for odd j), so only the pairs a 2x strided head_dim keeps count; v and
    o_proj are zero on 16 channels per group; with `heads`, 2 of each group's 4 query heads have
    zero q and o_proj (group 0 heads 0 and 2, group 1 heads 1 and 3 of it)."""
    model = load(gqa_dir)
    g = torch.Generator().manual_seed(1)
    odd = torch.cat([torch.arange(1, 16, 2), torch.arange(17, 32, 2)])
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            attn, mlp = layer.self_attn, layer.mlp
            if i == 2:
                attn.o_proj.weight.zero_()
                mlp.down_proj.weight.zero_()
            dead = torch.randperm(384, generator=g)[:184]
            mlp.gate_proj.weight[dead] = 0
            mlp.up_proj.weight[dead] = 0
            mlp.down_proj.weight[:, dead] = 0
            q = attn.q_proj.weight.view(2, 4, 32, 128)
            o = attn.o_proj.weight.view(128, 2, 4, 32)
            v = attn.v_proj.weight.view(2, 32, 128)
            q[:, :, odd] = 0
            for group in range(2):
                dims = torch.randperm(32, generator=g)[:16]
                v[group, dims] = 0
                o[:, group, :, dims] = 0
                if heads:
                    for head in (group, group + 2):
                        q[group, head] = 0
                        o[:, group, head] = 0
    path = tmp_path / "silenced"
    model.save_pretrained(path)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(gqa_dir).save_pretrained(path)
    return path


@pytest.mark.parametrize("importance", ["magnitude", "activation"])
def test_units_that_contribute_nothing_are_the_ones_removed(tmp_path, gqa_dir, importance):
    """Pruning the silenced model (above) to 3 layers, 200 neurons, head_dim 16 (strided) and,
    by weight norms, 2 heads per group leaves its logits as they were (<= 1e-5): the identity
    layer, the zero neurons, v channels and heads are what both methods rank lowest, and q.k over
    the kept pairs at their original frequencies, with the temperature kept (q scaled by
    sqrt(16/32)), is the original q.k. Activations cannot tell the silenced heads (their outputs
    are uniform averages of v, not zero), so that case keeps every head."""
    heads = importance == "magnitude"
    policy = silenced(tmp_path, gqa_dir, heads)
    target = {"num_hidden_layers": 3, "intermediate_size": 200, "head_dim": 16}
    if heads:
        target["heads_per_group"] = 2
    metrics, out = prune(tmp_path, policy, importance=importance, target=target)
    assert metrics["kept"]["layers"] == [0, 1, 3]
    kept = json.loads((out / "importance.json").read_text())["kept"]
    if heads:
        assert kept["heads"][0] == [[1, 3], [0, 2]]
    assert (logits(load(policy), IDS) - logits(load(out / "model"), IDS)).abs().max() <= 1e-5


def test_kept_query_heads_stay_in_their_kv_group(tmp_path, gqa_dir):
    """In every layer each group keeps 2 of its 4 query heads (random ranking: different heads
    per layer and group). The pruned q rows of new head m of group g are the original rows of one
    of group g's heads, and the pruned k/v rows of group g are the original group g's."""
    metrics, out = prune(tmp_path, gqa_dir, importance="random", seed=3,
                         target={"num_attention_heads": 4})
    original, pruned = load(gqa_dir), load(out / "model")
    assert pruned.config.num_attention_heads == 4 and pruned.config.num_key_value_heads == 2
    chosen = []
    for old, new in zip(original.model.layers, pruned.model.layers):
        q_old = old.self_attn.q_proj.weight.view(2, 4, 32, 128)
        q_new = new.self_attn.q_proj.weight.view(2, 2, 32, 128)
        for name in ("k_proj", "v_proj"):
            assert torch.equal(getattr(old.self_attn, name).weight, getattr(new.self_attn, name).weight)
        layer = []
        for group in range(2):
            matches = [[h for h in range(4) if torch.equal(q_new[group, m], q_old[group, h])]
                       for m in range(2)]
            assert all(len(m) == 1 for m in matches), matches  # each from this group, in order
            layer.append([m[0] for m in matches])
        chosen.append(layer)
    assert chosen == json.loads((out / "importance.json").read_text())["kept"]["heads"]
    assert len({str(layer) for layer in chosen}) > 1  # not the same heads everywhere


def test_strided_head_dim_keeps_the_rope_frequencies(tmp_path, gqa_dir):
    """head_dim 32 -> 16 on a llama3-scaled RoPE: the pruned model's rotary frequencies (computed
    by transformers from its config) are every second one of the original's, exactly."""
    _, out = prune(tmp_path, gqa_dir, target={"head_dim": 16})
    original, pruned = load(gqa_dir), load(out / "model")
    assert original.config.rope_parameters["rope_type"] == "llama3"
    assert torch.equal(pruned.model.rotary_emb.inv_freq, original.model.rotary_emb.inv_freq[::2])


def test_importance_ranked_rope_pairs_stay_together(tmp_path, gqa_dir):
    """rope_pairs: importance keeps any 8 of the 16 pairs per (layer, group); the new head's
    channels c and c + 8 are the original channels j and j + 16 of the same kept pair j."""
    _, out = prune(tmp_path, gqa_dir, rope_pairs="importance", target={"head_dim": 16})
    original, pruned = load(gqa_dir), load(out / "model")
    pairs = json.loads((out / "importance.json").read_text())["kept"]["qk_pairs"]
    assert any(p != list(range(0, 16, 2)) for layer in pairs for p in layer)
    for i, (old, new) in enumerate(zip(original.model.layers, pruned.model.layers)):
        k_old = old.self_attn.k_proj.weight.view(2, 32, 128)
        k_new = new.self_attn.k_proj.weight.view(2, 16, 128)
        for group in range(2):
            kept = torch.tensor(pairs[i][group])
            assert torch.equal(k_new[group, :8], k_old[group, kept])
            assert torch.equal(k_new[group, 8:], k_old[group, kept + 16])


def test_a_pruned_checkpoint_reloads_and_generates_the_same_with_and_without_cache(tmp_path, gqa_dir):
    _, out = prune(tmp_path, gqa_dir, target=SMALL)
    model = load(out / "model")
    config = model.config
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads,
            config.num_key_value_heads, config.head_dim, config.intermediate_size) == (3, 96, 4, 2, 16, 200)
    original = load(gqa_dir)
    hidden = torch.tensor(json.loads((out / "importance.json").read_text())["kept"]["hidden"])
    assert torch.equal(model.model.embed_tokens.weight, original.model.embed_tokens.weight[:, hidden])
    assert torch.equal(model.model.norm.weight, original.model.norm.weight[hidden])
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    prompt = IDS[:1, :10]
    runs = [model.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=cache,
                           eos_token_id=None, pad_token_id=0) for cache in (True, False)]
    assert runs[0].shape[1] == 22 and torch.equal(runs[0], runs[1])


def test_activation_importance_is_deterministic_and_not_random(tmp_path, gqa_dir):
    runs = [prune(tmp_path, gqa_dir, name=f"run{i}", importance=method, seed=seed, target=SMALL)[1]
            for i, (method, seed) in enumerate([("activation", 0), ("activation", 0), ("random", 0),
                                                ("random", 0), ("random", 1)])]
    kept = [json.loads((out / "importance.json").read_text()) for out in runs]
    assert kept[0] == kept[1]  # the calibration records and the scores do not depend on chance
    assert kept[2] == kept[3] and kept[2]["kept"] != kept[4]["kept"]  # a seed picks the draw
    assert kept[0]["kept"]["hidden"] != kept[2]["kept"]["hidden"]
    assert kept[0]["kept"]["neurons"] != kept[2]["kept"]["neurons"]


def test_a_parameter_budget_shrinks_hidden_and_intermediate_together(tmp_path, gqa_dir):
    """params: 600K of the model's 1,049,728: hidden and intermediate shrink by one factor r,
    rounded down to multiples of 8, to the largest model within the budget."""
    metrics, out = prune(tmp_path, gqa_dir, importance="magnitude", round_to=8,
                         target={"params": "600K"})
    shape = metrics["shape_after"]
    assert metrics["params_before"] == 1_049_728 and 560_000 < metrics["params_after"] <= 600_000
    assert shape["hidden_size"] % 8 == 0 and shape["intermediate_size"] % 8 == 0
    assert abs(shape["hidden_size"] / 128 - shape["intermediate_size"] / 384) < 8 / 128
    assert load(out / "model").num_parameters() == metrics["params_after"]


@pytest.mark.parametrize("target, key, message", [
    ({"num_hidden_layers": 10}, "num_hidden_layers", "10 is more than the model's 4"),
    ({"num_attention_heads": 7}, "num_attention_heads", "do not split evenly over the model's 2"),
    ({"num_attention_heads": 12}, "num_attention_heads", "12 is more than the model's 8"),
    ({"head_dim": 12}, "head_dim", "12 must divide the model's head_dim 32"),
    ({"params": 2_000_000}, "params", "2,000,000 is not below the model's 1,049,728"),
])
def test_a_target_the_model_cannot_have_fails_before_writing(tmp_path, gqa_dir, target, key, message):
    with pytest.raises(StageError, match=f"round_0/prune: prune.target.{key}: .*{message}"):
        prune(tmp_path, gqa_dir, target=target)
    assert not any((tmp_path / "out").iterdir())


def test_the_pipeline_runs_prune_in_round_0(tmp_path, alignloop_cache):
    """`stages: [prune]` through the runner: the stage directory round_0/prune holds the model,
    metrics.json and importance.json, and the manifest records it."""
    from alignloop.manifest import read_manifest
    from alignloop.pipeline.runner import run_stage

    cfg = load_recipe({"output_dir": str(tmp_path / "run"), "precision": "fp32",
                       "model": {"tiny": GQA}, "stages": ["prune"],
                       "prune": {**CALIBRATION, "target": {"intermediate_size": 256}}},
                      check_trainer=False)
    result = run_stage("prune", cfg)
    assert result.path == tmp_path / "run" / "round_0" / "prune"
    assert (result.path / "model" / "model.safetensors").is_file()
    assert result.metrics["shape_after"]["intermediate_size"] == 256
    assert read_manifest(tmp_path / "run")["stages"]["round_0/prune"]["status"] == "complete"


def recipe_problems(tmp_path, text: str) -> list[str]:
    path = tmp_path / "recipe.yaml"
    path.write_text(dedent(text).lstrip())
    with pytest.raises(RecipeError) as err:
        load_recipe(path, check_trainer=False)
    return [p.replace(str(path), "recipe.yaml") for p in err.value.problems]


def test_recipe_errors_name_the_file_line_and_key(tmp_path):
    assert recipe_problems(tmp_path, """
        stages: [prune]
        prune:
          data: [{builtin: arithmetic}]
          target:
            heads_per_group: 2
            num_attention_heads: 4
            head_dim: 15
        """) == ["recipe.yaml:5: prune.target.heads_per_group: give num_attention_heads or "
                 "heads_per_group, not both",
                 "recipe.yaml:7: prune.target.head_dim: must be even: RoPE rotates channel pairs "
                 "(i, i + head_dim/2) (got 15)"]
    found = recipe_problems(tmp_path, """
        stages: [prune]
        prune:
          samples: 100
        """)
    assert [p.split(": ")[:2] for p in found] == [["recipe.yaml:2", "prune.data"],
                                                  ["recipe.yaml:2", "prune.target"]]
    text = "stages: [prune]\nprune: {data: [{path: c.jsonl}], importance: random}\n"
    assert recipe_problems(tmp_path, text) == [  # relative to the recipe's folder
        f"recipe.yaml:2: prune.data.0.path: no such file or directory: {tmp_path / 'c.jsonl'}",
        "recipe.yaml:2: prune.target: nothing to prune: give a shape (num_hidden_layers, hidden_size, "
        "num_attention_heads, head_dim, intermediate_size) or a parameter budget (params)"]
    assert recipe_problems(tmp_path, "prune: {target: {params: lots}}\n")[0].startswith(
        "recipe.yaml:1: prune.target.params: expected a parameter count")


def test_the_parameter_formula_gives_the_published_llama_sizes():
    """shape.count, which a budget relies on (and the stage checks against the saved model),
    on the configs of Llama 3.1 8B, 3.2 3B and 3.2 1B (reference section E)."""
    from alignloop.prune.shape import Shape, count

    assert count(Shape(32, 4096, 8, 4, 128, 14336, 128256, False)) == 8_030_261_248
    assert count(Shape(28, 3072, 8, 3, 128, 8192, 128256, True)) == 3_212_749_824
    assert count(Shape(16, 2048, 8, 4, 64, 8192, 128256, True)) == 1_235_814_400


def test_parameter_counts_read_like_people_write_them():
    assert parse_count("1.2B") == parse_count("1.2e9") == parse_count(1.2e9) == 1_200_000_000
    assert parse_count("350M") == 350_000_000 and parse_count("1_000") == 1000
