"""The `safety` recipe section: safety data mixing and the safety classifier (reference A8, F).

    safety:
      data:      [{builtin: safety, split: train}]     # preference records with metadata.safety
      eval_data: [{builtin: safety, split: heldout}]   # prompt records with metadata.safety
      sft_ratio: 0.1             # safety records make up 10% of the SFT mix
      dpo_ratio: 0.1             # ... and 10% of the DPO pairs
      borderline_fraction: 0.5   # half of them borderline (benign look-alikes), half adversarial
      classifier: rules          # or llama_guard, with llama_guard: /path/to/Llama-Guard-3-1B

docs/safety.md says what each does. Light imports only (the recipe loader imports this).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

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
    # rules: refusal detection + "an adversarial prompt answered without refusal is a violation";
    # llama_guard: a local Llama Guard 3 checkpoint judges the content (refusals still by rules).
    classifier: Literal["rules", "llama_guard"] = "rules"
    llama_guard: str | None = None  # a local Llama Guard 3 checkpoint for classifier: llama_guard
