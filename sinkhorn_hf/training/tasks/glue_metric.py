"""GLUE's official metrics as a local ``evaluate`` module: ``evaluate.load(<path of this file>, task_name)``.

Loaded by path, so it works offline (the Hub's ``glue`` metric needs the network); self-contained, because
``evaluate`` copies the file into its module cache. Accuracy = mean(pred == label); F1 of class 1 =
2·TP / (2·TP + FP + FN); Matthews correlation = (TP·TN − FP·FN) / √((TP+FP)(TP+FN)(TN+FP)(TN+FN)), 0 for a
constant predictor; Pearson r and Spearman ρ (Pearson r of the ranks, ties averaged) for STS-B.
"""

import datasets
import evaluate
import numpy as np
from scipy import stats
from sklearn.metrics import f1_score, matthews_corrcoef


class GlueMetric(evaluate.Metric):
    """``compute(predictions=..., references=...)``: class ids, or scores for stsb; the config name is the task
    (cola, stsb, mrpc and qqp have their own metrics, the others accuracy)."""

    def _info(self) -> evaluate.MetricInfo:
        value = datasets.Value("float64" if self.config_name == "stsb" else "int64")
        return evaluate.MetricInfo(
            description=__doc__,
            citation="Wang et al., GLUE: A Multi-Task Benchmark and Analysis Platform for NLU, ICLR 2019",
            inputs_description="predictions and references, one per example",
            features=datasets.Features({"predictions": value, "references": value}),
        )

    def _compute(self, predictions, references) -> dict:
        predictions, references = np.asarray(predictions), np.asarray(references)
        if self.config_name == "stsb":
            return {
                "pearson": float(stats.pearsonr(predictions, references)[0]),
                "spearmanr": float(stats.spearmanr(predictions, references)[0]),
            }
        if self.config_name == "cola":
            return {"matthews_correlation": float(matthews_corrcoef(references, predictions))}
        result = {"accuracy": float(np.mean(predictions == references))}
        if self.config_name in ("mrpc", "qqp"):
            result["f1"] = float(f1_score(references, predictions, pos_label=1, average="binary", zero_division=0.0))
        return result
