"""A study's own record against Ray's files, on hand-made inputs (no Ray run): the Optuna journal
wins over torn or empty result files, a torn experiment state is found and set aside, Ray's
state is hashed as written and a changed one is found, and --resume refuses a --config that
disagrees with the saved study."""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest

from crackcore.config import StudyConfig, TrialParams
from crackcore.journal import open_journal


def journal(study_dir: Path, trials: list[tuple[str, str, list[float]]]) -> None:
    """An Optuna journal as the search writes it: (ray trial id, final state, value per epoch)."""
    study = optuna.create_study(study_name="s", storage=open_journal(study_dir, writer=True), direction="maximize")
    for k, (ray_id, state, values) in enumerate(trials):
        t = study.ask({"lr": optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True),
                       "freeze_depth": optuna.distributions.IntDistribution(0, 5),
                       "augment_policy": optuna.distributions.CategoricalDistribution(["flip", "none"])})
        t.set_user_attr("ray_trial_id", ray_id)
        for epoch, v in enumerate(values, start=1):
            t.report(v, epoch)
        if state == "COMPLETE":
            study.tell(t, values[-1])
        elif state == "PRUNED":
            study.tell(t, state=optuna.trial.TrialState.PRUNED)


def test_the_journal_wins_over_torn_or_empty_ray_result_files(tmp_path: Path, capsys) -> None:
    from tune.trials import journal_wins, pick_best

    # the full disk of issue 27: b's and c's result.json were emptied (0 epochs, "PRUNED" by done=True);
    # d's last line was torn (1 of 2 epochs); e is in the journal only (its Ray folder set aside)
    journal(tmp_path, [("a", "COMPLETE", [0.5, 0.6]), ("b", "COMPLETE", [0.6, 0.7]), ("c", "PRUNED", [0.3]),
                       ("d", "COMPLETE", [0.4, 0.65]), ("e", "COMPLETE", [0.5, 0.55]), ("f", "RUNNING", [0.2])])
    ray = pd.DataFrame([
        ("a", "COMPLETE", 2, 0.6, 0.31), ("b", "PRUNED", 0, np.nan, np.nan), ("c", "PRUNED", 0, np.nan, np.nan),
        ("d", "PRUNED", 1, 0.4, 0.5), ("f", "INTERRUPTED", 1, 0.2, 0.9),
    ], columns=["trial_id", "status", "epochs", "last_val_acc", "last_val_loss"])
    params = {tid: TrialParams(lr=1e-3, freeze_depth=0, augment_policy="flip") for tid in ray["trial_id"]}
    table, params = journal_wins(ray, params, tmp_path, StudyConfig(name="s", max_epochs=2))
    table = table.set_index("trial_id")
    assert table["status"].to_dict() == {"a": "COMPLETE", "b": "COMPLETE", "c": "PRUNED", "d": "COMPLETE",
                                          "e": "COMPLETE", "f": "INTERRUPTED"}
    assert table["epochs"].to_dict() == {"a": 2, "b": 2, "c": 1, "d": 2, "e": 2, "f": 1}
    assert table.loc["b", "last_val_acc"] == 0.7 and table.loc["d", "last_val_acc"] == 0.65
    assert table.loc["a", "last_val_loss"] == 0.31 and np.isnan(table.loc["d", "last_val_loss"])
    assert table["from_journal"].to_dict() == {"a": False, "b": True, "c": True, "d": True, "e": True, "f": False}
    assert set(params) == set(table.index)  # e's params come from the journal
    assert pick_best(table.reset_index())["trial_id"] == "b"  # was: a 1-epoch trial retrained instead
    [line] = [l for l in capsys.readouterr().err.splitlines() if "disagree with the Optuna journal" in l]
    assert "4 trial(s)" in line and "(b, c, d, e)" in line


def test_a_torn_experiment_state_is_found_and_set_aside(tmp_path: Path) -> None:
    from tune.storage import damaged_state, has_experiment_state, set_damaged_state_aside

    ray = tmp_path / "ray"
    (ray / "train_trial_a").mkdir(parents=True)
    whole = json.dumps({"trial_data": [], "runner_data": {}}).encode()
    (ray / "tuner.pkl").write_bytes(pickle.dumps({"x": 1}))
    (ray / "experiment_state-2026-01-01_00-00-00.json").write_bytes(whole)
    (ray / "searcher-state-2026-01-01_00-00-00.pkl").write_bytes(pickle.dumps(list(range(100))))
    assert damaged_state(str(ray)) == []
    (ray / "searcher-state-2026-01-01_00-00-00.pkl").write_bytes(pickle.dumps(list(range(100)))[:50])  # cut short
    (ray / "experiment_state-2026-01-01_00-00-00.json").write_bytes(b"")  # emptied
    assert damaged_state(str(ray)) == ["experiment_state-2026-01-01_00-00-00.json",
                                       "searcher-state-2026-01-01_00-00-00.pkl"]
    aside = Path(set_damaged_state_aside(str(ray)))
    assert not has_experiment_state(str(ray)) and (ray / "train_trial_a").is_dir()  # the trials stay
    assert sorted(p.name for p in aside.iterdir()) == ["experiment_state-2026-01-01_00-00-00.json",
                                                       "searcher-state-2026-01-01_00-00-00.pkl", "tuner.pkl"]


def test_rays_state_is_hashed_as_written_and_a_change_is_found(tmp_path: Path) -> None:
    from crackcore.exceptions import StorageError
    from tune.storage import STATE_HASHES, StateHashes, changed_state

    ray, staging = tmp_path / "ray", tmp_path / "staging"
    ray.mkdir()
    staging.mkdir()
    (ray / "tuner.pkl").write_bytes(pickle.dumps("tuner"))

    class Searcher:  # where tune.search.EpochAwareOptunaSearch.save last wrote
        saved_in = None

    hashes = StateHashes(tmp_path, str(ray), Searcher)
    hashes.setup()
    for k in range(4):  # snapshots: the staging folder's files, as written; Ray then uploads them
        for name in ("experiment_state-x.json", "searcher-state-x.pkl"):
            (staging / name).write_bytes(pickle.dumps(k) if name.endswith("pkl") else json.dumps(k).encode())
        Searcher.saved_in = str(staging)
        hashes.get_state()
        if k == 1:  # the upload of snapshot 1 (one of the last versions: a kill before the next one's upload)
            for f in staging.iterdir():
                (ray / f.name).write_bytes(f.read_bytes())
    assert changed_state(tmp_path, str(ray)) == []
    (ray / "searcher-state-x.pkl").write_bytes(pickle.dumps("planted"))
    (ray / "search_gen_state-y.json").write_text("{}")  # a state file the study never wrote
    assert changed_state(tmp_path, str(ray)) == ["search_gen_state-y.json", "searcher-state-x.pkl"]
    (tmp_path / STATE_HASHES).unlink()
    assert changed_state(tmp_path, str(ray)) == [f"{STATE_HASHES} missing"]
    # a record that cannot be written stops the snapshot before Ray uploads it, in one line
    (tmp_path / STATE_HASHES).mkdir()
    with pytest.raises((StorageError, OSError)):
        hashes.get_state()


def test_resume_refuses_a_config_file_that_disagrees_with_the_saved_study(tmp_path: Path) -> None:
    from crackcore.config import load_study_config
    from tune.run import build_parser, resolve_config, resume_conflicts

    saved = StudyConfig(name="s", max_epochs=4, train={"subset": 40})
    same, other = tmp_path / "same.toml", tmp_path / "other.toml"
    same.write_text("max_epochs = 4\n[train]\nsubset = 40\n")
    other.write_text("max_epochs = 9\n[train]\nsubset = 40\n")
    for path, expected in ((same, []), (other, [f"max_epochs is 4 there, not 9 (--config {other})"])):
        a = build_parser().parse_args(["--config", str(path), "--resume"])
        from_file = load_study_config(path)
        cfg = resolve_config(a, from_file, has_gpu=False)
        assert resume_conflicts(a, cfg, saved, from_file=from_file) == expected
    # a flag that overrides the file now is judged as a flag, once
    a = build_parser().parse_args(["--config", str(other), "--resume", "--max-epochs", "4"])
    assert resume_conflicts(a, resolve_config(a, load_study_config(other), False), saved,
                            from_file=load_study_config(other)) == []


def test_a_full_disk_anywhere_in_the_search_is_one_line(tmp_path: Path) -> None:
    import errno

    from ray.tune.error import TuneError

    from tune.run import stopped_by_storage

    # the searcher's journal append fails in Ray's loop: Ray hands back its traceback as text
    ray_text = ("The Ray Tune run failed.\nTraceback (most recent call last):\n  File \"x.py\", line 1\n"
                f"OSError: [Errno 28] No space left on device: '{tmp_path}/optuna_journal.log'\n")
    line = stopped_by_storage(TuneError(ray_text), tmp_path)
    assert line.startswith(f"no space left on the device in {tmp_path} (writing optuna_journal.log)")
    # a write that failed at its flush names no file: the study folder is named instead
    line = stopped_by_storage(OSError(errno.ENOSPC, "No space left on device"), tmp_path)
    assert line.startswith(f"no space left on the device in {tmp_path} (writing study files)")
    assert stopped_by_storage(TuneError("a trial raised ValueError"), tmp_path) is None
