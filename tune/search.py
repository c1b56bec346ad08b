"""The search: Optuna TPE behind Ray Tune, with the bookkeeping Ray's OptunaSearch leaves out,
and the ASHA scheduler with the epochs its trials checkpoint at.

Ray 2.60's OptunaSearch reports intermediate values by Ray's `training_iteration` and tells
Optuna COMPLETE for every trial that returned a metric, including trials ASHA stopped early.
`EpochAwareOptunaSearch` reports each epoch's value at step = epoch and marks trials that
stopped before `max_epochs` as PRUNED, so the persisted Optuna study (a JournalStorage file
next to the results) is a faithful record for optuna.visualization and optuna-dashboard.

Private members used here, read from the pinned ray 2.60.0 and optuna 5.0.0 (each marked
"private:" below); tests/test_search.py fails loudly if one disappears in an upgrade."""
from __future__ import annotations

import pickle
import sys
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from crackcore.config import StudyConfig
from crackcore.results import open_journal


def make_scheduler(cfg: StudyConfig) -> ASHAScheduler:
    return ASHAScheduler(time_attr="epoch", max_t=cfg.max_epochs, grace_period=cfg.grace_period,
                         reduction_factor=cfg.reduction_factor)


def asha_rungs(cfg: StudyConfig) -> list[int]:
    """The epochs where ASHA may stop a trial: grace_period x reduction_factor^k below max_epochs
    (Ray 2.60's one-bracket _Bracket milestones; tests/test_search.py compares them)."""
    count = int(np.log(cfg.max_epochs / cfg.grace_period) / np.log(cfg.reduction_factor) + 1)
    return sorted(r for k in range(count) if (r := cfg.grace_period * cfg.reduction_factor ** k) < cfg.max_epochs)


def checkpoint_epochs(cfg: StudyConfig) -> tuple[int, ...]:
    """The epochs after which a trial writes its checkpoint: every checkpoint_every-th, but not
    the last (nothing resumes a finished trial) nor an ASHA rung, where ASHA stops all but
    1/reduction_factor of the trials that reach it (their checkpoint would be written for
    nothing); a trial that goes on from a rung writes one an epoch later."""
    rungs = set(asha_rungs(cfg))
    return tuple(e for e in range(1, cfg.max_epochs) if e % cfg.checkpoint_every == 0 and e not in rungs)


def search_space(cfg: StudyConfig) -> dict[str, BaseDistribution]:
    s = cfg.space
    depths = sorted(set(s.freeze_depths))
    space: dict[str, BaseDistribution] = {
        "lr": FloatDistribution(s.lr_min, s.lr_max, log=True),
        # freeze depth is ordinal: an int range lets TPE exploit its order
        "freeze_depth": IntDistribution(depths[0], depths[-1]) if depths == list(range(depths[0], depths[-1] + 1))
        else CategoricalDistribution(depths),
        "augment_policy": CategoricalDistribution(list(s.augment_policies)),
    }
    for key, values in (("weight_decay", s.weight_decays), ("batch_size", s.batch_sizes)):
        if values:  # searched only when listed
            space[key] = CategoricalDistribution(list(values))
    return space


def _in_space(dist: BaseDistribution, value: Any) -> bool:
    if isinstance(dist, CategoricalDistribution):
        return value in dist.choices  # to_internal_repr raises for a value outside the choices
    try:  # private: optuna 5.0.0 BaseDistribution._contains (no public membership test)
        return dist._contains(dist.to_internal_repr(value))
    except (TypeError, ValueError):
        return False


def start_points(cfg: StudyConfig, space: dict[str, BaseDistribution]) -> list[dict[str, Any]]:
    """The seed notebook's setting(s), run first. Keys a point leaves out (e.g. weight_decay
    when it is searched) take the training config's value; a point the space cannot express
    (a narrowed space) is skipped with a warning."""
    points = []
    for p in cfg.space.start_points:
        point = {k: p.get(k, getattr(cfg.train, k, None)) for k in space}
        outside = {k: v for k, v in point.items() if not _in_space(space[k], v)}
        if outside:
            print(f"warning: start point {p} skipped: {outside} outside the search space", file=sys.stderr)
        else:
            points.append(point)
    return points


RAY_TRIAL_ID = "ray_trial_id"  # an Optuna trial's user attr: the Ray trial that ran it
JOURNAL_REF = "study-journal"  # what a pickled searcher holds instead of its journal (and its path)


class _JournalByReference(pickle.Pickler):
    def __init__(self, file: Any, journal: Any):
        super().__init__(file)
        self._journal = journal

    def persistent_id(self, obj: Any) -> str | None:
        return JOURNAL_REF if obj is self._journal else None


class _JournalAt(pickle.Unpickler):
    def __init__(self, file: Any, study_dir: Path):
        super().__init__(file)
        self._journal = open_journal(study_dir, writer=True)

    def persistent_load(self, pid: Any) -> Any:
        if pid != JOURNAL_REF:
            raise pickle.UnpicklingError(f"unknown persistent id {pid!r}")
        return self._journal


class EpochAwareOptunaSearch(OptunaSearch):
    # Ray pickles the searcher into its experiment and unpickles it on --resume, maybe in a
    # driver whose study folder is elsewhere (a new pod or machine, another working folder).
    # The journal is pickled by reference; `resume_in` tells the restored searcher where the
    # resuming driver's journal is, before Ray restores its state (see `resume_search`).
    # private: ray 2.60.0 OptunaSearch's _storage, _ot_trials, _ot_study, _completed_trials and
    # its save/restore of __dict__; optuna 5.0.0 Trial._trial_id.

    def __init__(self, *args: Any, study_dir: Path, max_epochs: int, **kwargs: Any):
        self._study_dir = Path(study_dir)
        self._max_epochs = max_epochs
        super().__init__(*args, storage=open_journal(study_dir, writer=True), **kwargs)

    def resume_in(self, study_dir: Path) -> None:
        self._study_dir = Path(study_dir)

    def save(self, checkpoint_path: str) -> None:
        # Ray saves into its driver staging folder, then uploads it: tune.storage.StateHashes
        # hashes the files there, as written, before the upload
        self.saved_in = str(Path(checkpoint_path).parent)
        with open(checkpoint_path, "wb") as f:
            _JournalByReference(f, self._storage).dump(self.__dict__.copy())

    def suggest(self, trial_id: str) -> dict | None:
        new = trial_id not in self._ot_trials
        params = super().suggest(trial_id)
        if new and trial_id in self._ot_trials:  # the link tune.trials.journal_wins follows from journal to Ray
            self._ot_trials[trial_id].set_user_attr(RAY_TRIAL_ID, trial_id)
        return params

    def restore(self, checkpoint_path: str) -> None:
        study_dir = self._study_dir
        with open(checkpoint_path, "rb") as f:
            self.__dict__.update(_JournalAt(f, study_dir).load())
        self._study_dir = study_dir

    def _report(self, trial_id: str, result: dict | None) -> None:
        if not result or self.metric not in result:
            return
        step = int(result.get("epoch", result.get("training_iteration", 0)))
        ot_trial = self._ot_trials[trial_id]
        if step not in ot_trial.storage.get_trial(ot_trial._trial_id).intermediate_values:  # a restored trial repeats none
            ot_trial.report(float(result[self.metric]), step)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id not in self._completed_trials:
            self._report(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self._completed_trials:
            return super().on_trial_complete(trial_id, result, error)
        # Ray hands a trial's last result only to on_trial_complete, never to on_trial_result
        self._report(trial_id, result)
        stopped_early = (not error and result is not None and self.metric in result
                         and int(result.get("epoch", self._max_epochs)) < self._max_epochs)
        if not stopped_early:
            return super().on_trial_complete(trial_id, result, error)
        # PRUNED with the last intermediate value, as Optuna's own pruners record it
        self._ot_study.tell(self._ot_trials[trial_id], state=TrialState.PRUNED)
        self._completed_trials.add(trial_id)


def make_searcher(cfg: StudyConfig, study_dir: Path, start: bool = True) -> EpochAwareOptunaSearch:
    """`start`: run the start points first (False when the journal already holds the study's trials)."""
    space = search_space(cfg)
    # constant_liar keeps parallel TPE from proposing the same point to trials running at once
    sampler = optuna.samplers.TPESampler(seed=cfg.seed, multivariate=True, constant_liar=True,
                                         n_startup_trials=max(4, min(10, cfg.num_samples // 3)))
    return EpochAwareOptunaSearch(space=space, metric=cfg.metric, mode="max", points_to_evaluate=start_points(cfg, space) if start else None,
                                  sampler=sampler, study_name=cfg.name, study_dir=study_dir,
                                  max_epochs=cfg.max_epochs)


def resume_search(experiment: str, trainable: Any, study_dir: Path) -> Any:
    """Ray's Tuner for an interrupted experiment, its searcher pointed at this driver's journal."""
    from ray import tune

    tuner = tune.Tuner.restore(experiment, trainable=trainable)
    # private: ray 2.60.0 Tuner._local_tuner (TunerInternal) keeps the unpickled TuneConfig, whose
    # search_alg is the searcher Ray restores its state into when fit() starts
    tuner._local_tuner._tune_config.search_alg.resume_in(study_dir)
    return tuner


def fail_orphaned_trials(study_dir: Path, study_name: str) -> None:
    """After a search every trial has ended, so an Optuna trial still RUNNING was asked by a
    driver that was killed before its Ray trial started. Mark it FAIL (Optuna's convention
    for abandoned trials) so the study holds no phantom work."""
    study = optuna.load_study(study_name=study_name, storage=open_journal(study_dir, writer=True))
    orphans = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    # private: optuna 5.0.0 Study._storage and FrozenTrial._trial_id (no public way to fail a trial
    # another process asked, with a note on it)
    for t in orphans:
        study._storage.set_trial_user_attr(t._trial_id, "orphaned", "asked by an interrupted driver; never ran")
        study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)


def restart_from_journal(study_dir: Path, study_name: str) -> int:
    """Ready the Optuna study for a new Ray search that replaces a damaged Ray experiment (the
    journal is the record of the trials). Returns the trials that finished; each trial left
    RUNNING (interrupted with the experiment, or asked and never started) is marked FAIL with
    an `orphaned` note and its params are enqueued, so the new search runs that setting again
    first. Trials already enqueued (WAITING) stay queued."""
    study = optuna.load_study(study_name=study_name, storage=open_journal(study_dir, writer=True))
    trials = study.get_trials(deepcopy=False)
    for t in trials:
        if t.state == TrialState.RUNNING:
            # private: optuna 5.0.0 Study._storage / FrozenTrial._trial_id, as in fail_orphaned_trials
            epochs = len(t.intermediate_values)
            study._storage.set_trial_user_attr(t._trial_id, "orphaned", f"interrupted after {epochs} epoch(s) when "
                                               "Ray's experiment state was damaged; its setting runs again as a new trial")
            study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
            study.enqueue_trial(t.params)
    return sum(1 for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
               or (t.state == TrialState.FAIL and "orphaned" not in t.user_attrs))
