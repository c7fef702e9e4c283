"""What the pipeline hands a stage: the round, the models it starts from, its input artifacts.

Every stage has one entry function, `run(cfg, ctx, out_dir) -> metrics` (STYLE.md): it reads
what `ctx` names, writes its artifacts into `out_dir` (a staging directory that the pipeline
renames into place once the function returns) and keeps checkpoints in `ctx.work_dir`, which
survives a killed run so that the next attempt resumes. docs/architecture.md lists the artifacts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class StageContext:
    name: str        # the stage: reward, rejection_sampling, synth_data, sft or dpo
    round: int       # 0 for the initial SFT, then 1..rounds
    policy: str      # the policy entering this stage: what SFT/DPO start from, what RS samples
    base: str        # the recipe's model (resolved path): where `sft.start: base` starts
    work_dir: Path   # checkpoints and scratch of this attempt; removed when the stage completes
    log_dir: Path    # TensorBoard / W&B logs (kept)
    seed: int        # the recipe's seed plus the round: new samples each round, same on a rerun
    reward_model: Path | None = None  # a reward-model directory (this round's reward stage)
    # Artifact files of earlier stages, by name (docs/architecture.md):
    #   "rs_best"    chat records: each prompt with its best sampled answer  (for sft)
    #   "synthetic"  chat records from synth_data                            (for sft)
    #   "rs_pairs"   preference records: best vs worst sample of a prompt    (for dpo, reward)
    inputs: dict[str, list[Path]] = field(default_factory=dict)
    merge: bool = False  # a LoRA stage must also write merged/: a later stage starts from it

    @property
    def label(self) -> str:
        """`round_1/sft`: the stage's directory under the run, and its name in the manifest."""
        return f"round_{self.round}/{self.name}"
