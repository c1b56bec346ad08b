"""Temperature scaling for the 2-class model, fitted on the validation split.

With two classes the softmax probability of a crack is sigmoid(z1 - z0), so logit(p) is the
logit difference and scaling the logits by 1/T gives p' = sigmoid(logit(p) / T). T > 1
softens over-confident predictions; the predicted class never changes."""
from __future__ import annotations

import numpy as np
import torch

EPS = 1e-7


def _logit(prob: np.ndarray) -> torch.Tensor:
    p = torch.as_tensor(np.clip(np.asarray(prob, dtype=np.float64), EPS, 1 - EPS))
    return torch.log(p) - torch.log1p(-p)


def fit_temperature(y_true: np.ndarray, prob_crack: np.ndarray) -> float:
    """T minimising the negative log-likelihood of y_true under sigmoid(logit(p) / T). With no
    misclassified sample the likelihood keeps rising as T -> 0 (ever more confident), so there
    is nothing to fit: T = 1, the model's probabilities unchanged."""
    z = _logit(prob_crack)
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


def apply_temperature(prob_crack: np.ndarray, temperature: float) -> np.ndarray:
    return torch.sigmoid(_logit(prob_crack) / temperature).numpy()
