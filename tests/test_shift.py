"""The shift suite: each shift is the identity at severity 0 and moves pixels the documented way
as severity grows; the suite's clean accuracy is evaluate()'s; results, report and CLIs."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from crackcore.config import ConfigError, StudyConfig, TrainConfig
from crackcore.data import BatchLoader, prepare_data
from crackcore.model import build_model
from crackcore.shift import SEVERITIES, SHIFTS, apply_shift, capped_rows, parse_shifts
from crackcore.train import evaluate, evaluate_shifts, fit

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def scene() -> torch.Tensor:
    """Two 64-px uint8 images: mid-grey concrete texture with a dark vertical crack 8 px wide in the middle."""
    g = torch.Generator().manual_seed(0)
    x = (120 + 25 * torch.randn(2, 3, 64, 64, generator=g)).clamp(0, 255)
    x[:, 0] += 10  # a little colour, so desaturation has something to remove
    x[..., 28:36] = 30
    return x.round().to(torch.uint8)


def high_frequency(x: torch.Tensor) -> float:
    """Mean absolute difference between horizontal neighbours: fine detail and noise."""
    x = x.float()
    return float((x[..., 1:] - x[..., :-1]).abs().mean())


def crack_width(x: torch.Tensor) -> int:
    """Width of the dark run through the centre column, averaged over rows and images."""
    dark = (x.float().mean(1) < 75)  # [B,H,W]
    centre = x.shape[-1] // 2
    widths = []
    for row in dark.reshape(-1, x.shape[-1]):
        left = right = centre
        while left > 0 and row[left - 1]:
            left -= 1
        while right < len(row) - 1 and row[right + 1]:
            right += 1
        widths.append(right - left + 1 if row[centre] else 0)
    return round(float(np.mean(widths)))


MEASURES = {  # shift -> (measure, +1 if it grows with severity, -1 if it falls)
    "scale_down": (crack_width, -1),
    "gaussian_blur": (high_frequency, -1),
    "motion_blur": (high_frequency, -1),
    "gaussian_noise": (high_frequency, +1),
    "brightness": (lambda x: float(x.float().mean()), -1),
    "contrast": (lambda x: float(x.float().std()), -1),
    "colour_cast": (lambda x: float((x[:, 0].float() - x[:, 2].float()).mean()), +1),
    "grayscale": (lambda x: float((x[:, 0].float() - x[:, 1].float()).abs().mean()), -1),
    "jpeg": (None, +1),  # the bytes change, the more the lower the quality: distortion from the original
}


@pytest.mark.parametrize("name", list(SHIFTS))
def test_severity_zero_is_identity_and_higher_severities_move_pixels_the_documented_way(name: str,
                                                                                       scene: torch.Tensor) -> None:
    assert set(MEASURES) == set(SHIFTS)
    assert torch.equal(apply_shift(scene, name, 0), scene)
    out = [apply_shift(scene, name, s, seed=3) for s in (0, *SEVERITIES)]
    for o in out:
        assert o.dtype == torch.uint8 and o.shape == scene.shape
    assert torch.equal(apply_shift(scene, name, 2, seed=3), out[2])  # seeded: the same every time
    distortion = [float((o.float() - scene.float()).pow(2).mean()) for o in out]
    assert distortion[0] == 0 and all(d > 0 for d in distortion[1:]), (name, distortion)
    measure, sign = MEASURES[name]
    values = distortion if measure is None else [sign * measure(o) for o in out]
    assert all(a < b for a, b in zip(values, values[1:])), (name, values)
    if name == "scale_down":  # the 8-px crack at zoom 0.75 / 0.5 / 0.35: 6, 4, 2.8 px (within a pixel)
        zooms = (1.0, *SHIFTS[name].levels)
        assert all(abs(crack_width(o) - 8 * z) <= 1 for o, z in zip(out, zooms)), [crack_width(o) for o in out]


def test_unknown_shift_names_are_one_clear_error(capsys) -> None:
    assert parse_shifts(None) == list(SHIFTS) == parse_shifts("all")
    assert parse_shifts("jpeg, scale_down") == ["scale_down", "jpeg"]
    with pytest.raises(ConfigError, match="unknown shift\\(s\\) 'blur'; use 'all' or some of scale_down"):
        parse_shifts("jpeg,blur")
    with pytest.raises(ConfigError, match="unknown shift"):
        apply_shift(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), "fog", 1)
    # the CLI says so in one line, before it looks at the model or the inputs
    from crackcore.cli import run_main
    from crackcore.predict import main

    assert run_main(main, ["--model", "missing.pt", "x", "--out", "o", "--shifts", "jpeg,fog"]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: unknown shift(s) 'fog'; use 'all' or some of {', '.join(SHIFTS)}"]


def test_capped_rows_are_stratified_seeded_and_all_when_few() -> None:
    labels = np.array([0] * 300 + [1] * 100)
    rows = capped_rows(labels, 40, seed=1)
    assert len(rows) == 40 and (labels[rows] == 1).sum() == 10
    assert np.array_equal(rows, capped_rows(labels, 40, seed=1)) and not np.array_equal(rows, capped_rows(labels, 40, 2))
    assert np.array_equal(capped_rows(labels, 1000), np.arange(400)) and np.array_equal(capped_rows(labels, None),
                                                                                         np.arange(400))


@pytest.fixture(scope="module")
def tiny(crack_data: Path):
    # one torch thread: on a busy 2-core machine two threads waiting on each other run 10x slower
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cfg = TrainConfig(data=str(crack_data), image_size=32, subset=60, epochs=1, batch_size=16, weights="random",
                      shift_max_images=None, val_shift=True, num_threads=1)
    yield cfg, prepare_data(cfg, progress=False)
    torch.set_num_threads(threads)


def test_suite_clean_accuracy_is_evaluates_and_cells_carry_n_and_ci(tiny) -> None:
    cfg, data = tiny
    torch.manual_seed(0)
    model, _ = build_model(0, "random")
    rows = data.indices("test")
    ev = evaluate(model, BatchLoader(data, "test", 7, torch.device("cpu"), shuffle=False), data)
    suite = evaluate_shifts(model, data, rows, torch.device("cpu"), max_images=None)
    assert suite["clean"]["n"] == ev["n"] == len(rows)
    assert suite["clean"]["accuracy"] == ev["accuracy"]
    assert (suite["clean"]["ci95_low"], suite["clean"]["ci95_high"]) == (ev["ci95_low"], ev["ci95_high"])
    assert [(c["shift"], c["severity"]) for c in suite["cells"]] == [(n, s) for n in SHIFTS for s in SEVERITIES]
    for c in suite["cells"]:
        assert c["n"] == len(rows) and c["ci95_low"] <= c["accuracy"] <= c["ci95_high"]
    assert suite["mean_accuracy"] == pytest.approx(np.mean([c["accuracy"] for c in suite["cells"]]))
    # a cap scores the same stratified subset in every cell
    assert len(rows) >= 10
    capped = evaluate_shifts(model, data, rows, torch.device("cpu"), max_images=7, cells=[("jpeg", 1)])
    assert capped["n_per_cell"] == capped["clean"]["n"] == capped["cells"][0]["n"] == 7 and capped["of_n"] == len(rows)


def test_fit_writes_the_suite_and_val_shift_acc_and_the_flag_skips_it(tiny, tmp_path: Path) -> None:
    from crackcore.outputs import write_run_outputs
    from crackcore.results import load_study

    cfg, data = tiny
    result = fit(cfg, data, evaluate_test=True, log=None)
    suite = result.shift
    assert suite["clean"]["accuracy"] == result.test["accuracy"] and len(suite["cells"]) == 27
    h = result.history.iloc[-1]  # the mean of clean val accuracy and the 4 cheap shifts, every epoch
    assert 0 <= h["val_shift_acc"] <= 1 and h["val_shift_seconds"] > 0
    metrics = write_run_outputs(tmp_path, result, data, cfg)
    assert json.loads((tmp_path / "final_metrics.json").read_text())["shift"]["cells"] == metrics["shift"]["cells"]
    (tmp_path / "study_config.json").write_text("{}")  # enough for load_study to read it as a study
    table = load_study(tmp_path).shift
    assert list(table["shift"][:2]) == ["clean", "scale_down"] and len(table) == 28
    assert table.loc[0, "accuracy"] == result.test["accuracy"]
    skipped = fit(cfg.replace(shift_suite=False, val_shift=False), data, evaluate_test=True, log=None)
    assert skipped.shift is None and "val_shift_acc" not in skipped.history
    from crackcore.fit import build_parser

    assert build_parser().parse_args(["--no-shift-suite"]).shift_suite is False
    assert build_parser().parse_args([]).shift_suite is True


def test_study_metric_val_shift_acc_scores_val_under_shifts() -> None:
    cfg = StudyConfig(metric="val_shift_acc")
    assert cfg.train.val_shift and not StudyConfig().train.val_shift
    with pytest.raises(ConfigError, match="metric='val_loss' is unknown; use one of val_acc, val_shift_acc"):
        StudyConfig(metric="val_loss")


def test_report_draws_the_shift_heat_map(tmp_path: Path) -> None:
    from crackcore.results import Study
    from tune.report import fig_shift_heatmap

    cells = [{"shift": n, "severity": s, "level": SHIFTS[n].levels[s - 1], "parameter": SHIFTS[n].parameter, "n": 50,
              "accuracy": 0.9 - 0.1 * s, "ci95_low": 0.7 - 0.1 * s, "ci95_high": 0.95 - 0.1 * s}
             for n in SHIFTS for s in SEVERITIES]
    study = Study(path=tmp_path, final_metrics={"shift": {"clean": {"n": 50, "accuracy": 0.94, "ci95_low": 0.84,
                                                                      "ci95_high": 0.98}, "cells": cells}})
    assert "Wilson 95 %" in fig_shift_heatmap(study, tmp_path / "h.png")
    assert (tmp_path / "h.png").stat().st_size > 10_000


def test_predict_shifts_scores_a_labelled_folder(crack_data: Path, tmp_path: Path, capsys) -> None:
    from crackcore.model import CrackResNet
    from crackcore.outputs import MODEL_FORMAT, save_torch
    from crackcore.predict import main

    folder = tmp_path / "site"
    for cls in ("Positive", "Negative"):
        (folder / cls).mkdir(parents=True)
        for f in sorted((crack_data / cls).glob("*.jpg"))[:6]:
            shutil.copy(f, folder / cls / f.name)
    save_torch({"format": MODEL_FORMAT, "state_dict": CrackResNet(freeze_depth=0).state_dict(), "image_size": 32,
                "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}, tmp_path / "model.pt")
    assert main([str(folder), "--model", str(tmp_path / "model.pt"), "--out", str(tmp_path / "site"), "--shifts",
                 "jpeg,brightness", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "shift suite on 12 labelled images" in printed and "brightness" in printed and "motion_blur" not in printed
    table = pd.read_parquet(tmp_path / "site_shifts.parquet")
    assert list(table["shift"]) == ["clean", "jpeg", "jpeg", "jpeg", "brightness", "brightness", "brightness"]
    assert (table["n"] == 12).all()


def test_the_trial_to_retrain_is_chosen_by_the_study_metric() -> None:
    from tune.trials import pick_best

    table = pd.DataFrame({"trial_id": ["a", "b"], "status": ["COMPLETE", "COMPLETE"], "epochs": [2, 2],
                          "last_val_acc": [0.95, 0.90], "last_val_shift_acc": [0.70, 0.85], "last_val_loss": [0.1, 0.2]})
    assert pick_best(table)["trial_id"] == "a" and pick_best(table, "val_shift_acc")["trial_id"] == "b"


def test_the_study_cli_skips_the_suite_with_no_shift_suite() -> None:
    from tune.settings import parse_flags

    assert parse_flags(["--no-shift-suite"])[1]["train.shift_suite"] is False
    assert parse_flags([])[1]["train.shift_suite"] is None  # the experiment file's value (default: run it)
