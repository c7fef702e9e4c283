"""Built-in datasets. Light imports only."""

from alignloop.data.tasks import arithmetic, shapes
from alignloop.safety import dataset as safety

# name -> records(kind=, split=, count=, seed=) -> list of records of that kind
BUILTIN = {"arithmetic": arithmetic.records, "safety": safety.records,
           "shapes": shapes.records}  # vision kinds (vision_chat, vision_prompt, vision_preference)
# Their verifiers (verify(record, response) -> float | None) are named in the one registry,
# alignloop.reward.verifiers.VERIFIERS.
