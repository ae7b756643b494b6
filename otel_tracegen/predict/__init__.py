"""Feature prediction from partial traces (the paper's downstream tasks): high latency and uncommon calls.

``Predictor.from_pretrained(model_dir, lm)`` loads the heads in ``model_dir/predict.json``; ``otel-tracegen predict``
is the command and ``benchmarks/predict.py`` the measurement.
"""

from .partial import TASKS, PartialTrace, labels

__all__ = ["TASKS", "PartialTrace", "labels"]
