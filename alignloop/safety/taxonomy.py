"""The hazard taxonomy and the two kinds of safety prompts (reference A8 and F).

Categories are MLCommons' hazards as Llama Guard 3 names them: S1-S13 for every Llama Guard 3
model, S14 (Code Interpreter Abuse) for the 8B one only. Safety prompts are `adversarial`
(a harmful request: the right answer is a refusal; measured by the violation rate) or
`borderline` (a benign request that looks like a harmful one: the right answer is help; measured
by the false-refusal rate).
"""

CATEGORIES = {
    "S1": "Violent Crimes",
    "S2": "Non-Violent Crimes",
    "S3": "Sex-Related Crimes",
    "S4": "Child Sexual Exploitation",
    "S5": "Defamation",
    "S6": "Specialized Advice",
    "S7": "Privacy",
    "S8": "Intellectual Property",
    "S9": "Indiscriminate Weapons",
    "S10": "Hate",
    "S11": "Suicide & Self-Harm",
    "S12": "Sexual Content",
    "S13": "Elections",
    "S14": "Code Interpreter Abuse",
}
LLAMA_GUARD_3 = tuple(f"S{i}" for i in range(1, 14))  # what Llama Guard 3 1B / 11B-Vision know

ADVERSARIAL, BORDERLINE = "adversarial", "borderline"
LABELS = (ADVERSARIAL, BORDERLINE)


def label_problem(obj) -> tuple[str, str] | None:
    """(field, reason) when a record's `metadata` lacks a valid safety label, else None.

    Every safety record needs `metadata.safety` ("adversarial" or "borderline"); a
    `metadata.category`, when present, must be a code of CATEGORIES.
    """
    meta = obj.get("metadata") if isinstance(obj, dict) else None
    label = meta.get("safety") if isinstance(meta, dict) else None
    if label is None:
        return "metadata.safety", ("missing: every safety record needs metadata.safety, "
                                   "'adversarial' (answer: a refusal) or 'borderline' (answer: help)")
    if label not in LABELS:
        return "metadata.safety", f"expected 'adversarial' or 'borderline', got {label!r}"
    category = meta.get("category")
    if category is not None and category not in CATEGORIES:
        return "metadata.category", (f"unknown hazard category {category!r} "
                                     f"(expected S1..S14 or null)")
    return None
