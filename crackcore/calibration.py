"""Temperature scaling for the 2-class model, fitted on the validation split.

With two classes the softmax probability of a crack is sigmoid(z1 - z0), so scaling the
logits by 1/T gives p' = sigmoid((z1 - z0) / T). T > 1 softens over-confident predictions; the
predicted class never changes. Both functions take the logit difference itself (evaluate's
`logit_crack`), as crackcore.predict applies T: a float32 probability saturates at 1.0 once
|z1 - z0| passes about 16, which a fine-tuned model reaches, and would bias T low."""
from __future__ import annotations

import numpy as np
import torch


def fit_temperature(y_true: np.ndarray, logit_crack: np.ndarray) -> float:
    """T minimising the negative log-likelihood of y_true under sigmoid(logit_crack / T). With
    no misclassified sample the likelihood keeps rising as T -> 0 (ever more confident), so
    there is nothing to fit: T = 1, the model's probabilities unchanged."""
    z = torch.tensor(np.asarray(logit_crack, dtype=np.float64))
    y = torch.tensor(np.asarray(y_true, dtype=np.float64))  # a copy: the input may be a read-only view
    if bool(((z >= 0) == (y == 1)).all()):
        return 1.0
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z / log_t.exp(), y)
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_t.detach().exp().clamp(0.05, 20.0))


def apply_temperature(logit_crack: np.ndarray, temperature: float) -> np.ndarray:
    """prob_crack after temperature scaling."""
    return torch.sigmoid(torch.tensor(np.asarray(logit_crack, dtype=np.float64)) / temperature).numpy()


# The rule calibrate states in its --help, README and calibration.json.
THRESHOLD_RULE = ("maximise the crack-class F1 on the k labelled images (temperature-scaled probabilities); "
                  "candidates are the midpoints between adjacent distinct scores, and midway between 0 and the "
                  "lowest score (everything a crack); among equal F1 the candidate closest to 0.5 wins")


def threshold_candidates(prob_crack: np.ndarray) -> np.ndarray:
    """Every threshold that gives another labelling of these scores, one per gap (its midpoint):
    all cuts between adjacent distinct scores, and below the lowest (everything a crack). A cut
    above the highest score (nothing a crack) has F1 0 and is never a winner."""
    s = np.unique(np.asarray(prob_crack, dtype=np.float64))
    return np.r_[s[0] / 2, (s[:-1] + s[1:]) / 2]


def fit_threshold(y_true: np.ndarray, prob_crack: np.ndarray) -> float:
    """The decision threshold (label = crack when prob_crack >= it) of THRESHOLD_RULE. Raises
    ValueError when y_true holds one class: F1 cannot choose a threshold then, and a silent
    0.5 would pass for a fitted one."""
    y = np.asarray(y_true).astype(int)
    prob = np.asarray(prob_crack, dtype=np.float64)
    if len(np.unique(y)) < 2:
        raise ValueError(f"a threshold needs both classes among the labelled images; got only label {y[0] if len(y) else '-'}")
    cands = threshold_candidates(prob)
    pred = prob[None, :] >= cands[:, None]  # [candidates, images]
    tp = (pred & (y == 1)).sum(1)
    f1 = 2 * tp / (pred.sum(1) + (y == 1).sum())  # 2TP / (2TP + FP + FN); the denominator is > 0 as y has a crack
    best = np.flatnonzero(np.isclose(f1, f1.max(), rtol=0, atol=1e-12))
    return float(cands[best[np.argmin(np.abs(cands[best] - 0.5))]])
