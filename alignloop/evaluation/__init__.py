"""Evaluation after each round: task accuracy, safety VR/FRR, reward mean and win rate.

Metrics are computed through `evaluate` with metric modules shipped in `metrics/` and loaded by
path (the hub is not needed).
"""
