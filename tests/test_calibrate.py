"""Calibration for a new site: the threshold rule on hand-made scores, an end-to-end
crackcore.calibrate run on a real wall folder, predict applying the calibrated threshold, the
calibration beside a study in load_study and the report, and each bad input."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from crackcore.calibrate import main as calibrate_main
from crackcore.calibration import fit_threshold, threshold_candidates
from crackcore.cli import run_main
from crackcore.config import TrainConfig
from crackcore.data import prepare_data
from crackcore.metrics import f1_bootstrap_interval
from crackcore.outputs import write_run_outputs
from crackcore.predict import main as predict_main
from crackcore.results import load_study
from crackcore.train import fit


def f1_at(y: np.ndarray, prob: np.ndarray, t: float) -> float:
    pred = prob >= t
    tp = (pred & (y == 1)).sum()
    return 2 * tp / (pred.sum() + (y == 1).sum())


def test_threshold_maximises_f1_on_a_hand_made_table() -> None:
    y = np.array([0, 0, 0, 1, 0, 1, 1, 1])
    prob = np.array([0.05, 0.2, 0.3, 0.35, 0.4, 0.6, 0.7, 0.9])
    # by hand: cutting below 0.35 keeps every crack and one false alarm, F1 = 8/9, the best
    assert fit_threshold(y, prob) == pytest.approx(0.325)
    assert f1_at(y, prob, 0.325) == pytest.approx(8 / 9)
    grid = np.linspace(0, 1, 1001)
    assert max(f1_at(y, prob, t) for t in grid) == pytest.approx(8 / 9)
    assert threshold_candidates(prob)[0] == pytest.approx(0.025)  # everything a crack is a candidate too


def test_equal_f1_goes_to_the_threshold_closest_to_half() -> None:
    y = np.array([1, 0, 0, 1])
    prob = np.array([0.1, 0.3, 0.6, 0.8])
    # all-crack (0.05) and 'only the 0.8' (0.7) both give F1 2/3
    assert f1_at(y, prob, 0.05) == pytest.approx(2 / 3) == f1_at(y, prob, 0.7)
    assert fit_threshold(y, prob) == pytest.approx(0.7)


def test_one_class_cannot_fit_a_threshold() -> None:
    with pytest.raises(ValueError, match="both classes"):
        fit_threshold(np.array([1, 1, 1]), np.array([0.2, 0.5, 0.9]))


def test_f1_bootstrap_resamples_whole_photos() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    pred = np.where(rng.random(400) < 0.8, y, 1 - y)
    single = f1_bootstrap_interval(y, pred, seed=1)
    assert single == f1_bootstrap_interval(y, pred, seed=1)  # seeded
    assert single[0] < 2 * ((pred == 1) & (y == 1)).sum() / ((pred == 1).sum() + (y == 1).sum()) < single[1]
    # 40 photos of 10 identical windows: 40 independent units, not 400, so a wider interval
    photos = np.repeat(np.arange(40), 10)
    yp, pp = y[photos * 10], pred[photos * 10]
    grouped = f1_bootstrap_interval(yp, pp, groups=photos, seed=1)
    naive = f1_bootstrap_interval(yp, pp, seed=1)
    assert grouped[1] - grouped[0] > 1.8 * (naive[1] - naive[0])


@pytest.fixture(scope="module")
def tiny_model(crack_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = TrainConfig(data=str(crack_data), image_size=32, subset=120, epochs=2, lr=0.05, batch_size=64,
                      weights="random", augment_policy="flip")
    data = prepare_data(cfg, progress=False)
    result = fit(cfg, data, evaluate_test=True, log=None)
    out = tmp_path_factory.mktemp("tiny-model")
    write_run_outputs(out, result, data, cfg)
    return out / "model.pt"


@pytest.fixture(scope="module")
def calibrated(tiny_model: Path, walls: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    study = tmp_path_factory.mktemp("study")
    (study / "study_config.json").write_text("{}")  # enough of a study for load_study
    out = study / "calibration" / "masonry"
    assert calibrate_main(["--model", str(tiny_model), "--labelled", str(walls["masonry"]), "--k", "8",
                           "--out", str(out), "--seed", "3", "--fine-tune-head", "2", "--device", "cpu"]) == 0
    return out


def test_calibrate_end_to_end(calibrated: Path, walls: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    record = json.loads((calibrated / "calibration.json").read_text())
    assert record["format"] == "crackcore-calibration" and record["k"] == 8 and record["seed"] == 3
    assert set(record["metrics"]) == {"before", "after", "head refit"}
    assert record["n_fit"] + record["n_rest"] + record["n_left_out"] == record["n_site"]
    preds = pd.read_parquet(calibrated / "predictions.parquet")
    fit_rows, rest = preds[preds["role"] == "fit"], preds[preds["role"] == "eval"]
    assert len(fit_rows) == 8 and fit_rows["label"].value_counts().min() >= 2
    assert not set(fit_rows["group"]) & set(rest["group"])  # no photo on both sides
    assert fit_rows["group"].nunique() == 8  # one window per photo while photos last
    for column, key in (("after", "prob_after"), ("head refit", "prob_head_refit")):
        m = record["metrics"][column]
        # the stored threshold is the rule's on the drawn k, and the figures are on the rest
        assert m["threshold"] == pytest.approx(fit_threshold(fit_rows["label"], fit_rows[key]))
        pred = rest[key] >= m["threshold"]
        assert m["n"] == len(rest) and m["accuracy"] == pytest.approx((pred == rest["label"].astype(bool)).mean())
        for name in ("accuracy", "precision", "recall", "f1"):
            low, high = m[f"{name}_ci95"]
            assert low <= m[name] <= high
    before = record["metrics"]["before"]
    assert before["threshold"] == 0.5
    payload = torch.load(calibrated / "model.pt", weights_only=True)
    assert payload["threshold"] == record["metrics"]["after"]["threshold"]
    assert payload["temperature"] == record["metrics"]["after"]["temperature"]
    assert payload["calibration"]["k"] == 8 and payload["calibration"]["site"] == str(walls["masonry"].resolve())
    head = torch.load(calibrated / "model_head.pt", weights_only=True)
    assert not torch.equal(head["state_dict"]["fc.weight"], payload["state_dict"]["fc.weight"])
    assert torch.equal(head["state_dict"]["layer4.1.conv2.weight"], payload["state_dict"]["layer4.1.conv2.weight"])


def test_predict_applies_the_calibrated_threshold(calibrated: Path, walls: dict[str, Path], tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    site = tmp_path / "site"
    for cls in ("Positive", "Negative"):
        (site / cls).mkdir(parents=True)
        for f in sorted((walls["masonry"] / cls).glob("*.jpg"))[:30]:
            shutil.copy(f, site / cls / f.name)
    payload = torch.load(calibrated / "model.pt", weights_only=True)
    assert predict_main(["--model", str(calibrated / "model.pt"), str(site), "--out", str(tmp_path / "a"),
                         "--device", "cpu"]) == 0
    assert f"decision threshold {payload['threshold']:.3g} (calibrated on masonry" in capsys.readouterr().out
    df = pd.read_parquet(tmp_path / "a.parquet")
    assert (df["pred_label"] == (df["prob_crack"] >= payload["threshold"]).astype(int)).all()
    # a threshold between the scores moves labels: the median makes half of them cracks
    median = float(np.median(df["prob_crack"]))
    torch.save({**payload, "threshold": median}, tmp_path / "median.pt")
    assert predict_main(["--model", str(tmp_path / "median.pt"), str(site), "--out", str(tmp_path / "b"),
                         "--device", "cpu"]) == 0
    moved = pd.read_parquet(tmp_path / "b.parquet")
    assert (moved["pred_label"] == (moved["prob_crack"] >= median).astype(int)).all()
    assert moved["pred_label"].sum() == (df["prob_crack"] >= median).sum() >= len(df) // 2


def test_load_study_and_report_show_the_calibration(calibrated: Path) -> None:
    from tune.report import calibration_section

    s = load_study(calibrated.parent.parent)
    assert list(s.calibration["model"]) == ["before", "after", "head refit"]
    assert set(s.calibration["site"]) == {"masonry"}
    assert {"f1_low", "f1_high", "accuracy_low", "threshold", "temperature", "n"} <= set(s.calibration)
    md = "\n".join(calibration_section(s))
    assert "## Calibration for new sites" in md and md.count("| masonry |") == 3


def test_a_calibration_replaces_an_earlier_one(calibrated: Path, tiny_model: Path, crack_data: Path,
                                               tmp_path: Path) -> None:
    out = tmp_path / "again"
    shutil.copytree(calibrated, out)
    site = _site(tmp_path / "site", crack_data, 10, 10)
    assert calibrate_main(["--model", str(tiny_model), "--labelled", str(site), "--k", "6",
                           "--out", str(out), "--device", "cpu"]) == 0
    assert json.loads((out / "calibration.json").read_text())["k"] == 6 and not (out / "model_head.pt").exists()


def _site(root: Path, crack_data: Path, n_pos: int, n_neg: int) -> Path:
    for cls, n in (("Positive", n_pos), ("Negative", n_neg)):
        if n:
            (root / cls).mkdir(parents=True)
            for f in sorted((crack_data / cls).glob("*.jpg"))[:n]:
                shutil.copy(f, root / cls / f.name)
    return root


@pytest.mark.parametrize("case, needle", [
    ("k_larger_than_folder", "--k 40 is not smaller than the 20"),
    ("k_too_small", "fewer than 2 images per class"),
    ("too_few_of_a_class", "needs 2 crack images but the site has 1"),
    ("one_class", "Negative is missing"),
    ("not_our_model", "is not a crackcore model"),
    ("foreign_out", "was not written by crackcore.calibrate"),
])
def test_bad_input_is_one_line_and_writes_nothing(case: str, needle: str, tiny_model: Path, crack_data: Path,
                                                  tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    site, model, out, k = _site(tmp_path / "site", crack_data, 10, 10), tiny_model, tmp_path / "out", "6"
    if case == "k_larger_than_folder":
        k = "40"
    elif case == "k_too_small":
        k = "3"
    elif case == "too_few_of_a_class":
        site = _site(tmp_path / "lopsided", crack_data, 1, 12)
    elif case == "one_class":
        site = _site(tmp_path / "cracks-only", crack_data, 10, 0)
    elif case == "not_our_model":
        model = tmp_path / "other.pt"
        torch.save({"state_dict": {}}, model)
    elif case == "foreign_out":
        out.mkdir()
        (out / "notes.txt").write_text("keep me")
    rc = run_main(calibrate_main, ["--model", str(model), "--labelled", str(site), "--k", k, "--out", str(out),
                                   "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and len(err.splitlines()) == 1 and err.startswith("error:") and needle in err, err
    if case == "foreign_out":
        assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "keep me"
    else:
        assert not out.exists()
