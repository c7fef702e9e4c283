"""Scoring responses: the learned reward model in batches, verifiers, and their weighted sum.

    scorer = RewardScorer(rm_dir)                     # a reward stage's model/ (full or LoRA)
    scorer.check_tokenizer(policy_tokenizer)          # StageError when the vocabularies differ
    rewards = scorer.score(prompts, responses)        # one float per (prompt, response)
    accuracy = pairwise_accuracy(scorer, pairs)       # share of pairs with r(chosen) > r(rejected)

    combined = score_responses(records, responses, cfg.rejection_sampling.scoring, scorer)
    # [{"reward_model": r or None, "verifiers": {name: v}, "total": sum of weight * score}]

A (prompt, response) pair is rendered with the reward model's chat template as the prompt
messages followed by the response's assistant message(s), and tokenized without adding special
tokens: exactly what TRL's RewardTrainer does with a conversational preference row
(`apply_chat_template(prompt + chosen)`), so training and scoring see the same tokens.
"""

from __future__ import annotations

import json
import numbers
from pathlib import Path

import torch

from alignloop.models.vocabulary import vocabulary_difference
from alignloop.pipeline.errors import StageError

Response = str | list[dict]  # response text, or a list of assistant messages


class RewardScorer:
    """A sequence-classification reward model (one logit) scoring (prompt, response) pairs."""

    def __init__(self, model_dir: str | Path, batch_size: int = 32, dtype: torch.dtype = torch.float32):
        from transformers import AutoTokenizer

        self.model_dir, self.batch_size = Path(model_dir), batch_size
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        if self.tokenizer.pad_token is None:  # a reward model trained elsewhere: pad as we train
            from alignloop.models.loading import PAD_CANDIDATES

            vocab = self.tokenizer.get_vocab()
            pad = next((token for token in PAD_CANDIDATES if token in vocab), None)
            self.tokenizer.pad_token = pad or self.tokenizer.eos_token
        self.model = _load_reward_model(self.model_dir, dtype).eval()
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id

    @classmethod
    def from_model(cls, model, tokenizer, batch_size: int = 32, name: str = "reward model") -> "RewardScorer":
        """A scorer around an in-memory model (e.g. during training); `name` is used in messages."""
        scorer = cls.__new__(cls)
        scorer.model_dir, scorer.batch_size = Path(name), batch_size
        scorer.model, scorer.tokenizer = model, tokenizer
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        return scorer

    @classmethod
    def for_policy(cls, model_dir: str | Path, policy: str, dtype: torch.dtype, where: str) -> "RewardScorer":
        """The reward model in `model_dir`, checked to share the policy's vocabulary (the policy's
        answers are what it scores). StageError naming `where` when either cannot be loaded or
        the vocabularies differ: before any sampling, so a broken checkpoint fails in seconds."""
        from transformers import AutoTokenizer

        try:
            policy_tokenizer = AutoTokenizer.from_pretrained(policy)
        except (OSError, ValueError) as err:
            raise StageError(f"{where}: cannot load the policy's tokenizer from {policy}: {err}") from err
        try:
            scorer = cls(model_dir, dtype=dtype)
        except (OSError, ValueError) as err:
            raise StageError(f"{where}: cannot load the reward model {model_dir} (a reward stage's "
                             f"model/ directory: sequence classification, one score): {err}") from err
        scorer.check_tokenizer(policy_tokenizer, where=f"{where} (policy {policy})")
        return scorer

    def check_tokenizer(self, tokenizer, where: str = "reward model") -> None:
        """Raises StageError unless `tokenizer` has the reward model's vocabulary."""
        check_same_vocabulary(self.tokenizer, tokenizer, where, f"the reward model in {self.model_dir}")

    @torch.no_grad()
    def score(self, prompts: list[list[dict]], responses: list[Response]) -> list[float]:
        """One reward per (prompt messages, response), in input order."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        texts = [render(self.tokenizer, p, r) for p, r in zip(prompts, responses)]
        was_training = self.model.training
        self.model.eval()
        out: list[float] = []
        device = next(self.model.parameters()).device
        side = self.tokenizer.padding_side
        # Right padding, as TRL's collator pads in training; the classifier reads each row's last
        # token that is not the pad id, so model.config.pad_token_id must be the tokenizer's.
        self.tokenizer.padding_side = "right"
        try:
            for start in range(0, len(texts), self.batch_size):
                batch = self.tokenizer(texts[start:start + self.batch_size], add_special_tokens=False,
                                       padding=True, return_tensors="pt").to(device)
                out += self.model(**batch).logits[:, 0].float().tolist()  # (B,)
        finally:
            self.tokenizer.padding_side = side
            self.model.train(was_training)
        return out


def render(tokenizer, prompt: list[dict], response: Response) -> str:
    """The text a reward model scores: prompt messages + the response's assistant message(s)."""
    if isinstance(response, str):
        response = [{"role": "assistant", "content": response}]
    return tokenizer.apply_chat_template(prompt + response, tokenize=False)


def pairwise_accuracy(scorer: RewardScorer, pairs: list[dict]) -> dict:
    """Held-out accuracy of preference pairs ({"prompt", "chosen", "rejected"}).

    Returns {"accuracy": share of pairs with r(chosen) > r(rejected) (a tie counts as wrong),
    "mean_margin": mean of r(chosen) - r(rejected), "pairs": n}; accuracy None when n is 0.
    """
    if not pairs:
        return {"accuracy": None, "mean_margin": None, "pairs": 0}
    prompts = [p["prompt"] for p in pairs]
    chosen = scorer.score(prompts, [p["chosen"] for p in pairs])
    rejected = scorer.score(prompts, [p["rejected"] for p in pairs])
    margins = [c - r for c, r in zip(chosen, rejected)]
    return {"accuracy": sum(m > 0 for m in margins) / len(margins),
            "mean_margin": sum(margins) / len(margins), "pairs": len(margins)}


def check_same_vocabulary(reward_tokenizer, policy_tokenizer, where: str, what: str) -> None:
    """StageError unless both tokenizers map the same tokens to the same ids.

    A reward model reads the policy's answers as text, but the loop assumes one tokenizer family
    (the RM starts from the base or the policy); a different vocabulary means a wrong checkpoint.
    """
    rm_vocab, policy_vocab = reward_tokenizer.get_vocab(), policy_tokenizer.get_vocab()
    examples = vocabulary_difference(rm_vocab, policy_vocab, "the reward model's", "the policy's")
    if examples is None:
        return
    raise StageError(f"{where}: {what} has another tokenizer ({len(rm_vocab)} tokens) than the policy "
                     f"({len(policy_vocab)} tokens; {examples}); train the reward model from the same "
                     "base, or point to one that shares the policy's tokenizer")


def _load_reward_model(model_dir: Path, dtype: torch.dtype):
    """A saved reward model: a full sequence-classification model, or a LoRA adapter (with its
    score head in modules_to_save) merged into its base loaded with a one-logit head."""
    from transformers import AutoModelForSequenceClassification

    adapter = model_dir / "adapter_config.json"
    if not adapter.is_file():
        return AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=dtype)
    from peft import PeftModel

    base_path = json.loads(adapter.read_text())["base_model_name_or_path"]
    with seqcls_from_causal():
        # the base is usually a causal LM checkpoint: num_labels=1 gives the score head the
        # adapter's shape (without it, transformers builds a two-label head)
        base = AutoModelForSequenceClassification.from_pretrained(base_path, dtype=dtype, num_labels=1)
    return PeftModel.from_pretrained(base, str(model_dir)).merge_and_unload()


def seqcls_from_causal():
    """A context in which loading a causal-LM checkpoint as a sequence classifier does not warn
    about the new score head and the unused lm_head (TRL's own helper, when it exists)."""
    import contextlib

    try:
        from trl.trainer.reward_trainer import suppress_seqcls_warning
    except ImportError:  # a TRL without it: the warning is harmless
        return contextlib.nullcontext()
    return suppress_seqcls_warning()


def score_responses(records: list[dict], responses: list[str], scoring,
                    reward_scorer: RewardScorer | None = None) -> list[dict]:
    """Scores each response to its prompt record with the reward model and the verifiers.

    `scoring` is a ScoringConfig: total = reward_model weight x reward + sum of verifier weight x
    verifier score (verifiers that return None for a prompt do not count). A reward-model weight
    > 0 needs `reward_scorer`. A verifier that raises or returns something other than a number or
    None is a ValueError naming the verifier and the record.
    """
    from alignloop.reward.verifiers import resolve_verifier

    if len(records) != len(responses):
        raise ValueError(f"{len(records)} records but {len(responses)} responses")
    if scoring.reward_model > 0 and reward_scorer is None:
        raise ValueError("scoring.reward_model has a weight but no reward model was given")
    rewards = (reward_scorer.score([r["prompt"] for r in records], responses)
               if scoring.reward_model > 0 else [None] * len(records))
    verifiers = {name: resolve_verifier(name) for name in scoring.verifiers}
    out = []
    for record, response, reward in zip(records, responses, rewards):
        checks = {name: _check(name, fn, record, response) for name, fn in verifiers.items()}
        total = sum(scoring.verifiers[name] * value for name, value in checks.items()
                    if value is not None)
        if reward is not None:
            total += scoring.reward_model * reward
        out.append({"reward_model": reward, "verifiers": checks, "total": total})
    return out


def _check(name: str, fn, record: dict, response: str) -> float | None:
    """The verifier's score, or None when it does not apply to this prompt (e.g. the arithmetic
    check on a prompt without an answer): a mixed prompt set is scored by whichever applies."""
    where = f"verifier {name!r} on prompt_id {record.get('prompt_id')!r}"
    try:
        value = fn(record, response)
    except Exception as err:  # a user's verifier: say which one and on what, then its error
        raise ValueError(f"{where} failed: {type(err).__name__}: {err}") from err
    if value is None:
        return None
    if not isinstance(value, numbers.Real):  # bools and numpy floats are fine
        raise ValueError(f"{where} returned {value!r}; a verifier returns a number in [0, 1] "
                         "or None when it does not apply")
    return float(value)
