"""The `safety` recipe section: safety data mixing and the safety classifier (reference A8, F).

    safety:
      data:      [{builtin: safety, split: train}]     # preference records with metadata.safety
      eval_data: [{builtin: safety, split: heldout}]   # prompt records with metadata.safety
      sft_ratio: 0.1             # safety records make up 10% of the SFT mix
      dpo_ratio: 0.1             # ... and 10% of the DPO pairs
      borderline_fraction: 0.5   # half of them borderline (benign look-alikes), half adversarial
      classifier: auto           # the headline judge: auto | learned | rules | llama_guard
      llama_guard: null          # a local Llama Guard 3 checkpoint: also judged, and auto's pick

docs/safety.md says what each does. Light imports only (the recipe loader imports this).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from alignloop.data.source_config import SourceConfig
from alignloop.options import Strict


class SafetyConfig(Strict):
    # Training safety records: preference records (prompt, chosen = the right answer, rejected =
    # the wrong one), each with metadata.safety "adversarial" | "borderline" (and optionally
    # metadata.category S1..S14). SFT trains on prompt + chosen; DPO on the pair.
    data: list[SourceConfig] = Field(default_factory=list)
    # Held-out prompts for VR (adversarial) and FRR (borderline), labelled the same way.
    eval_data: list[SourceConfig] = Field(default_factory=list)
    # Safety share of the final SFT mix / DPO pairs: n = round(main * ratio / (1 - ratio)).
    # Smaller models need a larger share (Llama 3 Fig. 18).
    sft_ratio: float = Field(default=0.1, ge=0, lt=1)
    dpo_ratio: float = Field(default=0.1, ge=0, lt=1)
    # Borderline share of the safety records: higher lowers false refusals (Llama 3 §5.4.3).
    borderline_fraction: float = Field(default=0.5, ge=0, le=1)
    # Every evaluation runs every judge it can: `rules` (refusal regex; a non-refusal of an
    # adversarial prompt is a violation), `learned` (a small classifier trained on other phrasings,
    # alignloop/safety/judge.py) and, when `llama_guard` is set, Llama Guard 3 (content). This key
    # picks the primary one, whose VR / FRR are the headline `vr` / `frr`: auto = llama_guard when
    # `llama_guard` is set, else learned. The `safety` verifier of rejection sampling is always rules.
    classifier: Literal["auto", "learned", "rules", "llama_guard"] = "auto"
    llama_guard: str | None = None  # a local Llama Guard 3 checkpoint

    @field_validator("eval_data")
    @classmethod
    def _heldout_fits(cls, sources: list[SourceConfig]) -> list[SourceConfig]:
        """The built-in held-out split has a fixed number of prompts and never repeats one."""
        from alignloop.safety.dataset import check_count

        for source in sources:
            if source.builtin == "safety":
                check_count(source.split, source.count)
        return sources


def primary_judge(scfg: SafetyConfig | None) -> str:
    """The judge whose VR / FRR are the headline numbers (see `classifier`)."""
    if scfg is None or scfg.classifier == "auto":
        return "llama_guard" if scfg is not None and scfg.llama_guard else "learned"
    return scfg.classifier
