"""Whether two tokenizers share a vocabulary: what every stage that compares two models' tokens
needs (a reward model scoring the policy's text, a teacher's logits teaching a student)."""

from __future__ import annotations


def vocabulary_difference(first: dict[str, int], second: dict[str, int], first_name: str,
                          second_name: str) -> str | None:
    """None when both vocabularies (token -> id) are equal, else up to three examples of each
    kind of difference: `only in <first_name>: [...]; only in <second_name>: [...]; different
    ids for [...]`."""
    if first == second:
        return None
    only_first = sorted(set(first) - set(second))[:3]
    only_second = sorted(set(second) - set(first))[:3]
    moved = sorted(t for t in set(first) & set(second) if first[t] != second[t])[:3]
    return "; ".join(text for text in (
        f"only in {first_name}: {only_first}" if only_first else "",
        f"only in {second_name}: {only_second}" if only_second else "",
        f"different ids for {moved}" if moved else "") if text)
