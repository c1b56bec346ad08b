"""tune.curves without recording (the shipped table is its end-to-end run): the grid of settings
and the bad flags that fail before Ray starts."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from crackcore.cli import run_main
from crackcore.config import AUGMENT_POLICIES, StudyConfig
from tune.curves import main, settings_grid


def test_the_grid_is_log_spaced_lr_by_every_policy_and_a_seeded_draw_when_smaller() -> None:
    cfg = StudyConfig()
    grid = settings_grid(cfg, 32, [0], seed=0)
    lrs = sorted({g["lr"] for g in grid})
    assert len(grid) == 32 and len(lrs) == 4 and {g["augment_policy"] for g in grid} == set(AUGMENT_POLICIES)
    assert np.allclose(np.diff(np.log10(lrs)), 1.0) and lrs[0] == pytest.approx(1e-4) and lrs[-1] == pytest.approx(0.1)
    drawn = settings_grid(cfg, 20, [0, 1], seed=3)
    assert len(drawn) == 20 and drawn == settings_grid(cfg, 20, [0, 1], seed=3) != settings_grid(cfg, 20, [0, 1], seed=4)
    assert len({tuple(g.values()) for g in drawn}) == 20 and {g["freeze_depth"] for g in drawn} == {0, 1}


@pytest.mark.parametrize("flags, line", [
    (["--num-settings", "0", "--max-epochs", "2", "--out", "x.parquet"], "--num-settings must be >= 1"),
    (["--num-settings", "4", "--max-epochs", "2", "--out", "x.csv"], "must end in .parquet"),
    (["--num-settings", "4", "--max-epochs", "2", "--out", "x.parquet", "--freeze-depths", "0,a"], "comma-separated"),
    (["--num-settings", "4", "--max-epochs", "2", "--out", "x.parquet", "--val-source", "masonry"],
     "val_source='masonry' names no data source"),
])
def test_bad_flags_are_one_line_before_ray_starts(tmp_path: Path, capsys: pytest.CaptureFixture, flags: list[str],
                                                  line: str) -> None:
    assert run_main(main, flags) != 0
    err = capsys.readouterr().err.strip()
    assert line in err and len(err.splitlines()) == 1, err
