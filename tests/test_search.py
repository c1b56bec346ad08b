"""The private Ray 2.60 / Optuna 5.0 members tune.search relies on: an upgrade that drops or
renames one fails here, by name, before a study meets it half-way through a resume."""
from __future__ import annotations

import shutil
from pathlib import Path

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from ray import tune

from crackcore.config import StudyConfig
from crackcore.results import JOURNAL, open_journal
from tune.search import _in_space, asha_rungs, checkpoint_epochs, make_scheduler, make_searcher, search_space


def test_private_members_the_searcher_uses_exist_and_behave(tmp_path: Path) -> None:
    cfg = StudyConfig(num_samples=2, max_epochs=3)
    (tmp_path / "a").mkdir()
    searcher = make_searcher(cfg, tmp_path / "a")
    # ray 2.60 OptunaSearch internals
    for name in ("_storage", "_ot_study", "_ot_trials", "_completed_trials"):
        assert hasattr(searcher, name), f"ray.tune.search.optuna.OptunaSearch.{name} is gone"
    assert searcher.suggest("t1") == {"lr": 1e-3, "freeze_depth": 0, "augment_policy": "flip"}  # the start point
    ot_trial = searcher._ot_trials["t1"]
    assert isinstance(ot_trial._trial_id, int), "optuna.Trial._trial_id is gone"
    searcher.on_trial_result("t1", {"val_acc": 0.6, "epoch": 1})
    searcher.on_trial_complete("t1", {"val_acc": 0.7, "epoch": 2})  # ASHA stopped it before max_epochs
    [frozen] = optuna.load_study(study_name=cfg.name, storage=open_journal(tmp_path / "a")).trials
    assert frozen.state == optuna.trial.TrialState.PRUNED and frozen.intermediate_values == {1: 0.6, 2: 0.7}
    assert isinstance(searcher._ot_study._storage, optuna.storages.JournalStorage), "optuna.Study._storage is gone"
    # optuna 5.0 BaseDistribution._contains, through _in_space
    space = search_space(cfg)
    assert _in_space(space["lr"], 1e-3) and not _in_space(space["lr"], 1.0)
    assert _in_space(IntDistribution(0, 5), 5) and not _in_space(IntDistribution(0, 5), 6)
    assert not _in_space(CategoricalDistribution(["flip"]), "none") and not _in_space(FloatDistribution(0, 1), "x")

    # save/restore pickles the journal by reference: restored in another folder, the searcher
    # writes to that folder's journal
    searcher.save(str(tmp_path / "searcher.pkl"))
    (tmp_path / "b").mkdir()
    shutil.copy(tmp_path / "a" / JOURNAL, tmp_path / "b" / JOURNAL)
    restored = make_searcher(cfg, tmp_path / "a")
    restored.resume_in(tmp_path / "b")
    restored.restore(str(tmp_path / "searcher.pkl"))
    assert restored.suggest("t2") is not None
    assert len(optuna.load_study(study_name=cfg.name, storage=open_journal(tmp_path / "b")).trials) == 2  # t1 + t2


def test_a_restored_tuner_exposes_its_searcher_where_resume_search_looks(tmp_path: Path) -> None:
    searcher = make_searcher(StudyConfig(num_samples=1), tmp_path)
    tuner = tune.Tuner(lambda config: None, tune_config=tune.TuneConfig(search_alg=searcher, metric="val_acc", mode="max"),
                       run_config=tune.RunConfig(storage_path=str(tmp_path), name="ray"))
    # ray 2.60: Tuner._local_tuner (TunerInternal) keeps the TuneConfig whose searcher Ray restores
    assert tuner._local_tuner._tune_config.search_alg is searcher


@pytest.mark.parametrize("max_epochs, grace, rf, every, rungs, saved", [
    (4, 1, 3, 1, [1, 3], (2,)),  # the CPU profile: only epoch 2 is neither a rung nor the last
    (10, 1, 3, 1, [1, 3, 9], (2, 4, 5, 6, 7, 8)),  # the GPU profile
    (9, 1, 3, 2, [1, 3], (2, 4, 6, 8)),  # 9 = max_epochs: a trial there is done, not judged
    (2, 2, 3, 1, [], (1,)),  # grace = max: ASHA never stops a trial early
    (16, 2, 2, 1, [2, 4, 8], (1, 3, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15)),
])
def test_trials_checkpoint_between_ashas_rungs(max_epochs: int, grace: int, rf: int, every: int,
                                               rungs: list[int], saved: tuple[int, ...]) -> None:
    cfg = StudyConfig(max_epochs=max_epochs, grace_period=grace, reduction_factor=rf, checkpoint_every=every)
    assert asha_rungs(cfg) == rungs and checkpoint_epochs(cfg) == saved
    # private: ray 2.60 ASHAScheduler._brackets[0]._rungs, the milestones it judges trials at
    milestones = sorted(m for m, _ in make_scheduler(cfg)._brackets[0]._rungs)
    assert [m for m in milestones if m < max_epochs] == rungs
