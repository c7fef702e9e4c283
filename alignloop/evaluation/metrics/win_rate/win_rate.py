"""Reward-model win rate of a new policy against a previous one (an `evaluate` metric module).

predictions: the reward of the new policy's answer to each prompt; references: the reward of the
previous policy's answer to the same prompt (same reward model). A win counts 1, a tie 0.5.
"""

import datasets
import evaluate


class WinRate(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Share of prompts where the new answer out-scores the previous one.",
            citation="",
            inputs_description="predictions: new rewards; references: previous rewards",
            features=datasets.Features({"predictions": datasets.Value("float64"),
                                        "references": datasets.Value("float64")}),
        )

    def _compute(self, predictions, references):
        wins = sum(1.0 if new > old else 0.5 if new == old else 0.0
                   for new, old in zip(predictions, references))
        total = len(predictions)
        return {"win_rate": wins / total if total else 0.0, "wins": wins, "total": total}
