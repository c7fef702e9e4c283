"""Scoring responses: the learned reward model in batches, verifiers, and their weighted sum.

    scorer = RewardScorer(rm_dir)                     # a reward stage's model/ (full or LoRA)
    scorer.check_tokenizer(policy_tokenizer)          # StageError when the vocabularies differ
    rewards = scorer.score(prompts, responses)        # one float per (prompt, response)

    combined = score_responses(records, responses, cfg.rejection_sampling.scoring, scorer)
    # [{"reward_model": r or None, "verifiers": {name: v}, "total": sum of weight * score}]
"""

from __future__ import annotations

from pathlib import Path

import torch

from alignloop.pipeline.errors import StageError


class RewardScorer:
    """A sequence-classification reward model (one logit) scoring (prompt, response) pairs.

    The pair is rendered with the reward model's chat template as the prompt messages followed by
    one assistant message, exactly as the reward stage rendered its training pairs.
    """

    def __init__(self, model_dir: str | Path, batch_size: int = 32, dtype: torch.dtype = torch.float32):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        model_dir = Path(model_dir)
        self.model_dir, self.batch_size = model_dir, batch_size
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        if (model_dir / "adapter_config.json").is_file():
            from peft import AutoPeftModelForSequenceClassification

            model = AutoPeftModelForSequenceClassification.from_pretrained(model_dir, dtype=dtype)
            model = model.merge_and_unload()
        else:
            model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=dtype)
        if model.config.pad_token_id is None:
            model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model = model.eval()

    def check_tokenizer(self, tokenizer, where: str = "reward model") -> None:
        """Raises StageError unless `tokenizer` has the reward model's vocabulary."""
        if tokenizer.get_vocab() != self.tokenizer.get_vocab():
            raise StageError(f"{where}: the reward model in {self.model_dir} has another tokenizer "
                             f"({len(self.tokenizer)} tokens) than the policy ({len(tokenizer)} "
                             "tokens); train the reward model from the same base, or point to one "
                             "that shares the policy's tokenizer")

    @torch.no_grad()
    def score(self, prompts: list[list[dict]], responses: list[str]) -> list[float]:
        """One reward per (prompt messages, response text), in input order."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        texts = [self.tokenizer.apply_chat_template(p + [{"role": "assistant", "content": r}],
                                                    tokenize=False)
                 for p, r in zip(prompts, responses)]
        out: list[float] = []
        device = next(self.model.parameters()).device
        side = self.tokenizer.padding_side
        self.tokenizer.padding_side = "right"  # the classifier reads the last non-pad token
        try:
            for start in range(0, len(texts), self.batch_size):
                batch = self.tokenizer(texts[start:start + self.batch_size], add_special_tokens=False,
                                       padding=True, return_tensors="pt").to(device)
                out += self.model(**batch).logits[:, 0].float().tolist()  # (B,)
        finally:
            self.tokenizer.padding_side = side
        return out


def score_responses(records: list[dict], responses: list[str], scoring,
                    reward_scorer: RewardScorer | None = None) -> list[dict]:
    """Scores each response to its prompt record with the reward model and the verifiers.

    `scoring` is a ScoringConfig. A reward-model weight > 0 needs `reward_scorer`.
    """
    from alignloop.reward.verifiers import resolve_verifier

    if scoring.reward_model > 0 and reward_scorer is None:
        raise ValueError("scoring.reward_model has a weight but no reward model was given")
    rewards = (reward_scorer.score([r["prompt"] for r in records], responses)
               if scoring.reward_model > 0 else [None] * len(records))
    verifiers = {name: resolve_verifier(name) for name in scoring.verifiers}
    out = []
    for record, response, reward in zip(records, responses, rewards):
        checks = {name: float(fn(record, response)) for name, fn in verifiers.items()}
        total = sum(scoring.verifiers[name] * value for name, value in checks.items())
        if reward is not None:
            total += scoring.reward_model * reward
        out.append({"reward_model": reward, "verifiers": checks, "total": total})
    return out
