"""What an evaluation gathers (:class:`EvalOutput`) and the classification metrics of IMDB and images.

Accuracy = mean(pred == label); F1 of the positive class 1 = 2·TP / (2·TP + FP + FN). GLUE's own metrics are
the local ``evaluate`` module :mod:`sinkhorn_hf.training.tasks.glue_metric`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np
from sklearn.metrics import f1_score


class EvalOutput(NamedTuple):
    """Everything gathered over an evaluation set, one row per sample (duplicates already dropped).

    logits (N, C) or (N, 1) for regression; labels (N,); example_ids (N,) when several rows (chunks)
    belong to one example, else None.
    """

    logits: np.ndarray
    labels: np.ndarray
    example_ids: np.ndarray | None = None


MetricFn = Callable[[EvalOutput], dict[str, float]]


def accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(predictions == labels))


def binary_f1(predictions: np.ndarray, labels: np.ndarray) -> float:
    return float(f1_score(labels, predictions, pos_label=1, average="binary", zero_division=0.0))


def classification_metrics(output: EvalOutput, with_f1: bool = False) -> dict[str, float]:
    """Accuracy (and binary F1) of argmax predictions; rows sharing an example id are one example whose
    logits are the mean of its rows' (a long text split into chunks)."""
    logits, labels = output.logits, output.labels
    if output.example_ids is not None:
        ids, first, inverse = np.unique(output.example_ids, return_index=True, return_inverse=True)
        summed = np.zeros((len(ids), logits.shape[1]), dtype=np.float64)
        np.add.at(summed, inverse, logits)
        logits = summed / np.bincount(inverse)[:, None]
        if not np.array_equal(labels[first][inverse], labels):
            raise ValueError("rows with the same example id carry different labels")
        labels = labels[first]
    predictions = logits.argmax(-1)
    result = {"accuracy": accuracy(predictions, labels)}
    if with_f1:
        result["f1"] = binary_f1(predictions, labels)
    return result
