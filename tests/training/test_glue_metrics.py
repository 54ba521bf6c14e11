"""GLUE metrics against values worked out by hand from their definitions."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sinkhorn_hf.training.metrics import EvalOutput, classification_metrics
from sinkhorn_hf.training.tasks.glue import glue_metrics

# TP = 2 (rows 0, 4), FP = 1 (row 1), FN = 1 (row 3), TN = 1 (row 2)
PREDICTIONS = np.array([1, 1, 0, 0, 1])
LABELS = np.array([1, 0, 0, 1, 1])


def test_accuracy_and_f1_by_hand():
    result = glue_metrics("mrpc", PREDICTIONS, LABELS)
    assert result == pytest.approx({"accuracy": 3 / 5, "f1": 2 * 2 / (2 * 2 + 1 + 1)})
    assert glue_metrics("qqp", PREDICTIONS, LABELS) == result
    for task in ("sst2", "mnli", "qnli", "rte", "wnli"):
        assert glue_metrics(task, PREDICTIONS, LABELS) == pytest.approx({"accuracy": 0.6})


def test_matthews_correlation_by_hand():
    # (TP·TN − FP·FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (2 − 1) / sqrt(3·3·2·2)
    assert glue_metrics("cola", PREDICTIONS, LABELS) == pytest.approx({"matthews_correlation": 1 / 6})
    # a constant predictor has zero correlation (GLUE's convention, not NaN)
    assert glue_metrics("cola", np.ones(5, int), LABELS)["matthews_correlation"] == 0.0


def test_pearson_and_spearman_by_hand():
    # x = [1, 2, 3], y = [1, 3, 2]: centred x = [-1, 0, 1], y = [-1, 1, 0]; cov 1, variances 2 and 2 -> 0.5
    result = glue_metrics("stsb", np.array([1.0, 2.0, 3.0]), np.array([1.0, 3.0, 2.0]))
    assert result == pytest.approx({"pearson": 0.5, "spearmanr": 0.5})
    # ties take their mean rank: ranks x = [1, 2.5, 2.5, 4], y = [1, 2, 3, 4] -> 4.5 / sqrt(4.5 · 5)
    result = glue_metrics("stsb", np.array([0.1, 0.7, 0.7, 2.0]), np.array([1.0, 2.0, 3.0, 4.0]))
    assert result["spearmanr"] == pytest.approx(4.5 / math.sqrt(4.5 * 5))
    x, y = np.array([0.1, 0.7, 0.7, 2.0]), np.array([1.0, 2.0, 3.0, 4.0])
    xc, yc = x - x.mean(), y - y.mean()
    assert result["pearson"] == pytest.approx((xc @ yc) / math.sqrt((xc @ xc) * (yc @ yc)))


def test_unknown_task():
    with pytest.raises(ValueError, match="unknown GLUE task 'sst-2'; known: cola, sst2"):
        glue_metrics("sst-2", PREDICTIONS, LABELS)


def test_chunked_examples_vote_with_mean_logits():
    # example 7: chunks say (+2, -1) for class 1 vs 0 -> mean favours class 1; example 3 has one chunk
    logits = np.array([[0.0, 2.0], [1.0, 0.0], [0.5, 0.0]])
    output = EvalOutput(logits, labels=np.array([1, 1, 0]), example_ids=np.array([7, 7, 3]))
    assert classification_metrics(output, with_f1=True) == {"accuracy": 1.0, "f1": 1.0}
    flipped = EvalOutput(logits, labels=np.array([0, 0, 0]), example_ids=np.array([7, 7, 3]))
    assert classification_metrics(flipped) == {"accuracy": 0.5}
    with pytest.raises(ValueError, match="same example id carry different labels"):
        classification_metrics(EvalOutput(logits, np.array([1, 0, 0]), np.array([7, 7, 3])))
