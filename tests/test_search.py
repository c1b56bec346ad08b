"""tune.search: the private Ray 2.60 / Optuna 5.0 members it relies on (an upgrade that drops or
renames one fails here, by name, before a study meets it half-way through a resume), and the
searcher / scheduler choices, down to one real study with a non-default pair."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from ray import tune

from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler, MedianStoppingRule

from crackcore.config import SCHEDULERS, SEARCHERS, SearchSpace, StudyConfig, apply_overrides
from crackcore.exceptions import ConfigError
from crackcore.journal import open_journal
from crackcore.studyfiles import JOURNAL
from tests.conftest import TEST_DATA
from tune.settings import build_parser, flag_overrides
from tune.search import (_in_space, asha_rungs, checkpoint_epochs, make_sampler, make_scheduler, make_searcher,
                         search_space)

REPO = Path(__file__).resolve().parents[1]


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


NUMERIC_SPACE = SearchSpace(freeze_depths=[0, 1, 2], augment_policies=["flip"])  # what CMA-ES can search


@pytest.mark.parametrize("searcher, sampler", [("tpe", optuna.samplers.TPESampler), ("random", optuna.samplers.RandomSampler),
                                               ("qmc", optuna.samplers.QMCSampler), ("gp", optuna.samplers.GPSampler),
                                               ("cmaes", optuna.samplers.CmaEsSampler)])
def test_each_searcher_is_its_optuna_sampler_and_early_stopped_trials_stay_pruned(
        tmp_path: Path, searcher: str, sampler: type) -> None:
    cfg = StudyConfig(num_samples=8, max_epochs=3, searcher=searcher, seed=3,
                      **({"space": NUMERIC_SPACE} if searcher == "cmaes" else {}))
    search = make_searcher(cfg, tmp_path)
    assert type(search._ot_study.sampler) is sampler  # private: ray 2.60 OptunaSearch._ot_study
    space = search_space(cfg)
    for k in range(6):  # the start point, then the sampler's own points, each told a result
        point = search.suggest(f"t{k}")
        assert all(_in_space(space[key], v) for key, v in point.items()), point
        stopped = k % 2 == 0
        search.on_trial_result(f"t{k}", {"val_acc": 0.5 + k / 100, "epoch": 1})
        search.on_trial_complete(f"t{k}", {"val_acc": 0.6 + k / 100, "epoch": 1 if stopped else 3})
    states = [t.state for t in optuna.load_study(study_name=cfg.name, storage=open_journal(tmp_path)).trials]
    assert states == [optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.COMPLETE] * 3


def test_samplers_are_seeded() -> None:
    assert make_sampler(StudyConfig(searcher="qmc", seed=1))._seed == 1  # private: optuna 5.0 QMCSampler._seed
    assert make_sampler(StudyConfig(searcher="tpe", num_samples=32))._n_startup_trials == 10


@pytest.mark.parametrize("scheduler, cls, brackets", [("asha", AsyncHyperBandScheduler, 1),
                                                      ("hyperband", AsyncHyperBandScheduler, 2),
                                                      ("median", MedianStoppingRule, None), ("fifo", FIFOScheduler, None)])
def test_each_scheduler_is_rays_and_trials_checkpoint_off_its_rungs(scheduler: str, cls: type, brackets: int | None) -> None:
    cfg = StudyConfig(max_epochs=4, grace_period=1, reduction_factor=3, scheduler=scheduler)
    made = make_scheduler(cfg)
    assert type(made) is cls or type(made).__bases__[-1] is cls  # Ray's, sparing the reference (below)
    if brackets:  # private: ray 2.60 AsyncHyperBandScheduler._brackets[s]._rungs; HyperBand's brackets start later
        rungs = [sorted(m for m, _ in b._rungs if m < cfg.max_epochs) for b in made._brackets]
        assert len(rungs) == brackets and rungs[0] == [1, 3] and all(set(r) <= {1, 3} for r in rungs)
        assert checkpoint_epochs(cfg) == (2,)
    else:  # median and fifo stop at no fixed epoch: every epoch but the last is saved
        assert checkpoint_epochs(cfg) == (1, 2, 3)
    if cls is MedianStoppingRule:  # never pauses a trial: it would restart from a checkpoint
        assert made._min_time_slice == float("inf") and made._hard_stop
        trial = type("T", (), {"trial_id": "a"})()  # private: ray 2.60 MedianStoppingRule._last_pause starts at -inf
        made.set_search_properties("val_acc", "max")
        assert made.on_trial_result(None, trial, {"epoch": 1, "val_acc": 0.5}) == "CONTINUE"  # no controller asked


@pytest.mark.parametrize("scheduler", ["asha", "median"])
def test_the_reference_is_never_stopped_early(scheduler: str) -> None:
    # ASHA / the median rule stop a weak trial at a rung; the reference setting (the first start
    # point) runs out, with the same weak scores, so the choice rule can prefer it
    cfg = StudyConfig(max_epochs=4, grace_period=1, reduction_factor=3, scheduler=scheduler)
    made = make_scheduler(cfg)
    made.set_search_properties("val_acc", "max")
    reference = cfg.reference_params().to_dict()
    assert reference == {"lr": 1e-3, "freeze_depth": 0, "augment_policy": "flip"}
    trial = type("Trial", (), {})  # what a scheduler reads of Ray's Trial: a hashable object with these two
    trials = [trial() for _ in range(6)]
    for k, t in enumerate(trials):
        t.trial_id, t.config = f"t{k}", {**reference, "lr": 0.01 * (k + 1)}
    trials[-1].trial_id, trials[-1].config["lr"] = "ref", 0.001 + 1e-15  # the reference, lr as Optuna rounds it
    for t in trials:
        made.on_trial_add(None, t)
    actions = {}
    for epoch in (1, 2, 3):
        for k, t in enumerate(trials):
            if actions.get(t.trial_id) != "STOP":  # strong trials first, the weakest (both) last
                score = 0.3 if t.trial_id in ("ref", "t4") else 0.9 - 0.01 * k
                actions[t.trial_id] = made.on_trial_result(None, t, {"epoch": epoch, "val_acc": score})
    assert actions["t4"] == "STOP" and actions["ref"] == "CONTINUE", actions


def test_auto_scheduler_stops_early_in_domain_only() -> None:
    # on a held-out val source epoch 1 does not predict the end (tune.replay): no early stopping there
    assert StudyConfig().scheduler == "auto" and StudyConfig().scheduler_used == "asha"
    held_out = apply_overrides(StudyConfig(train={"data": "concrete=a,masonry=b"}), {"train.val_source": "masonry"})
    assert held_out.scheduler_used == "fifo" and type(make_scheduler(held_out)) is FIFOScheduler
    assert checkpoint_epochs(held_out) == (1, 2, 3)  # no rung to spare a checkpoint at
    assert apply_overrides(held_out, {"scheduler": "asha"}).scheduler_used == "asha"  # asked for: kept


def test_bad_choices_are_one_line() -> None:
    with pytest.raises(ConfigError, match=r"^searcher='bohb' is unknown; use one of tpe, random, qmc, gp, cmaes$"):
        StudyConfig(searcher="bohb")
    with pytest.raises(ConfigError, match=r"^scheduler='pbt' is unknown; use one of auto, asha, hyperband, median, fifo$"):
        StudyConfig(scheduler="pbt")
    with pytest.raises(ConfigError, match="searcher=cmaes cannot search this space: augment_policy is categorical"):
        StudyConfig(searcher="cmaes")  # the default space: 8 policies
    with pytest.raises(ConfigError, match="only lr varies"):
        StudyConfig(searcher="cmaes", space=SearchSpace(freeze_depths=[0], augment_policies=["flip"]))
    assert StudyConfig(searcher="cmaes", space=NUMERIC_SPACE).searcher == "cmaes"


def test_flags_and_the_experiment_file_choose_the_pair(tmp_path: Path) -> None:
    a = build_parser().parse_args(["--searcher", "gp", "--scheduler", "median", "--reduction-factor", "2"])
    cfg = apply_overrides(StudyConfig(), {k: v for k, v in flag_overrides(a).items() if not k.startswith("train.")})
    assert (cfg.searcher, cfg.scheduler, cfg.reduction_factor) == ("gp", "median", 2)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--scheduler", "pbt"])
    assert set(SEARCHERS) == {"tpe", "random", "qmc", "gp", "cmaes"} and set(SCHEDULERS) == {"asha", "hyperband",
                                                                                            "median", "fifo"}


def test_a_study_with_a_non_default_pair_records_it_and_prunes_what_it_stopped(tmp_path: Path) -> None:
    cmd = [sys.executable, str(REPO / "tune" / "run.py"), "--smoke-test", "--data", str(TEST_DATA), "--subset", "30",
           "--searcher", "qmc", "--scheduler", "hyperband", "--max-epochs", "3", "--reduction-factor", "2",
           "--final-epochs", "1", "--no-shift-suite", "--storage-path", str(tmp_path), "--study-name", "pair"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    study = tmp_path / "pair"
    config = json.loads((study / "study.json").read_text())["config"]
    assert (config["searcher"], config["scheduler"], config["reduction_factor"]) == ("qmc", "hyperband", 2)
    trials = optuna.load_study(study_name="pair", storage=open_journal(study)).trials
    assert len(trials) == 4
    for t in trials:  # stopped before max_epochs <=> PRUNED, whichever pair stopped it
        assert (t.state == optuna.trial.TrialState.PRUNED) == (max(t.intermediate_values) < 3), t
