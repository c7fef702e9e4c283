"""The built-in task: two- and three-digit addition and subtraction asked in plain English.

"What is 482 plus 37?" -> "482 plus 37 is 519." The answer is the last number of the reply,
so a verifier can check it exactly. A problem (a, op, b) belongs to the held-out split when a
hash of it falls in a 10% bucket, so train and held-out never share a problem, whatever the seed.
"""

from __future__ import annotations

import hashlib
import random
import re

QUESTIONS = {
    "+": [
        "What is {a} plus {b}?",
        "Add {a} and {b}.",
        "Compute {a} + {b}.",
        "What do you get when you add {b} to {a}?",
        "What is the sum of {a} and {b}?",
        "Please work out {a} + {b}.",
        "If you have {a} apples and get {b} more, how many apples do you have?",
    ],
    "-": [
        "What is {a} minus {b}?",
        "Subtract {b} from {a}.",
        "Compute {a} - {b}.",
        "If you take {b} away from {a}, what is left?",
        "What is the difference between {a} and {b}?",
        "Please work out {a} - {b}.",
        "A box holds {a} marbles and {b} are taken out. How many marbles are left?",
    ],
}
# Every answer restates the problem before the result: the operands then sit right before the
# digits being computed, which a tiny model learns far faster than an answer out of nowhere.
ANSWERS = {
    "+": ["{a} plus {b} is {c}.", "{a} + {b} = {c}.", "Adding {b} to {a} gives {c}."],
    "-": ["{a} minus {b} is {c}.", "{a} - {b} = {c}.", "Taking {b} from {a} leaves {c}."],
}
SIZES = {"train": 4000, "heldout": 200}
HELDOUT_BUCKETS = 10  # 1 in 10 problems is held out


def _operand(rng: random.Random) -> int:
    return rng.randint(10, 99) if rng.random() < 0.5 else rng.randint(100, 999)


def _problem(rng: random.Random) -> tuple[int, str, int]:
    a, b, op = _operand(rng), _operand(rng), rng.choice("+-")
    if op == "-" and b > a:
        a, b = b, a  # answers stay non-negative
    return a, op, b


def _key(a: int, op: str, b: int) -> str:
    return hashlib.sha1(f"{a}{op}{b}".encode()).hexdigest()


def split_of(a: int, op: str, b: int) -> str:
    return "heldout" if int(_key(a, op, b)[:8], 16) % HELDOUT_BUCKETS == 0 else "train"


def problems(split: str, count: int, seed: int) -> list[tuple[int, str, int, int]]:
    """`count` distinct problems of `split` as (a, op, b, template index)."""
    if split not in SIZES:
        raise ValueError(f"the arithmetic task has splits train and heldout, not {split!r}")
    rng, seen, out = random.Random(f"arithmetic:{split}:{seed}"), set(), []
    while len(out) < count:
        a, op, b = _problem(rng)
        if (a, op, b) in seen or split_of(a, op, b) != split:
            continue
        seen.add((a, op, b))
        out.append((a, op, b, rng.randrange(len(QUESTIONS[op]) * len(ANSWERS[op]))))
    return out


def records(kind: str = "chat", split: str = "train", count: int | None = None, seed: int = 0) -> list[dict]:
    """Chat records ({"id", "messages"}) or prompt records ({"prompt_id", "prompt", "answer"})."""
    if kind not in ("chat", "prompt"):
        raise ValueError("the arithmetic task has no preference data (kinds: chat, prompt)")
    out = []
    for a, op, b, template in problems(split, count or SIZES[split], seed):
        c = a + b if op == "+" else a - b
        question = QUESTIONS[op][template % len(QUESTIONS[op])].format(a=a, b=b)
        rid = f"arith-{_key(a, op, b)[:12]}-{template}"
        if kind == "prompt":
            out.append({"prompt_id": rid, "prompt": [{"role": "user", "content": question}], "answer": c})
        else:
            answer = ANSWERS[op][template // len(QUESTIONS[op])].format(a=a, b=b, c=c)
            out.append({"id": rid, "messages": [{"role": "user", "content": question},
                                                 {"role": "assistant", "content": answer}]})
    return out


_NUMBER = re.compile(r"-?\d[\d,]*")


def extract_answer(text: str) -> int | None:
    """The last integer in `text` ("... is 1,024." -> 1024), or None."""
    numbers = [m.group().rstrip(",") for m in _NUMBER.finditer(text)]
    if not numbers:
        return None
    try:
        return int(numbers[-1].replace(",", ""))
    except ValueError:
        return None


def check(response: str, answer) -> bool:
    """Exact-answer check: the last number of the response equals `answer`."""
    try:
        return extract_answer(response) == int(answer)
    except (TypeError, ValueError):
        return False
