"""The `alignloop` command.

    alignloop run RECIPE [--set key=value ...] [--output-dir DIR]
    alignloop validate RECIPE [--set key=value ...]
    alignloop stage NAME RECIPE [--round K] [--set key=value ...] [--output-dir DIR]
    alignloop generate --model DIR|FILE.gguf --prompts FILE --output FILE [--n K] [--max-new-tokens N]
                       [--temperature T] [--top-p P] [--batch-size B] [--seed S]
                       [--backend hf|vllm|vllm_server] [--server-python PY | --server-url URL]
                       [--dtype D] [--generation KEY=VALUE ...]

Problems with the input (a recipe, a data file) print one line each to stderr and exit with 2.
"""

from __future__ import annotations

import argparse
import logging
import sys


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="alignloop", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    def recipe_args(p, with_output=True):
        p.add_argument("recipe", help="a YAML recipe")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a recipe key, e.g. --set sft.learning_rate=2e-5 (repeatable)")
        if with_output:
            p.add_argument("--output-dir", help="run directory (default: the recipe's output_dir)")

    recipe_args(commands.add_parser("run", help="run every stage of a recipe (resumes)"))
    recipe_args(commands.add_parser("validate", help="check a recipe without running it"), False)
    stage = commands.add_parser("stage", help="run one stage of a recipe")
    stage.add_argument("name", help="the stage: reward, rejection_sampling, synth_data, sft or dpo; "
                                    "in a vision recipe vision_adapter, vision_sft, vision_reward, "
                                    "vision_rejection_sampling or vision_dpo")
    recipe_args(stage)
    stage.add_argument("--round", type=int, default=None,
                       help="which round's stage (default: the first round that has it); the "
                            "stages before it that are not complete run first")
    gen = commands.add_parser("generate", help="chat completions for a JSONL of prompts")
    gen.add_argument("--model", required=True, help="a model or adapter directory, a .gguf file "
                                                     "(converted once, docs/recipes.md) or "
                                                     "package:<python_package>/<file>")
    gen.add_argument("--prompts", required=True, help="JSONL of prompt records")
    gen.add_argument("--output", required=True, help="JSONL to write, one row per sample")
    gen.add_argument("--n", type=int, default=1, help="samples per prompt")
    gen.add_argument("--max-new-tokens", type=int, default=256)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--batch-size", type=int, default=16)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--backend", choices=["hf", "vllm", "vllm_server"], default="hf",
                     help="transformers, vLLM in this process, or a vLLM server (docs/generation.md)")
    gen.add_argument("--server-python", help="vllm_server: a Python with vLLM, to start the server with")
    gen.add_argument("--server-url", help="vllm_server: a server that is already up")
    gen.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    gen.add_argument("--generation", dest="generation_options", action="append", default=[],
                     metavar="KEY=VALUE", help="a key of the recipe's generation section, e.g. "
                                               "--generation max_model_len=2048 (repeatable)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    from alignloop.config import RecipeError
    from alignloop.data.errors import DataError
    from alignloop.data.masks import MaskError
    from alignloop.pipeline.errors import StageError

    try:
        return _COMMANDS[args.command](args)
    except (RecipeError, DataError, MaskError, StageError) as err:
        print(f"alignloop: {err}", file=sys.stderr)
        return 2


def _validate(args) -> int:
    from alignloop.config import load_recipe

    cfg = load_recipe(args.recipe, args.overrides)
    stages = cfg.stages or ([f"vision_{s}" for s in cfg.vision.stages] if cfg.vision else [])
    print(f"{args.recipe}: ok (stages: {', '.join(stages)}; output_dir: {cfg.output_dir})")
    return 0


def _run(args) -> int:
    from alignloop.config import load_recipe

    from alignloop.pipeline.runner import run

    run(load_recipe(args.recipe, args.overrides, output_dir=args.output_dir))
    return 0


def _stage(args) -> int:
    from alignloop.config import load_recipe
    from alignloop.pipeline.runner import run_stage

    cfg = load_recipe(args.recipe, args.overrides, output_dir=args.output_dir)
    try:
        result = run_stage(args.name, cfg, round=args.round)
    except ValueError as err:
        if "is not in this recipe" not in str(err) and "does not run in round" not in str(err):
            raise
        print(f"alignloop: {err}", file=sys.stderr)
        return 2
    print(f"{args.name}: {result.path}")
    return 0


def _generate(args) -> int:
    from pydantic import ValidationError

    from alignloop.data.readers import read_records, write_jsonl
    from alignloop.generation.backends import open_generator
    from alignloop.generation.common import check_settings
    from alignloop.generation.config import GenerationConfig
    from alignloop.generation.hf import SamplingSettings, completion_rows

    prompts = read_records(args.prompts, "prompt").records
    options = dict(item.split("=", 1) for item in args.generation_options if "=" in item)
    if len(options) != len(args.generation_options):
        print("alignloop: --generation takes KEY=VALUE, e.g. --generation max_model_len=2048",
              file=sys.stderr)
        return 2
    try:
        cfg = GenerationConfig(backend=args.backend, batch_size=args.batch_size,
                               server_python=args.server_python, server_url=args.server_url, **options)
    except ValidationError as err:
        problem = err.errors()[0]
        print(f"alignloop: --generation {'.'.join(map(str, problem['loc']))}: {problem['msg']}",
              file=sys.stderr)
        return 2
    settings = SamplingSettings(n=args.n, max_new_tokens=args.max_new_tokens,
                                temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    try:
        check_settings(settings)  # before an engine starts
    except ValueError as err:
        print(f"alignloop: {err}", file=sys.stderr)
        return 2
    try:
        model = _model_dir(args.model)
    except ValueError as err:  # a missing package or file, a .gguf alignloop cannot convert
        print(f"alignloop: --model: {err}", file=sys.stderr)
        return 2
    with open_generator(cfg, model, dtype=args.dtype) as gen:
        samples = gen.generate([p["prompt"] for p in prompts], settings)
        producer = gen.describe()
    if model != args.model:  # the converted directory (gguf-<sha256[:16]>) is in producer["model"]
        producer["source"] = args.model
    write_jsonl(args.output, completion_rows(prompts, samples, settings, producer))
    print(f"wrote {len(prompts) * args.n} completions for {len(prompts)} prompts to {args.output}")
    return 0


def _model_dir(model: str) -> str:
    """--model as a directory: package:<python_package>/<file> found, a .gguf file converted."""
    from alignloop.config import PACKAGE_PREFIX, package_file
    from alignloop.models.gguf import convert, is_gguf

    if model.startswith(PACKAGE_PREFIX):
        model = str(package_file(model))
    return str(convert(model)) if is_gguf(model) else model


_COMMANDS = {"run": _run, "validate": _validate, "stage": _stage, "generate": _generate}

if __name__ == "__main__":
    sys.exit(main())
