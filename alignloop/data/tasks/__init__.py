"""Built-in datasets and their verifiers (programmatic answer checks). Light imports only."""

from alignloop.data.tasks import arithmetic, shapes
from alignloop.safety import dataset as safety

# name -> records(kind=, split=, count=, seed=) -> list of records of that kind
BUILTIN = {"arithmetic": arithmetic.records, "safety": safety.records,
           "shapes": shapes.records}  # vision kinds (vision_chat, vision_prompt, vision_preference)
# name -> check(response: str, answer) -> bool
VERIFIERS = {"arithmetic": arithmetic.check, "shapes": shapes.check}
