"""Task accuracy: the share of answers a verifier accepted (an `evaluate` metric module).

Shipped with alignloop and loaded by path, since the hub's "accuracy" module is not reachable
offline. predictions: 1 when the verifier accepted the answer to a prompt, else 0.
"""

import datasets
import evaluate


class TaskAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Share of prompts whose answer the task's verifier accepted.",
            citation="",
            inputs_description="predictions: list of 0/1, one per prompt",
            features=datasets.Features({"predictions": datasets.Value("int32")}),
        )

    def _compute(self, predictions):
        total = len(predictions)
        correct = int(sum(predictions))
        return {"accuracy": correct / total if total else 0.0, "correct": correct, "total": total}
