"""Errors a stage raises for input it cannot run on (shown without a traceback by the CLI)."""


class StageError(ValueError):
    """A stage cannot run on its input: the message says which stage, what is wrong and what
    would fix it, e.g. `round_1/rejection_sampling: no prompts (rejection_sampling.prompts ...)`."""
