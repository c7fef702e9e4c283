"""The `rejection_sampling` recipe section (reference A3). Light imports only."""

from __future__ import annotations

from pydantic import Field, model_validator

from alignloop.data.source_config import SourceConfig
from alignloop.options import ScoringConfig, Strict, raise_problems


class RejectionSamplingConfig(Strict):
    """K samples per prompt from the policy, scored, the best kept (docs/rejection_sampling.md).

    The K samples are spread evenly over every (system prompt, temperature) group, system prompts
    outer: with K = 10 and 3 groups they get 4, 3 and 3 samples (`group_sizes`).
    """

    prompts: list[SourceConfig] = Field(default_factory=list)  # prompt records (an `answer` feeds verifiers)
    num_samples: int = Field(default=10, ge=1)  # K per prompt (10-30 in Llama 3)
    temperatures: list[float] = Field(default_factory=lambda: [0.8], min_length=1)
    # None samples the prompt as it is; a text is a system message that steers tone, style or
    # format (Llama 3, later rounds). A prompt with its own system message gets the steering
    # text appended to it, after a blank line.
    system_prompts: list[str | None] = Field(default_factory=lambda: [None], min_length=1)
    max_new_tokens: int = Field(default=256, gt=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    scoring: ScoringConfig = Field(default_factory=ScoringConfig)
    # A reward-model checkpoint for rounds without a `reward` stage.
    reward_model: str | None = None
    # Keep the best and the worst candidate as a preference pair for DPO: a verified best against
    # a failed sample, or, where no verifier applies, when their scores differ by more than
    # `min_gap`.
    pairs: bool = True
    min_gap: float = Field(default=0.0, ge=0)
    # A prompt whose best score is below this keeps nothing (no best, no pair). None: no floor.
    min_score: float | None = None
    # Where a verifier applies to a prompt, only samples that score at least this on every
    # applicable verifier may be the best (Llama 3 keeps math solutions by their final answer,
    # reference A7), ranked among themselves by the total score; the pair is that best vs the
    # worst failing sample; a prompt whose K samples all fail keeps nothing (`all_failed` in
    # metrics.json). null: verifiers only add to the total, as the reward model does.
    min_verifier_score: float | None = Field(default=1.0, ge=0, le=1)
    # A sample cut off at max_new_tokens (finish_reason "length") is not a whole answer: it is
    # never kept as the best (nor as `chosen`) unless this is true. It may still be `rejected`.
    keep_truncated: bool = False

    @model_validator(mode="after")
    def _rules(self) -> "RejectionSamplingConfig":
        raise_problems(self.problems())
        return self

    def problems(self) -> list[tuple[str, str]]:
        """(key, message) for each rule the section breaks: enough samples per prompt for the
        pairs and for every (system prompt, temperature) group, no repeated greedy samples, and
        something that scores them."""
        problems, temperatures = [], self.temperatures
        groups = len(temperatures) * len(self.system_prompts)
        if any(t < 0 for t in temperatures):
            problems.append(("temperatures", "must be >= 0 (0 is greedy decoding)"))
        if self.pairs and self.num_samples < 2:
            problems.append(("num_samples", f"building best/worst pairs needs at least 2 samples "
                                            f"per prompt (got {self.num_samples}); raise it or set "
                                            "pairs: false"))
        if self.num_samples < groups:
            problems.append(("num_samples", f"{self.num_samples} samples cannot cover "
                                            f"{len(temperatures)} temperature(s) x "
                                            f"{len(self.system_prompts)} system prompt(s)"))
        sizes = group_sizes(self.num_samples, groups)
        greedy = [n for g, n in enumerate(sizes) if temperatures[g % len(temperatures)] == 0]
        if any(n > 1 for n in greedy):
            problems.append(("temperatures", "temperature 0 (greedy) gives the same answer every "
                                             f"time, but its group would get {max(greedy)} samples; "
                                             "use temperatures > 0"))
        if self.scoring.reward_model == 0 and not self.scoring.verifiers:
            problems.append(("scoring", "nothing scores the samples: give the reward model a weight "
                                        "or name a verifier"))
        return problems


def group_sizes(num_samples: int, groups: int) -> list[int]:
    """Samples per group: K // groups each, the remainder going to the first groups."""
    base, extra = divmod(num_samples, groups)
    return [base + (g < extra) for g in range(groups)]
