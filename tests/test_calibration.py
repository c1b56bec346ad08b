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
    t = fit_temperature(y, overconfident)
    assert t == pytest.approx(3.0, rel=0.1)
    fixed = apply_temperature(overconfident, t)
    assert expected_calibration_error(y, fixed) < expected_calibration_error(y, overconfident) / 3
    assert ((fixed >= 0.5) == (overconfident >= 0.5)).all()  # predictions unchanged
