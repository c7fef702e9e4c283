"""The `synth_data` recipe section: synthetic Q&A generation, filtering and dedup (docs/synth_data.md)."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from alignloop.data.source_config import SourceConfig
from alignloop.options import ScoringConfig, Strict
from alignloop.synth_data.templates import resolve_template


class SynthScoring(ScoringConfig):
    """ScoringConfig whose reward model is off unless asked for, also when a recipe writes only
    `scoring: {verifiers: ...}` (synthetic data often comes before any reward model exists)."""

    reward_model: float = Field(default=0.0, ge=0)


class SynthDataConfig(Strict):
    # The model that writes: "policy" (the policy entering this round) or a checkpoint path.
    generator: str = "policy"
    documents: list[SourceConfig] = Field(default_factory=list)  # {"id"?, "text", "title"?, "metadata"?}
    prompts: list[SourceConfig] = Field(default_factory=list)    # prompt records (`answer` feeds verifiers)

    # Templates (alignloop/synth_data/templates.py): a built-in's name or the template text.
    document_template: str = "qa_from_document"
    prompt_template: str = "answer_prompt"
    system_prompt: str | None = None  # for the generator only; the written rows keep the seed's own
    pairs_per_document: int = Field(default=3, ge=1)  # the template's {n}
    include_document: bool = False  # the written user turn: the document, then the question

    # Sampling
    samples_per_seed: int = Field(default=1, ge=1)
    temperature: float = Field(default=0.8, ge=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    max_new_tokens: int = Field(default=256, gt=0)

    # Parsing and rule filters
    answer_pattern: str | None = None  # a regex every answer must contain (re.search)
    min_answer_length: int = Field(default=1, ge=0)
    max_answer_length: int | None = Field(default=None, gt=0)
    length_unit: Literal["words", "chars"] = "words"

    # Quality (reference A6, A7): the combined score of score_responses.
    scoring: SynthScoring = Field(default_factory=SynthScoring)
    # Each verifier named in `scoring` must give at least this (1.0: the final answer is right);
    # None: verifiers only add to the score.
    min_verifier_score: float | None = 1.0
    min_score: float | None = None  # on the combined total
    top_fraction: float | None = Field(default=None, gt=0, le=1)  # Llama 3: RM top quartile (0.25)

    # Dedup: exact (normalised text) always; near-duplicates when the word-shingle Jaccard
    # similarity of question + answer reaches the threshold (None: exact only).
    near_duplicate_threshold: float | None = Field(default=0.7, gt=0, le=1)
    shingle_size: int = Field(default=2, ge=1)  # words per shingle

    @field_validator("document_template")
    @classmethod
    def _document_template(cls, value: str) -> str:
        resolve_template(value, "document")
        return value

    @field_validator("prompt_template")
    @classmethod
    def _prompt_template(cls, value: str) -> str:
        resolve_template(value, "prompt")
        return value

    @field_validator("answer_pattern")
    @classmethod
    def _pattern(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as err:
                raise ValueError(f"not a valid regular expression: {err}") from None
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "SynthDataConfig":
        if self.max_answer_length is not None and self.max_answer_length < self.min_answer_length:
            raise ValueError(f"max_answer_length ({self.max_answer_length}) is below "
                             f"min_answer_length ({self.min_answer_length})")
        if self.samples_per_seed > 1 and self.temperature == 0:
            raise ValueError("samples_per_seed > 1 with temperature 0 repeats one greedy output; "
                             "set a temperature > 0")
        scored = self.scoring.reward_model > 0 or bool(self.scoring.verifiers)
        for key in ("min_score", "top_fraction"):
            if getattr(self, key) is not None and not scored:
                raise ValueError(f"{key} needs a score: give scoring.reward_model a weight or "
                                 "name a verifier in scoring.verifiers")
        return self
