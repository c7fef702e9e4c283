"""The built-in vision demo: small generated pictures of one shape, and short questions about them.

A picture is one circle, square or triangle in one of six colours on a dark background, drawn with
pillow at `size` x `size` pixels (32 by default: one tile of a tiny vision config, so CPU training
takes minutes). Questions ask for the colour ("What colour is the shape?" -> "red"), the shape
("What shape is this?" -> "circle") or the side it is on ("Is the shape on the left or the
right?" -> "left"); answers are one word, so `check` can score them exactly.

A picture is described by a spec (shape, colour, centre, radius, background shade); the spec's
hash puts it in the held-out split (1 in 10) or the train split, so train and held-out never share
a picture, whatever the seed. Everything is deterministic: the same (split, count, seed, size)
gives the same records and byte-identical PNG files.

Records follow `alignloop.data.vision_records` (visual chat, vision prompt and vision preference kinds);
images are written once into a cache directory named by their spec (`image_dir`, default
$ALIGNLOOP_CACHE/vision-shapes/<size>px) and referenced by absolute path. `write_dataset` writes
a JSONL file with relative paths instead, as a user's own data would look.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import uuid
from pathlib import Path

SHAPES = ("circle", "square", "triangle")
COLOURS = {  # name -> RGB; far apart so that a few pixels tell them apart
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 235),
    "yellow": (240, 220, 40),
    "purple": (150, 60, 200),
    "white": (240, 240, 240),
}
SIDES = ("left", "right")
QUESTIONS = {
    "colour": ["What colour is the shape?", "What is the colour of the shape?",
               "Which colour is this shape?"],
    "shape": ["What shape is this?", "What shape is in the picture?", "Name the shape."],
    "side": ["Is the shape on the left or the right?", "Which side is the shape on, left or right?"],
}
TASKS = tuple(QUESTIONS)
SIZES = {"train": 3000, "heldout": 300}  # default counts (there are far more possible pictures)
HELDOUT_BUCKETS = 10
DEFAULT_SIZE = 32
KINDS = ("chat", "prompt", "preference")  # also accepted with a vision_ prefix (recipe source kinds)


def draw(spec: dict, size: int = DEFAULT_SIZE):
    """The picture for `spec` (keys shape, colour, cx, cy, r, bg; lengths in 1/32 of `size`),
    a `size` x `size` RGB PIL image."""
    from PIL import Image, ImageDraw

    scale = size / 32
    cx, cy, r = spec["cx"] * scale, spec["cy"] * scale, spec["r"] * scale
    shade = spec["bg"]
    image = Image.new("RGB", (size, size), (shade, shade, shade))
    pen = ImageDraw.Draw(image)
    fill = COLOURS[spec["colour"]]
    if spec["shape"] == "circle":
        pen.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif spec["shape"] == "square":
        side = r * 0.9  # a square of the same area as the circle looks the same size
        pen.rectangle([cx - side, cy - side, cx + side, cy + side], fill=fill)
    else:
        pen.polygon([(cx, cy - r * 1.1), (cx - r * 1.15, cy + r * 0.9), (cx + r * 1.15, cy + r * 0.9)],
                    fill=fill)
    return image


def split_of(spec: dict) -> str:
    """"heldout" for 1 picture spec in HELDOUT_BUCKETS, else "train" (independent of any seed)."""
    return "heldout" if int(_key(spec)[:8], 16) % HELDOUT_BUCKETS == 0 else "train"


def answer(spec: dict, task: str) -> str:
    if task == "colour":
        return spec["colour"]
    if task == "shape":
        return spec["shape"]
    return "left" if spec["cx"] < 16 else "right"


def specs(split: str, count: int, seed: int,
          tasks: tuple[str, ...] = TASKS) -> list[tuple[dict, str, int]]:
    """`count` distinct (spec, task, question template) triples of `split`."""
    if split not in SIZES:
        raise ValueError(f"the shapes task has splits train and heldout, not {split!r}")
    unknown = [task for task in tasks if task not in QUESTIONS]
    if unknown or not tasks:
        raise ValueError(f"shapes tasks must be among {', '.join(TASKS)}, got {list(tasks)}")
    rng, seen, out = random.Random(f"shapes:{split}:{seed}"), set(), []
    for _ in range(count * 200):
        if len(out) == count:
            return out
        spec, task = _spec(rng), rng.choice(tasks)
        key = (_key(spec), task)
        if key in seen or split_of(spec) != split:
            continue
        seen.add(key)
        out.append((spec, task, rng.randrange(len(QUESTIONS[task]))))
    raise ValueError(f"could not draw {count} distinct {split} examples (try a smaller count)")


def records(split: str = "train", count: int | None = None, seed: int = 0, *, kind: str = "chat",
            size: int = DEFAULT_SIZE, tasks: tuple[str, ...] = TASKS,
            image_dir: str | Path | None = None) -> list[dict]:
    """Records of `kind` for `split`, their PNG files written under `image_dir`.

    - chat: {"id", "messages": [user: image + question, assistant: answer], "metadata"}
    - prompt: {"prompt_id", "prompt": [user: image + question], "answer", "metadata"}
    - preference: {"prompt_id", "prompt", "chosen": answer, "rejected": a wrong answer, "metadata"}

    Image parts are {"type": "image", "path": absolute path}; metadata holds the task and spec.
    """
    kind = kind.removeprefix("vision_")
    if kind not in KINDS:
        raise ValueError(f"the shapes task has kinds {', '.join(KINDS)}, not {kind!r}")
    folder = Path(image_dir) if image_dir is not None else _default_dir(size)
    out = []
    for spec, task, template in specs(split, count or SIZES[split], seed, tuple(tasks)):
        path = _write_png(folder, spec, size)
        rid = f"shapes-{_key(spec)[:12]}-{task}{template}"
        user = {"role": "user", "content": [{"type": "image", "path": str(path)},
                                            {"type": "text", "text": QUESTIONS[task][template]}]}
        right = answer(spec, task)
        meta = {"task": task, "spec": spec}
        if kind == "chat":
            out.append({"id": rid, "messages": [user, _assistant(right)], "metadata": meta})
        elif kind == "prompt":
            out.append({"prompt_id": rid, "prompt": [user], "answer": right, "metadata": meta})
        else:
            wrong = _wrong(spec, task, random.Random(rid))
            out.append({"prompt_id": rid, "prompt": [user], "chosen": [_assistant(right)],
                        "rejected": [_assistant(wrong)], "metadata": meta})
    return out


def write_dataset(out_dir: str | Path, split: str = "train", count: int | None = None,
                  seed: int = 0, *, kind: str = "chat", size: int = DEFAULT_SIZE,
                  tasks: tuple[str, ...] = TASKS) -> Path:
    """Writes `out_dir/<split>.jsonl` with its images in `out_dir/img/` (paths relative to the
    JSONL file, the layout `alignloop.data.readers.read_records` reads); returns the path."""
    from alignloop.data.readers import write_jsonl

    out_dir = Path(out_dir)
    rows = records(split, count, seed, kind=kind, size=size, tasks=tasks, image_dir=out_dir / "img")
    for row in rows:
        for message in row.get("messages", []) + row.get("prompt", []):
            for part in message["content"]:
                if part["type"] == "image":
                    part["path"] = f"img/{Path(part['path']).name}"
    path = out_dir / f"{split}.jsonl"
    write_jsonl(path, rows)
    return path


_WORD = re.compile(r"[a-z]+")


def normalize(text: str) -> str:
    """Lower case, words only ("Red." -> "red", " Left! " -> "left", "colour" stays)."""
    return " ".join(_WORD.findall(str(text).lower()))


def check(prediction: str, answer: str) -> bool:
    """Exact answer: the prediction, lower-cased and without punctuation, is the answer word."""
    return normalize(prediction) == normalize(answer)


def verify(record: dict, response: str) -> float | None:
    """The `shapes` verifier: 1.0 for an exact answer, 0.0 otherwise, None without an answer."""
    if record.get("answer") is None:
        return None
    return float(check(response, record["answer"]))


def accuracy(predictions: list[str], answers: list[str]) -> float:
    """Fraction of exact answers (`check`); 0.0 for no predictions."""
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} answers")
    return sum(map(check, predictions, answers)) / len(answers) if answers else 0.0


# ---- helpers ------------------------------------------------------------------------------------

def _spec(rng: random.Random) -> dict:
    """A random picture spec on a 32-unit grid: the shape sits clearly left or right of centre."""
    r = rng.randint(5, 8)
    side = rng.choice(SIDES)
    cx = rng.randint(r + 1, 13) if side == "left" else rng.randint(19, 31 - r)
    return {"shape": rng.choice(SHAPES), "colour": rng.choice(list(COLOURS)), "cx": cx,
            "cy": rng.randint(r + 2, 30 - r), "r": r, "bg": rng.choice((0, 24, 48))}


def _key(spec: dict) -> str:
    return hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def _wrong(spec: dict, task: str, rng: random.Random) -> str:
    options = {"colour": list(COLOURS), "shape": list(SHAPES), "side": list(SIDES)}[task]
    return rng.choice([option for option in options if option != answer(spec, task)])


def _assistant(text: str) -> dict:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def _default_dir(size: int) -> Path:
    root = os.environ.get("ALIGNLOOP_CACHE") or Path.home() / ".cache" / "alignloop"
    return Path(root) / "vision-shapes" / f"{size}px"


def _write_png(folder: Path, spec: dict, size: int) -> Path:
    """`folder/<spec hash>.png`, drawn once; written to a temporary name and renamed, so that
    concurrent writers and killed runs never leave half a file under the final name."""
    path = folder / f"{_key(spec)[:16]}.png"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{path.name}.{uuid.uuid4().hex[:8]}.tmp"
        draw(spec, size).save(tmp, format="PNG")
        os.replace(tmp, path)
    return path.resolve()
