"""Binary classification metrics with honest uncertainty: every accuracy comes with its n
and a Wilson 95 % interval; calibration as expected calibration error (ECE)."""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

Z95 = 1.959963984540054


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (well-behaved near 0 and 1)."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def roc_auc(y_true: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve via the Mann-Whitney U statistic (ties get average ranks)."""
    y_true = np.asarray(y_true).astype(bool)
    n_pos, n_neg = int(y_true.sum()), int((~y_true).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = pd.Series(np.asarray(score, dtype=float)).rank(method="average").to_numpy()
    return float((ranks[y_true].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def roc_curve(y_true: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate) from (0, 0), one point per distinct score
    threshold, highest first: tied scores are one step, so the trapezoid area is roc_auc."""
    y_true, score = np.asarray(y_true).astype(bool), np.asarray(score, dtype=float)
    order = np.argsort(-score, kind="stable")
    last_of_tie = np.r_[np.flatnonzero(np.diff(score[order])), len(order) - 1]
    tpr = np.r_[0, np.cumsum(y_true[order])[last_of_tie] / max(1, y_true.sum())]
    fpr = np.r_[0, np.cumsum(~y_true[order])[last_of_tie] / max(1, (~y_true).sum())]
    return fpr, tpr


def reliability_table(y_true: np.ndarray, prob_crack: np.ndarray, bins: int = 10) -> pd.DataFrame:
    """Confidence-binned accuracy, the data of a reliability diagram. Confidence is the
    probability of the predicted class, so it lies in [0.5, 1]."""
    y_true = np.asarray(y_true).astype(int)
    prob = np.asarray(prob_crack, dtype=float)
    pred = (prob >= 0.5).astype(int)
    conf = np.where(pred == 1, prob, 1 - prob)
    edges = np.linspace(0.5, 1.0, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    rows = []
    for b in range(bins):
        sel = which == b
        n = int(sel.sum())
        rows.append({"bin_low": edges[b], "bin_high": edges[b + 1], "n": n,
                     "mean_confidence": float(conf[sel].mean()) if n else float("nan"),
                     "accuracy": float((pred[sel] == y_true[sel]).mean()) if n else float("nan")})
    return pd.DataFrame(rows)


def expected_calibration_error(y_true: np.ndarray, prob_crack: np.ndarray, bins: int = 10) -> float:
    """ECE = sum over bins of (n_bin / n) * |accuracy_bin - confidence_bin|."""
    table = reliability_table(y_true, prob_crack, bins)
    used = table[table["n"] > 0]
    n = used["n"].sum()
    return float((used["n"] / n * (used["accuracy"] - used["mean_confidence"]).abs()).sum()) if n else float("nan")


def binary_metrics(y_true: np.ndarray, y_pred: np.ndarray, prob_crack: np.ndarray) -> dict[str, Any]:
    """Accuracy (with Wilson CI), precision/recall/F1 for the crack class, ROC-AUC, ECE."""
    y_true, y_pred = np.asarray(y_true).astype(int), np.asarray(y_pred).astype(int)
    n = len(y_true)
    correct = int((y_true == y_pred).sum())
    tp = int(((y_pred == 1) & (y_true == 1)).sum())
    fp = int(((y_pred == 1) & (y_true == 0)).sum())
    fn = int(((y_pred == 0) & (y_true == 1)).sum())
    tn = n - tp - fp - fn
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    low, high = wilson_interval(correct, n)
    return {"accuracy": correct / n if n else float("nan"), "n": n, "errors": n - correct,
            "ci95_low": low, "ci95_high": high, "precision": precision, "recall": recall, "f1": f1,
            "roc_auc": roc_auc(y_true, prob_crack), "ece": expected_calibration_error(y_true, prob_crack),
            "tp": tp, "fp": fp, "fn": fn, "tn": tn}


def format_accuracy(acc: float, n: int, low: float, high: float) -> str:
    """The one way the project prints an accuracy: value, n and 95 % interval."""
    return f"{100 * acc:.2f} % (n={n}, 95 % CI {100 * low:.2f}-{100 * high:.2f} %)"


def f1_bootstrap_interval(y_true: np.ndarray, y_pred: np.ndarray, groups: np.ndarray | None = None,
                          n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile 95 % interval of the crack-class F1 from a seeded bootstrap. With `groups`
    (e.g. the photo a window was cut from) whole groups are resampled, as the windows of one
    photo are not independent; without, single images."""
    y_true, y_pred = np.asarray(y_true).astype(int), np.asarray(y_pred).astype(int)
    if len(y_true) == 0:
        return (0.0, 1.0)
    group_ids = pd.factorize(pd.Series(groups if groups is not None else np.arange(len(y_true))))[0]
    n_groups = group_ids.max() + 1
    # per group: true positives, and the 2TP + FP + FN denominator's parts
    tp = np.bincount(group_ids, weights=(y_pred == 1) & (y_true == 1), minlength=n_groups)
    pred_pos = np.bincount(group_ids, weights=y_pred == 1, minlength=n_groups)
    true_pos = np.bincount(group_ids, weights=y_true == 1, minlength=n_groups)
    counts = np.random.default_rng(seed).multinomial(n_groups, np.full(n_groups, 1 / n_groups), size=n_boot)
    denom = counts @ pred_pos + counts @ true_pos
    f1 = np.divide(2 * (counts @ tp), denom, out=np.zeros(n_boot), where=denom > 0)
    low, high = np.quantile(f1, [0.025, 0.975])
    return (float(low), float(high))


def metrics_with_intervals(y_true: np.ndarray, y_pred: np.ndarray, prob_crack: np.ndarray,
                           groups: np.ndarray | None = None, seed: int = 0) -> dict[str, Any]:
    """binary_metrics plus a 95 % interval for each of accuracy, precision and recall (Wilson,
    over the images each is a share of) and F1 (f1_bootstrap_interval)."""
    m = binary_metrics(y_true, y_pred, prob_crack)
    return {**m, "precision_ci95": list(wilson_interval(m["tp"], m["tp"] + m["fp"])),
            "recall_ci95": list(wilson_interval(m["tp"], m["tp"] + m["fn"])),
            "accuracy_ci95": [m["ci95_low"], m["ci95_high"]],
            "f1_ci95": list(f1_bootstrap_interval(y_true, y_pred, groups, seed=seed))}


def paired_difference(correct_a: np.ndarray, correct_b: np.ndarray, groups: np.ndarray | None = None,
                      n_boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Accuracy of A minus accuracy of B on the SAME images, with a paired percentile 95 %
    bootstrap interval: each resample draws images (or whole `groups`, e.g. the windows of one
    photo) and scores both models on that one draw, so what the two share cancels out and only
    their disagreements make the interval's width. `correct_a/b`: per image, right (1) or not (0)."""
    a, b = np.asarray(correct_a, dtype=float), np.asarray(correct_b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired_difference needs the same images for both models ({len(a)} vs {len(b)})")
    n = len(a)
    if n == 0:
        return {"difference": float("nan"), "ci95_low": float("nan"), "ci95_high": float("nan"), "n": 0, "n_groups": 0,
                "a_only_right": 0, "b_only_right": 0}
    group_ids = pd.factorize(pd.Series(groups if groups is not None else np.arange(n)))[0]
    n_groups = int(group_ids.max()) + 1
    diff = np.bincount(group_ids, weights=a - b, minlength=n_groups)
    size = np.bincount(group_ids, minlength=n_groups).astype(float)
    counts = np.random.default_rng(seed).multinomial(n_groups, np.full(n_groups, 1 / n_groups), size=n_boot)
    boot = (counts @ diff) / (counts @ size)  # a ratio estimate: groups of unequal size weigh by their images
    low, high = np.quantile(boot, [0.025, 0.975])
    return {"difference": float((a - b).mean()), "ci95_low": float(low), "ci95_high": float(high), "n": n,
            "n_groups": n_groups, "a_only_right": int(((a == 1) & (b == 0)).sum()),
            "b_only_right": int(((a == 0) & (b == 1)).sum())}
