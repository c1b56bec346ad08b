"""tune.replay on hand-made learning-curve tables whose answer is known, its bad input, and the
shipped CPU table's shape (tune.curves records it; tests do not record one again)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from crackcore.cli import run_main
from crackcore.exceptions import StudyFilesError
from tune.curves import CURVE_COLUMNS
from tune.replay import Curves, epochs_to_reach, main, median_ci, parse, replay_study, study_config, summarise
from tune.report import replay_section

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "experiments" / "curves" / "cpu-64px.parquet"
LRS = np.geomspace(1e-4, 1e-1, 8)
POLICIES = ["none", "flip", "color", "strong"]
BEST = (LRS[5], "color")


def dominated_table(epochs: int = 4) -> pd.DataFrame:
    """32 settings whose scores fall off smoothly, in log lr and by policy, from one setting that
    is the best at every epoch (as a searcher's model can learn); seconds vary per setting."""
    rng = np.random.default_rng(0)
    rows = []
    for k, lr in enumerate(LRS):
        for j, policy in enumerate(POLICIES):
            base = 0.95 - 0.04 * abs(k - 5) - 0.05 * abs(j - 2)
            for e in range(1, epochs + 1):
                rows.append({"lr": lr, "freeze_depth": 0, "augment_policy": policy, "epoch": e,
                             "val_acc": base - 0.1 / e, "val_loss": 1 - base, "seconds": 1 + rng.random(),
                             "val_acc_masonry": 0.5})
    return pd.DataFrame(rows)


def args(**kw) -> argparse.Namespace:
    a = argparse.Namespace(num_samples=16, budget=4, grace_period=1, reduction_factor=3, workers=2, repeats=4,
                           searcher_list=["tpe", "random"], scheduler_list=["asha", "fifo"])
    return argparse.Namespace(**{**vars(a), **kw})


@pytest.fixture(scope="module")
def replayed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tune.replay's CLI on the dominated table: tpe/random x asha/fifo, 16-trial studies, 4 repeats."""
    folder = tmp_path_factory.mktemp("replay")
    dominated_table().to_parquet(folder / "curves.parquet")
    assert main([str(folder / "curves.parquet"), "--num-samples", "16", "--repeats", "4", "--out", str(folder / "out")]) == 0
    return folder / "out"


def test_the_dominant_setting_is_found_and_the_outputs_say_so(replayed: Path) -> None:
    curves = Curves.from_table(dominated_table(), "val_acc")
    best = curves.objective[:, -1].max()
    assert curves.objective[curves.nearest({"lr": BEST[0] * 1.1, "freeze_depth": 0, "augment_policy": "color"})].max() == best
    runs, anytime, reach = (pd.read_parquet(replayed / f"{n}.parquet") for n in ("runs", "anytime", "reach"))
    tpe = runs[(runs["searcher"] == "tpe") & (runs["scheduler"] == "asha")]
    assert (tpe["final"] == best).mean() >= 0.75, tpe  # TPE climbs the smooth landscape to the top setting
    # the CI holds the IQM (the incumbent may drop: once a trial ran all max_epochs, only such trials
    # count, as in tune.trials.pick_best), and every study ran its 16 trials
    for (s, c), g in anytime.groupby(["searcher", "scheduler"]):
        assert (g["ci95_low"] <= g["iqm"] + 1e-12).all() and (g["iqm"] <= g["ci95_high"] + 1e-12).all()
    assert (runs["trials"] == 16).all()
    fifo = runs[runs["scheduler"] == "fifo"]
    assert (fifo["epochs"] == 64).all() and (fifo["stopped_early"] == 0).all()
    assert (runs[runs["scheduler"] == "asha"]["stopped_early"] > 0).all()
    assert set(reach["searcher"] + "+" + reach["scheduler"]) == {"tpe+asha", "tpe+fifo", "random+asha", "random+fifo"}
    assert (replayed / "replay.png").stat().st_size > 10_000


def test_reach_is_measured_to_a_target_given_or_random_fifos_median(replayed: Path) -> None:
    runs = pd.DataFrame({"searcher": ["random"] * 4 + ["tpe"] * 4, "scheduler": "fifo", "final": [0.6, 0.6, 0.7, 0.7] * 2,
                         "epochs": 4, "stopped_early": 0, "cpu_seconds": 0.1})
    climb = np.array([[0.5, 0.6, 0.6, 0.6], [0.6, 0.6, 0.6, 0.6], [0.5, 0.5, 0.7, 0.7], [0.7, 0.7, 0.7, 0.7]])
    scores = {("random", "fifo"): climb, ("tpe", "fifo"): climb[::-1]}
    _, reach = summarise(runs, scores, full=4, seed=0)
    assert reach["target"].tolist() == pytest.approx([0.65, 0.65])  # the median of random's finals sits between two steps
    assert reach.set_index("searcher")["reached"].to_dict() == {"random": 0.5, "tpe": 0.5}
    _, reach = summarise(runs, scores, full=4, seed=0, target=0.6)
    assert reach.set_index("searcher")["median_epochs"].to_dict() == {"random": 1, "tpe": 1}  # a rank, not interpolated
    assert (reach["reached"] == 1).all() and json.loads((replayed / "replay.json").read_text())["target"] > 0


def test_the_report_draws_a_replay(replayed: Path, tmp_path: Path) -> None:
    md = replay_section(replayed, tmp_path)
    assert "![replay](replay_val_acc.png)" in md and (tmp_path / "replay_val_acc.png").is_file()
    assert any("tpe" in line and "asha" in line for line in md)
    (replayed.parent / "partial").mkdir()
    with pytest.raises(StudyFilesError, match="reach.parquet missing"):
        (replayed.parent / "partial" / "replay.json").write_text("{}")
        replay_section(replayed.parent / "partial", tmp_path)


def test_results_reach_searcher_and_scheduler_in_finishing_order(tmp_path: Path) -> None:
    """One worker, a fast and a slow setting: the study's incumbent follows the simulated clock."""
    table = dominated_table()
    curves = Curves.from_table(table, "val_acc")
    cfg = study_config(curves, "random", "fifo", 0, args(num_samples=3))
    study = replay_study(curves, cfg, workers=1, folder=tmp_path)
    assert len(study.scores) == 12 and study.trials == 3 and study.stopped_early == 0
    # one worker: trial k runs epochs 4k+1..4k+4, and the incumbent after epoch 4 is trial 0's last value
    first = curves.objective[[t for t in range(len(curves.params))]].max(axis=1)
    assert study.scores[3] in set(curves.objective[:, 3]) and study.scores[3] <= first.max()


def test_epochs_to_reach_and_the_median_of_never() -> None:
    assert epochs_to_reach(np.array([0.5, 0.7, 0.9]), 0.7) == 2 and epochs_to_reach(np.array([0.5]), 0.7) == np.inf
    med, low, high = median_ci(np.array([1.0, 2.0, np.inf, np.inf, np.inf]), np.random.default_rng(0))
    assert med == np.inf and low <= high


def write(table: pd.DataFrame, path: Path) -> Path:
    table.to_parquet(path)
    return path


@pytest.mark.parametrize("change, flags, line", [
    (lambda t: t.drop(columns="seconds"), [], "lacks column(s) seconds"),
    (lambda t: t, ["--objective", "val_acc_quay"], "lacks column(s) val_acc_quay (objectives there: val_acc, val_acc_masonry)"),
    (lambda t: t[~((t["augment_policy"] == "flip") & (t["epoch"] == 3))], [], "lacks some of epochs 1..4"),
    (lambda t: t, ["--budget", "6"], "--budget 6 epochs is more than"),
    (lambda t: t, ["--searchers", "tpe,bohb"], "--searchers: unknown searcher bohb; use tpe, random, qmc, gp, cmaes"),
    (lambda t: t, ["--schedulers", "pbt"], "--schedulers: unknown scheduler pbt; use asha, hyperband, median, fifo"),
    (lambda t: t, ["--searchers", "cmaes"], "searcher=cmaes cannot search this space: augment_policy is categorical"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture, change, flags,
                                                  line: str) -> None:
    path = write(change(dominated_table()), tmp_path / "curves.parquet")
    out = tmp_path / "replay"
    assert run_main(main, [str(path), "--repeats", "4", "--out", str(out), *flags]) != 0
    err = capsys.readouterr().err.strip()
    assert line in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_a_missing_table_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert run_main(main, [str(tmp_path / "none.parquet"), "--out", str(tmp_path / "o")]) != 0
    assert "does not exist; record one with python -m tune.curves" in capsys.readouterr().err


def test_the_reference_pair_is_always_replayed() -> None:
    a = parse(["x.parquet", "--searchers", "tpe", "--schedulers", "asha", "--out", "o"])
    assert "random" in a.searcher_list and "fifo" in a.scheduler_list


def test_the_shipped_table_is_whole_and_small() -> None:
    table = pd.read_parquet(SHIPPED)
    recipe = json.loads(SHIPPED.with_suffix(".json").read_text())
    assert set(CURVE_COLUMNS) <= set(table.columns) and "val_acc_masonry" in table.columns
    for objective in ("val_acc", "val_acc_masonry"):
        curves = Curves.from_table(table, objective)
        assert curves.epochs == recipe["max_epochs"] and len(curves.params) == recipe["settings"]
    assert SHIPPED.stat().st_size < 100_000 and "random init" in recipe["weights"]


def test_report_adds_the_replay_section(replayed: Path, tiny_study: Path, tmp_path: Path) -> None:
    import shutil

    from tune.report import main as report

    study = tmp_path / "tiny"
    shutil.copytree(tiny_study, study, ignore=shutil.ignore_patterns("ray"))
    assert report([str(study), "--max-errors", "0", "--replay", str(replayed)]) == 0
    md = (study / "report" / "report.md").read_text()
    assert "## Searchers and schedulers replayed on" in md and (study / "report" / "replay_val_acc.png").is_file()
