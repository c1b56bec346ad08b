"""Several data sources: photo groups, held-out sources for selection and final evaluation,
external evaluation and leave-one-source-out, on the real shared sets (small subsets, 32 px)."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from conftest import TEST_DATA_KIND
from crackcore.cli import run_main
from crackcore.config import TrainConfig
from crackcore.data import BatchLoader, prepare_data
from crackcore.fit import main as fit_main
from crackcore.predict import main as predict_main
from crackcore.train import fit

TINY = {"image_size": 32, "weights": "random", "epochs": 1, "batch_size": 32}


def photo(path: str) -> str:
    return Path(path).name.split("__")[0]


def test_one_source_splits_as_before(crack_data: Path) -> None:
    t = prepare_data(TrainConfig(data=str(crack_data), image_size=32, subset=100), progress=False).split_table()
    assert set(t["source"]) == {crack_data.name}
    if TEST_DATA_KIND == "shared real sample":  # recorded with the code before sources existed (88b8a85)
        listing = "\n".join(f"{p}:{s}" for p, s in zip(t["path"], t["split"]))
        assert hashlib.sha256(listing.encode()).hexdigest() == \
            "5827a2ed9cf411fe8f76c5afc7630207a4c8c56eea9e16682a6d43262bd01096"


@pytest.mark.parametrize("strategy", ["random", "grouped"])
def test_group_by_keeps_every_photo_in_one_split(walls: dict[str, Path], strategy: str) -> None:
    sources = {"masonry": str(walls["masonry"]), "quay": str(walls["quay-wall"])}
    plain = prepare_data(TrainConfig(data=sources, image_size=32, split_strategy=strategy), progress=False).split_table()
    straddling = plain.assign(photo=plain["source"] + plain["path"].map(photo)).groupby("photo")["split"].nunique()
    assert (straddling > 1).any(), "without --group-by windows of one photo land in several splits"
    t = prepare_data(TrainConfig(data=sources, image_size=32, split_strategy=strategy, group_by=r"^(.*)__"),
                     progress=False).split_table()
    assert t.assign(photo=t["source"] + t["path"].map(photo)).groupby("photo")["split"].nunique().max() == 1
    assert t.groupby("group")["split"].nunique().max() == 1 and set(t["split"]) == {"train", "val", "test"}


def test_held_out_sources_never_reach_a_training_batch(crack_data: Path, walls: dict[str, Path], monkeypatch) -> None:
    cfg = TrainConfig(data={"concrete": str(crack_data), "masonry": str(walls["masonry"]), "quay": str(walls["quay-wall"])},
                      val_source="masonry", test_source="quay", external={"again": str(walls["masonry"])}, subset=30,
                      group_by=r"^(.*)__", **TINY)
    data = prepare_data(cfg, progress=False)
    trained, iterate = [], BatchLoader.__iter__

    def recording(self):  # the rows of every batch a training (shuffled) loader hands out
        for x, y, rows in iterate(self):
            if self.shuffle:
                trained.extend(rows.tolist())
            yield x, y, rows

    monkeypatch.setattr(BatchLoader, "__iter__", recording)
    result = fit(cfg, data, evaluate_test=True, log=None)
    assert trained and set(data.samples.loc[trained, "source"]) == {"concrete"}
    assert set(data.samples.loc[data.samples["source"] != "concrete", "split"]) == {"val", "test", "external"}
    # selection is scored on the val source alone; the in-domain val rows give a second accuracy
    assert set(result.val["predictions"]["source"]) == {"masonry"} and result.val["n"] == 60
    h = result.history.iloc[-1]
    assert h["val_acc"] == h["val_acc_masonry"] == result.val["accuracy"] and "val_acc_concrete" in h
    assert h["val_loss"] == result.val["loss"] and h["val_loss_domain"] > 0  # the in-domain loss beside it (tune.curves)
    assert set(result.test["predictions"]["source"]) == {"concrete"}
    assert set(result.held_out) == {"masonry", "quay"} and result.held_out["quay"]["n"] == 60
    assert result.external["again"]["n"] == (data.samples["source"] == "again").sum() > 60  # --eval is scored whole


def test_eval_equals_predict_and_skips_unreadable_images(crack_data: Path, walls: dict[str, Path], tmp_path: Path) -> None:
    site = tmp_path / "site"
    shutil.copytree(walls["quay-wall"], site)
    (site / "Negative" / "broken.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "run"
    assert run_main(fit_main, ["--data", str(crack_data), "--eval", f"quay={site}", "--subset", "40", "--epochs", "1",
                               "--image-size", "32", "--weights", "random", "--out", str(out)]) == 0
    metrics = json.loads((out / "final_metrics.json").read_text())
    ext = metrics["external"]["quay"]
    n_site = sum(1 for p in site.rglob("*.jpg")) - 1
    assert ext["n"] == n_site and {"accuracy", "ci95_low", "ci95_high", "precision", "recall", "f1", "roc_auc",
                                   "ece"} <= set(ext)
    ours = pd.read_parquet(out / "predictions.parquet").query("source == 'quay'").set_index("path")
    assert run_main(predict_main, ["--model", str(out / "model.pt"), str(site), "--out", str(tmp_path / "pred")]) == 0
    theirs = pd.read_parquet(tmp_path / "pred.parquet")
    theirs = theirs.assign(path=[Path(p).relative_to(site).as_posix() for p in theirs["path"]]).set_index("path")
    assert len(theirs) == n_site and (theirs["pred_label"] == ours.loc[theirs.index, "pred_label"]).all()
    assert ext["accuracy"] == pytest.approx((theirs["pred_label"] == theirs["true_label"]).mean())
    errors = pd.read_parquet(out / "errors.parquet")
    assert set(errors["source"]) <= {crack_data.name, "quay"} and \
        (errors["source"] == "quay").sum() == n_site - round(ext["accuracy"] * n_site)


def test_leave_one_out_writes_one_row_per_source(crack_data: Path, walls: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "loso"
    assert run_main(fit_main, ["--data", f"concrete={crack_data}", "--data", f"masonry={walls['masonry']}",
                               "--group-by", "^(.*)__", "--subset", "30", "--epochs", "1", "--image-size", "32",
                               "--weights", "random", "--leave-one-out", "--out", str(out)]) == 0
    loso = pd.read_parquet(out / "loso.parquet")
    assert loso["held_out_source"].tolist() == ["concrete", "masonry"] and (loso["n"] == 60).all()
    assert ((loso["ci95_low"] <= loso["accuracy"]) & (loso["accuracy"] <= loso["ci95_high"])).all()


@pytest.mark.parametrize("make_args, message", [
    (lambda c, w, t: ["--data", f"a={c}", "--data", f"a={w['masonry']}"], "data source name 'a' is given twice"),
    (lambda c, w, t: ["--data", "a=", "--data", f"b={c}"], "has no path; write NAME=PATH"),
    (lambda c, w, t: ["--data", f"a={c}", "--val-source", "b"], "val_source='b' names no data source"),
    (lambda c, w, t: ["--data", f"a={c}", "--data", f"b={w['masonry']}", "--val-source", "b", "--test-source", "b"],
     "val_source and test_source are both 'b'"),
    (lambda c, w, t: ["--data", str(c), "--test-source", c.name], "nothing is left to train on"),
    (lambda c, w, t: ["--data", str(t / "one-class")], "has no no-crack class folder"),
    (lambda c, w, t: ["--data", str(t)], "no class folders in"),
    (lambda c, w, t: ["--data", str(c), "--group-by", "(unclosed"], "is not a regular expression"),
    (lambda c, w, t: ["--data", str(c), "--group-by", "^(nothing-like-this)__"], "matches none of the"),
    (lambda c, w, t: ["--data", str(c), "--eval", f"site={t / 'nowhere'}"], "does not exist"),
])
def test_bad_sources_are_one_clear_line_and_write_nothing(make_args, message: str, crack_data: Path,
                                                          walls: dict[str, Path], tmp_path: Path, capsys) -> None:
    (tmp_path / "one-class" / "crack").mkdir(parents=True)
    shutil.copy(next((crack_data / "Positive").glob("*.jpg")), tmp_path / "one-class" / "crack")
    out = tmp_path / "out"
    args = [*make_args(crack_data, walls, tmp_path), "--subset", "20", "--epochs", "1", "--image-size", "32",
            "--weights", "random", "--out", str(out)]
    assert run_main(fit_main, args) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(err) == 1 and message in err[0], err
    assert not out.exists()
