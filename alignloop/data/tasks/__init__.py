"""Built-in datasets and their verifiers (programmatic answer checks). Light imports only."""

from alignloop.data.tasks import arithmetic
from alignloop.safety import dataset as safety

# name -> records(kind=, split=, count=, seed=) -> list of records of that kind
BUILTIN = {"arithmetic": arithmetic.records, "safety": safety.records}
# name -> check(response: str, answer) -> bool
VERIFIERS = {"arithmetic": arithmetic.check}
