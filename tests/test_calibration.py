"""Temperature scaling recovers a known temperature and lowers calibration error."""
from __future__ import annotations

import numpy as np
import pytest

from crackcore.calibration import apply_temperature, fit_temperature
from crackcore.metrics import expected_calibration_error


def test_recovers_known_temperature_and_improves_ece() -> None:
    rng = np.random.default_rng(0)
    z = rng.normal(0, 2, 20000)
    y = (rng.random(20000) < 1 / (1 + np.exp(-z))).astype(int)
    overconfident = 1 / (1 + np.exp(-3 * z))  # logits 3x too large
    t = fit_temperature(y, 3 * z)
    assert t == pytest.approx(3.0, rel=0.1)
    fixed = apply_temperature(3 * z, t)
    assert expected_calibration_error(y, fixed) < expected_calibration_error(y, overconfident) / 3
    assert ((fixed >= 0.5) == (overconfident >= 0.5)).all()  # predictions unchanged


def test_no_misclassified_sample_leaves_the_model_unchanged() -> None:
    y = np.array([0, 0, 1, 1, 1])
    logit = np.array([-1.4, -0.4, 0.4, 2.2, 4.6])  # all right: the NLL has no minimum, T would run to 0
    assert fit_temperature(y, logit) == 1.0
    assert fit_temperature(y, np.array([-1.4, 0.4, 0.4, 2.2, 4.6])) != 1.0  # one error: a real fit


def test_saturated_confidence_still_recovers_the_temperature() -> None:
    # a fine-tuned model's |logit| often passes 16, where a float32 probability is exactly 0 or 1:
    # fitting on logits (not probabilities) still finds T
    rng = np.random.default_rng(1)
    z = rng.normal(0, 10, 20000)
    y = (rng.random(20000) < 1 / (1 + np.exp(-z))).astype(int)
    assert (np.abs(4 * z) > 16).mean() > 0.5
    assert fit_temperature(y, 4 * z) == pytest.approx(4.0, rel=0.05)
