"""Reward-model training: preference pairs and rankings in, a one-logit scorer out (reference A2).

The trainer is TRL's RewardTrainer (Bradley-Terry loss `-log sigmoid(r_chosen - r_rejected)`).
Llama 3 trains its RM on the pre-trained checkpoint, without Llama 2's margin term, on all the
preference data so far, with rankings edited > chosen > rejected; here a ranking is expanded into
its ordered pairs (TRL has no listwise loss), a margin is used only when `reward.margin_field` names
one, and `center_rewards_coefficient` (a RewardConfig option) adds TRL's reward-centering penalty.
Our part: the data (pairs, rankings, earlier rounds' rejection-sampling pairs, a held-out split
by prompt), the model (full or LoRA, from the base, the policy or a checkpoint), resume,
checkpoint averaging and the artifacts:

    <out_dir>/model/          the reward model (full, or LoRA adapter + score head) + tokenizer
    <out_dir>/data.jsonl      the preference pairs trained on
    <out_dir>/eval.jsonl      the held-out pairs
    <out_dir>/metrics.json    held-out pairwise accuracy before and after, losses, steps, timing
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from pathlib import Path

from alignloop.config import Recipe
from alignloop.data.contracts import ranking_to_pairs
from alignloop.data.readers import write_jsonl
from alignloop.data.source_config import SourceConfig
from alignloop.data.sources import format_report, load_sources
from alignloop.hardware import resolve_precision
from alignloop.models.averaging import average_checkpoints
from alignloop.models.loading import load_model, load_tokenizer, lora_config
from alignloop.pipeline.context import StageContext
from alignloop.pipeline.errors import StageError
from alignloop.reward.scoring import (RewardScorer, check_same_vocabulary, pairwise_accuracy,
                                      seqcls_from_causal)
from alignloop.options import LoraOptions
from alignloop.recipe_source import stage_where
from alignloop.training import (moe_aux_coef, prepare_moe, save_trained, tensorboard_logs,
                                trl_config)

logger = logging.getLogger("alignloop.reward")


def run(cfg: Recipe, ctx: StageContext, out_dir: Path) -> dict:
    """Trains the reward model and writes the artifacts above into `out_dir`; returns the metrics.

    Raises StageError, before writing anything, for a missing `reward.init` checkpoint, a
    tokenizer other than the policy's, no pairs to train on, or a record without its margin.
    """
    with tensorboard_logs(ctx.log_dir):  # logs outside work_dir, which goes when the stage completes
        return _run(cfg, ctx, out_dir)


def _run(cfg: Recipe, ctx: StageContext, out_dir: Path) -> dict:
    from accelerate import PartialState
    from transformers import set_seed

    start = time.time()
    state = PartialState()
    init = _init_path(cfg, ctx)
    tokenizer = _tokenizer(cfg, ctx, init)
    train, held_out, report = load_pairs(cfg, ctx)
    args = trl_config("reward", cfg.reward, seed=cfg.seed, precision=resolve_precision(cfg.precision),
                      output_dir=ctx.work_dir / "checkpoints", model_path=init)

    set_seed(args.seed)  # the new score head is drawn at load time
    model = _load_model(cfg, ctx, init, tokenizer)
    before = pairwise_accuracy(RewardScorer.from_model(model, tokenizer, name=init), held_out)
    trainer, result, kept, last, moe = _train(cfg, ctx, model, tokenizer, args, train, held_out)
    averaged = average_checkpoints(trainer, cfg.reward.average_checkpoints)
    after = pairwise_accuracy(RewardScorer.from_model(trainer.model, tokenizer), held_out)
    logger.info("reward model: held-out pairwise accuracy %s -> %s on %d pairs",
                before["accuracy"], after["accuracy"], len(held_out))

    metrics = {
        "accuracy": after["accuracy"],
        "accuracy_before": before["accuracy"],
        "accuracy_note": _accuracy_note(cfg, held_out),
        "mean_margin": after["mean_margin"],
        "mean_margin_before": before["mean_margin"],
        "eval_pairs": len(held_out),
        "train_pairs": len(kept),
        "too_long": len(train) - len(kept),
        "init": cfg.reward.init,
        "init_path": init,
        "method": cfg.reward.method,
        "margin": cfg.reward.margin_field,
        "center_rewards_coefficient": args.center_rewards_coefficient,
        "averaged": averaged,
        "resumed_from": last,
        "world_size": state.num_processes,
        "train_loss": result.training_loss,
        "steps": result.global_step,
        "losses": [round(e["loss"], 4) for e in trainer.state.log_history if "loss" in e],
        "train_seconds": round(time.time() - start, 1),
        "data": report,
        **moe.metrics(trainer),
    }
    # no merged/: the reward model is only read through RewardScorer, which merges an adapter on load
    save_trained(trainer, tokenizer, out_dir / "model")
    if state.is_main_process:
        write_jsonl(out_dir / "data.jsonl", [pair for i, pair in enumerate(train) if i in kept])
        write_jsonl(out_dir / "eval.jsonl", held_out)
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
    state.wait_for_everyone()
    return metrics


def _train(cfg: Recipe, ctx: StageContext, model, tokenizer, args, train: list[dict],
           held_out: list[dict]):
    """TRL's RewardTrainer (plus an MoE model's aux loss) on the pairs, resumed from the last
    checkpoint in work_dir. Returns (trainer, train result, indices of the pairs TRL kept,
    checkpoint resumed from, alignloop.training.MoeRun)."""
    from alignloop.checkpoints import last_checkpoint
    from alignloop.reward.trainer import MoeRewardTrainer

    lora = (cfg.reward.lora or LoraOptions()) if cfg.reward.method == "lora" else None
    where = stage_where(cfg.source, ctx.label)
    peft = lora_config(lora, "SEQ_CLS", model=model, key="reward.lora", where=where) if lora else None
    coef = moe_aux_coef(model, cfg.moe)
    trainer = MoeRewardTrainer(model=model, args=args, train_dataset=_dataset(train, cfg.reward.margin_field),
                               eval_dataset=_dataset(held_out, None) if held_out else None,
                               processing_class=tokenizer, peft_config=peft, aux_loss_coef=coef)
    moe = prepare_moe(trainer, lora, cfg.moe, key="reward.lora", where=where, coef=coef)
    kept = set(trainer.train_dataset["pair_index"])  # TRL drops pairs longer than max_length
    if not kept:
        raise StageError(f"{ctx.label}: every training pair is longer than max_length "
                         f"({args.max_length} tokens); raise reward.max_length")
    last = last_checkpoint(args.output_dir)
    if last:
        logger.info("resuming the reward model from %s", last)
    return trainer, trainer.train(resume_from_checkpoint=last), kept, last, moe


# ---------------------------------------------------------------------------------------------
# The model


def _init_path(cfg: Recipe, ctx: StageContext) -> str:
    """What the reward model starts from: the base, the policy, or a checkpoint that exists."""
    if cfg.reward.init == "base":
        return ctx.base
    if cfg.reward.init == "policy":
        return ctx.policy
    path = Path(cfg.reward.init)
    hub_id = not cfg.reward.init.startswith(("/", ".", "~")) and cfg.reward.init.count("/") == 1
    if not path.is_dir() and (path.exists() or not hub_id):
        raise StageError(f"{ctx.label}: reward.init: no checkpoint at {path}; give the directory of "
                         "a saved model (config.json + weights, or a LoRA adapter), or base / policy")
    return cfg.reward.init


def _tokenizer(cfg: Recipe, ctx: StageContext, init: str):
    """The starting checkpoint's tokenizer (with the recipe's chat template), checked against the
    policy's: the loop's reward model scores the policy's answers."""
    try:
        tokenizer = load_tokenizer(cfg.model, init)
        policy = tokenizer if init == ctx.policy else load_tokenizer(cfg.model, ctx.policy)
    except (OSError, ValueError) as err:  # no tokenizer files, or no chat template
        raise StageError(f"{ctx.label}: cannot load the tokenizer of {init}: {err}") from err
    check_same_vocabulary(tokenizer, policy, ctx.label, f"reward.init ({init})")
    return tokenizer


def _load_model(cfg: Recipe, ctx: StageContext, init: str, tokenizer):
    """A one-logit sequence classifier on the starting checkpoint (a causal LM usually: its
    lm_head is dropped and a new `score` head added)."""
    from transformers import AutoModelForSequenceClassification

    try:
        with seqcls_from_causal():
            model = load_model(cfg, init, model_class=AutoModelForSequenceClassification, num_labels=1)
    except OSError as err:  # no weights, or a hub id that cannot be fetched
        raise StageError(f"{ctx.label}: cannot load the reward model's starting checkpoint {init}: "
                         f"{err}") from err
    except ValueError as err:  # no sequence-classification class (OLMoE, Llama 4 in 5.25)
        if "Unrecognized configuration class" not in str(err):
            raise
        raise StageError(f"{ctx.label}: reward.init: transformers has no sequence-classification "
                         f"model for the architecture of {init} ({str(err).splitlines()[0]}); "
                         "start the reward model from a checkpoint of another architecture") from err
    # the classifier reads each row's last non-pad token, so it must know the pad id
    model.config.pad_token_id = tokenizer.pad_token_id
    return model


# ---------------------------------------------------------------------------------------------
# The data


def load_pairs(cfg: Recipe, ctx: StageContext) -> tuple[list[dict], list[dict], list[dict]]:
    """(training pairs, held-out pairs, per-source report).

    Sources are `reward.data` (pairs and rankings, each ranking expanded into its ordered pairs)
    and, with `reward.round_pairs`, the rejection-sampling pairs of earlier rounds. The held-out
    pairs are `reward.eval_data`, or else the pairs of an `eval_fraction` of the prompts (chosen by
    a hash of prompt_id: every pair of a prompt on the same side, the same split in every round).
    """
    sources = [("reward.data", cfg.reward.data)]
    if cfg.reward.round_pairs:
        sources += [(str(p), [SourceConfig(path=p)]) for p in ctx.inputs.get("rs_pairs", [])]
    pairs, report = [], []
    for origin, group in sources:
        if not group:
            continue
        loaded = load_sources(group, "ranking", cfg.bad_records, cfg.seed)
        logger.info("%s:\n%s", origin, format_report(loaded.report))
        report += loaded.report
        pairs += _pairs(loaded.records, origin if len(group) != 1 else group[0].name)
    if cfg.reward.eval_data:
        held = load_sources(cfg.reward.eval_data, "ranking", cfg.bad_records, cfg.seed)
        train, held_out = pairs, _pairs(held.records, "reward.eval_data")
    else:
        train = [p for p in pairs if not held_out_prompt(p["prompt_id"], cfg.reward.eval_fraction)]
        held_out = [p for p in pairs if held_out_prompt(p["prompt_id"], cfg.reward.eval_fraction)]
    if not train:
        raise StageError(f"{ctx.label}: no preference pairs to train on ({len(pairs)} read, "
                         f"{len(held_out)} held out); add records to reward.data"
                         + (" or lower reward.eval_fraction" if pairs else ""))
    if cfg.reward.margin_field:
        for pair in train:
            pair["margin"] = _margin(pair, cfg.reward.margin_field, ctx.label)
    return train, held_out, report


def _pairs(records: list[dict], origin: str) -> list[dict]:
    """Preference pairs of ranking records, with an id and where they came from."""
    out = []
    for record in records:
        for pair in ranking_to_pairs(record):
            i, j = pair["rank_pair"]
            out.append({"pair_id": f"{pair['prompt_id']}:{i}>{j}", **pair, "origin": origin})
    return out


def held_out_prompt(prompt_id: str, fraction: float) -> bool:
    """Whether a prompt belongs to the held-out share `fraction`: sha1(prompt_id) as a number in
    [0, 1). Independent of seed and round, so a prompt never moves between the two sides."""
    return int(hashlib.sha1(prompt_id.encode()).hexdigest()[:8], 16) / 2 ** 32 < fraction


def _margin(pair: dict, field: str, label: str) -> float:
    metadata = pair.get("metadata")
    value = metadata.get(field) if isinstance(metadata, dict) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        got = "missing" if value is None else f"{value!r} is not a finite number"
        raise StageError(f"{label}: {pair['origin']}: the record with prompt_id {pair['prompt_id']!r} "
                         f"(prompt: {_preview(pair['prompt'])}) has no usable metadata.{field} ({got}); "
                         f"reward.margin_field needs a number in every training record, or unset it")
    return float(value)


def _preview(prompt: list[dict], width: int = 60) -> str:
    text = prompt[-1]["content"].replace("\n", " ")
    return repr(text if len(text) <= width else text[:width - 3] + "...")


def _dataset(pairs: list[dict], margin_field: str | None):
    """TRL's conversational preference rows (explicit prompt), a `margin` column when asked for,
    and `pair_index` to tell which pairs survive TRL's max_length filter."""
    from datasets import Dataset

    rows = [{"prompt": p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"], "pair_index": i,
             **({"margin": p["margin"]} if margin_field else {})} for i, p in enumerate(pairs)]
    return Dataset.from_list(rows)


def _accuracy_note(cfg: Recipe, held_out: list[dict]) -> str | None:
    if held_out:
        return None
    if cfg.reward.eval_data:
        return "reward.eval_data holds no pairs"
    if cfg.reward.eval_fraction == 0:
        return "no held-out pairs: reward.eval_fraction is 0 and there is no reward.eval_data"
    return (f"no held-out pairs: no prompt fell in the held-out {cfg.reward.eval_fraction:.0%} "
            "(too few prompts); set reward.eval_data or raise reward.eval_fraction")
