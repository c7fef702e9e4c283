"""Which trainer checkpoint a killed stage resumes from."""

from __future__ import annotations

import logging
import re
from pathlib import Path

logger = logging.getLogger("alignloop")

# transformers' Trainer writes trainer_state.json last in a checkpoint (after the weights,
# optimizer, scheduler and RNG states): a checkpoint without it was cut off while being written.
COMPLETE_MARKER = "trainer_state.json"


def last_checkpoint(output_dir: str | Path) -> str | None:
    """The newest complete `checkpoint-<step>` under `output_dir`, or None.

    Unlike transformers' `get_last_checkpoint`, a checkpoint that a kill interrupted mid-write is
    passed over (with a warning) for the one before it, instead of failing the resume."""
    root = Path(output_dir)
    if not root.is_dir():
        return None
    steps = sorted(((int(m.group(1)), p) for p in root.iterdir()
                    if p.is_dir() and (m := re.fullmatch(r"checkpoint-(\d+)", p.name))), reverse=True)
    for _, path in steps:
        if (path / COMPLETE_MARKER).is_file():
            return str(path)
        logger.warning("%s has no %s (cut off while being written): not resuming from it",
                       path, COMPLETE_MARKER)
    return None
