"""The built-in task: two- and three-digit addition and subtraction asked in plain English.

"What is 482 plus 37?" -> "2+7=9, 8+3=11, 4+0+1=5, so the answer is 519." The answer works
column by column from the units, as on paper, and ends in the number, so a verifier can check it
exactly. Showing the work is what makes the task learnable by a 1M-parameter model in minutes on
a CPU: each step needs only two digits at a fixed distance from a landmark and a carry, where a
bare "519" needs the whole carry chain in one forward pass (scratchpads: Nye et al. 2021, "Show
your work"; Lee et al. 2023, "Teaching arithmetic to small transformers"). Measured here: the
tiny model reached 85% held-out accuracy in 1,100 steps with the work shown, 1.5% without. A problem (a, op, b) belongs to the held-out split when a
hash of it falls in a 10% bucket, so train and held-out never share a problem, whatever the seed.
Half of the held-out prompts are worded in HELDOUT_QUESTIONS, phrasings no training record uses;
each record's metadata.phrasing says which ("train" or "heldout"), and the evaluation reports
accuracy on each.
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
# Phrasings that only the held-out split uses (half of its prompts), so that held-out accuracy
# measures the skill on questions worded in no training template, not the templates themselves.
HELDOUT_QUESTIONS = {
    "+": [
        "Find the total of {a} and {b}.",
        "How much is {a} added to {b}?",
        "I bought {a} stamps and then {b} more. How many stamps is that in all?",
        "{a} and {b} together make what number?",
    ],
    "-": [
        "How much is {a} take away {b}?",
        "Find {a} less {b}.",
        "There were {a} birds on a wire and {b} flew off. How many birds stayed?",
        "By how much is {a} greater than {b}?",
    ],
}
SIZES = {"train": 4000, "heldout": 200}
HELDOUT_BUCKETS = 10  # 1 in 10 problems is held out


def work(a: int, op: str, b: int) -> str:
    """The worked answer: one `x+y(+1)=s` / `x-y(-1)=d` step per column from the units, then the result."""
    top, bottom = str(a)[::-1], str(b)[::-1].ljust(len(str(a)), "0")  # a >= b for subtraction
    if op == "+":
        width = max(len(top), len(bottom))
        top, bottom = top.ljust(width, "0"), bottom[:width].ljust(width, "0")
    steps, carry = [], 0
    for x, y in zip(map(int, top), map(int, bottom)):
        if op == "+":
            total = x + y + carry
            steps.append(f"{x}+{y}{'+1' if carry else ''}={total}")
            carry = total // 10
        else:
            borrow = int(x - carry < y)  # borrow ten from the next column
            steps.append(f"{'1' if borrow else ''}{x}-{y}{'-1' if carry else ''}={10 * borrow + x - carry - y}")
            carry = borrow
    result = a + b if op == "+" else a - b
    return f"{', '.join(steps)}, so the answer is {result}."


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
        if split == "heldout" and rng.random() < 0.5:  # a phrasing no training record uses
            template = len(QUESTIONS[op]) + rng.randrange(len(HELDOUT_QUESTIONS[op]))
        else:
            template = rng.randrange(len(QUESTIONS[op]))
        out.append((a, op, b, template))
    return out


def question(a: int, op: str, b: int, template: int) -> str:
    """The question for template index `template`: QUESTIONS first, then HELDOUT_QUESTIONS."""
    phrasings = QUESTIONS[op] + HELDOUT_QUESTIONS[op]
    return phrasings[template].format(a=a, b=b)


def phrasing(op: str, template: int) -> str:
    """"train" for a training phrasing, "heldout" for one only the held-out split uses."""
    return "train" if template < len(QUESTIONS[op]) else "heldout"


def slip(a: int, op: str, b: int, variant: int) -> str:
    """A worked answer with a typical mistake, for preference pairs (always a wrong result):
    variant 0 forgets every carry / borrow; variant 1 works the other operation; a problem
    without carries falls back to variant 1."""
    if variant == 0:
        wrong = _no_carry(a, op, b)
        if wrong != (a + b if op == "+" else a - b):
            return f"{_no_carry_steps(a, op, b)}, so the answer is {wrong}."
    other = "-" if op == "+" else "+"
    big, small = max(a, b), min(a, b)
    return work(big, other, small) if other == "-" else work(a, other, b)


def _digits(a: int, b: int) -> list[tuple[int, int]]:
    width = max(len(str(a)), len(str(b)))
    return list(zip(map(int, str(a).zfill(width)[::-1]), map(int, str(b).zfill(width)[::-1])))


def _no_carry(a: int, op: str, b: int) -> int:
    """The result when each column is done alone and its carry or borrow is dropped."""
    cols = [(x + y) % 10 if op == "+" else (x - y) % 10 for x, y in _digits(a, b)]
    return int("".join(map(str, reversed(cols))))


def _no_carry_steps(a: int, op: str, b: int) -> str:
    return ", ".join(f"{x}{op}{y}={(x + y) % 10 if op == '+' else (x - y) % 10}"
                     for x, y in _digits(a, b))


def records(kind: str = "chat", split: str = "train", count: int | None = None, seed: int = 0) -> list[dict]:
    """Chat records ({"id", "messages"}), prompt records ({"prompt_id", "prompt", "answer"}) or
    preference records (chosen: the worked answer; rejected: one with a typical slip)."""
    if kind not in ("chat", "prompt", "preference", "ranking"):
        raise ValueError(f"the arithmetic task has chat, prompt and preference records, not {kind!r}")
    out = []
    for a, op, b, template in problems(split, count or SIZES[split], seed):
        c = a + b if op == "+" else a - b
        text = question(a, op, b, template)
        rid = f"arith-{_key(a, op, b)[:12]}-{template}"
        meta = {"phrasing": phrasing(op, template)}
        prompt = [{"role": "user", "content": text}]
        if kind == "prompt":
            out.append({"prompt_id": rid, "prompt": prompt, "answer": c, "metadata": meta})
        elif kind in ("preference", "ranking"):  # a pair is a two-response ranking
            out.append({"prompt_id": rid, "prompt": prompt, "chosen": work(a, op, b),
                        "rejected": slip(a, op, b, template % 2), "metadata": meta})
        else:
            out.append({"id": rid, "messages": prompt + [{"role": "assistant", "content": work(a, op, b)}],
                        "metadata": meta})
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


def verify(record: dict, response: str) -> float | None:
    """The `arithmetic` verifier: 1.0 when the response's last number is the record's answer;
    None for a prompt without an answer (the check does not apply to it)."""
    if record.get("answer") is None:
        return None
    return float(check(response, record["answer"]))
