"""Safety (reference A8): labelled safety data mixed into SFT and DPO, a safety classifier, VR/FRR.

- `alignloop.safety.dataset`: the built-in safety set (`builtin: safety` in a recipe);
- `alignloop.safety.mixing`: `safety_mix` (called by the sft and dpo stages), `read_safety`;
- `alignloop.safety.classifier`: `build_classifier`, `is_refusal`, `Verdict`, the `safety` verifier;
- `alignloop.safety.llama_guard`: Llama Guard 3 as the classifier;
- `alignloop.safety.metrics`: `violation_rate`, `false_refusal_rate`, `safety_metrics`.

Light on import: nothing here loads torch until a Llama Guard classifier is built.
"""
