"""The judges an evaluation runs, built from the recipe: above the rules (classifier.py), the
learned judge (judge.py) and Llama Guard (llama_guard.py), which import none of this."""

from __future__ import annotations

from alignloop.safety.classifier import RuleClassifier


def build_judges(cfg) -> tuple[dict, str]:
    """({name: classifier} for every judge the evaluation runs, the primary judge's name).

    `cfg`: a Recipe (its safety section may be None). rules and learned always; llama_guard too
    when `cfg.safety.llama_guard` is set. The primary one is `cfg.safety.classifier` (auto:
    llama_guard when set, else learned); see alignloop.safety.config.primary_judge."""
    from alignloop.safety.config import primary_judge
    from alignloop.safety.judge import LearnedClassifier

    scfg, primary = cfg.safety, primary_judge(cfg.safety)
    # (alignloop.config checks that classifier: llama_guard comes with a checkpoint)
    guard = scfg.llama_guard if scfg is not None else None
    judges = {"rules": RuleClassifier(), "learned": LearnedClassifier.load_or_train()}
    if guard:
        from alignloop.safety.llama_guard import LlamaGuardClassifier

        judges["llama_guard"] = LlamaGuardClassifier(guard)
    return judges, primary
