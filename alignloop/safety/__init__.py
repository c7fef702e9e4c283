"""Safety (reference A8): labelled safety data mixed into SFT and DPO, safety judges, VR/FRR.

- `alignloop.safety.dataset`: the built-in safety set (`builtin: safety` in a recipe), split by act;
- `alignloop.safety.mixing`: `safety_mix` (called by the sft and dpo stages), `read_safety`;
- `alignloop.safety.classifier`: `build_judges`, the `rules` judge, `is_refusal`, `on_topic`,
  `Verdict`, the `safety` verifier;
- `alignloop.safety.judge`, `.judge_data`: the `learned` judge and its own labelled data;
- `alignloop.safety.llama_guard`: Llama Guard 3 as a judge;
- `alignloop.safety.metrics`: `violation_rate`, `false_refusal_rate`, `safety_metrics`,
  `safety_evaluation` (every judge, on-topic rates, notes).

Light on import: nothing here loads torch until a learned or Llama Guard judge is built.
"""
