"""The search: an Optuna sampler (TPE, random, QMC, GP, CMA-ES) behind Ray Tune's OptunaSearch,
with the bookkeeping OptunaSearch leaves out, and a Ray scheduler (ASHA, asynchronous
HyperBand, median stopping, FIFO) with the epochs its trials checkpoint at.

`hyperband` is Ray's AsyncHyperBandScheduler with one bracket per rung (asynchronous
HyperBand, Li et al. 2020), not Ray's synchronous HyperBandScheduler: that one PAUSES trials at
its milestones until their bracket fills, which a searcher feeding at most `slots` trials at a
time never fills, and a paused function trial restarts from a checkpoint our trials do not
write at a rung.

Ray 2.60's OptunaSearch reports intermediate values by Ray's `training_iteration` and tells
Optuna COMPLETE for every trial that returned a metric, including trials ASHA stopped early.
`EpochAwareOptunaSearch` reports each epoch's value at step = epoch and marks trials that
stopped before `max_epochs` as PRUNED, so the persisted Optuna study (a JournalStorage file
next to the results) is a faithful record for optuna.visualization and optuna-dashboard.

Private members used here, read from the pinned ray 2.60.0 and optuna 5.0.0 (each marked
"private:" below); tests/test_search.py fails loudly if one disappears in an upgrade."""
from __future__ import annotations

import math
import pickle
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pandas as pd
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState
from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler, MedianStoppingRule, TrialScheduler
from ray.tune.search.optuna import OptunaSearch

from crackcore.config import StudyConfig
from crackcore.journal import open_journal


def is_setting(table: pd.DataFrame, params: dict[str, Any] | None) -> pd.Series:
    """Rows of `table` whose searched columns equal `params` (lr up to float rounding)."""
    if not params:
        return pd.Series(False, index=table.index)
    same = pd.Series(True, index=table.index)
    for key, value in params.items():
        if key not in table:
            continue
        same &= np.isclose(table[key].astype(float), float(value), rtol=1e-9, atol=0) if key == "lr" else table[key] == value
    return same


class _ReferenceRunsOut:
    """A scheduler that never stops the reference setting early. The choice rule prefers the
    reference inside the tie set of trials that ran all epochs (tune.trials); a reference stopped
    at the first rung, where a slow starter looks weak, could never be preferred (seen with 16
    trials: the pick then scored 0.75 points below it on 4,800 independent patches). Its result
    still counts at the rungs it passes, as any trial's."""

    def __init__(self, *args: Any, reference: dict[str, Any], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.reference = reference

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        action = super().on_trial_result(tune_controller, trial, result)
        if action != TrialScheduler.STOP or not self.is_reference(trial):
            return action
        # private: ray 2.60 MedianStoppingRule marks a hard-stopped trial and asserts it never reports again
        getattr(self, "_stopped_trials", set()).discard(trial)
        return TrialScheduler.CONTINUE

    def is_reference(self, trial: Any) -> bool:
        config = getattr(trial, "config", None)
        return bool(config) and bool(is_setting(pd.DataFrame([config]), self.reference).iloc[0])


class ReferenceASHA(_ReferenceRunsOut, AsyncHyperBandScheduler):
    """Ray's asynchronous successive halving / HyperBand; the reference runs out (_ReferenceRunsOut)."""


class ReferenceMedian(_ReferenceRunsOut, MedianStoppingRule):
    """Ray's median stopping rule; the reference runs out (_ReferenceRunsOut)."""


def make_scheduler(cfg: StudyConfig) -> TrialScheduler:
    """Ray's scheduler for cfg.scheduler_used, judging trials by epoch (metric and mode come from the
    TuneConfig), never stopping the reference setting early. The median rule never pauses a trial
    (an infinite min_time_slice; Ray's first pause comes after -inf, so any finite slice pauses
    once): a paused function trial would restart from its last checkpoint."""
    reference = cfg.reference_params().to_dict()
    if cfg.scheduler_used in ("asha", "hyperband"):
        brackets = max(1, len(asha_rungs(cfg))) if cfg.scheduler_used == "hyperband" else 1
        return ReferenceASHA(time_attr="epoch", max_t=cfg.max_epochs, grace_period=cfg.grace_period,
                             reduction_factor=cfg.reduction_factor, brackets=brackets, reference=reference)
    if cfg.scheduler_used == "median":
        return ReferenceMedian(time_attr="epoch", grace_period=cfg.grace_period, min_samples_required=3,
                               min_time_slice=math.inf, hard_stop=True, reference=reference)
    return FIFOScheduler()


def asha_rungs(cfg: StudyConfig) -> list[int]:
    """The epochs where ASHA may stop a trial: grace_period x reduction_factor^k below max_epochs
    (Ray 2.60's one-bracket _Bracket milestones; tests/test_search.py compares them). Asynchronous
    HyperBand's later brackets start at later rungs of the same ladder."""
    count = int(np.log(cfg.max_epochs / cfg.grace_period) / np.log(cfg.reduction_factor) + 1)
    return sorted(r for k in range(count) if (r := cfg.grace_period * cfg.reduction_factor ** k) < cfg.max_epochs)


def stop_epochs(cfg: StudyConfig) -> list[int]:
    """The epochs where the scheduler judges (and may stop) a trial: ASHA's and HyperBand's rungs;
    none for FIFO, and none fixed for the median rule, which may stop a trial at any epoch."""
    return asha_rungs(cfg) if cfg.scheduler_used in ("asha", "hyperband") else []


def checkpoint_epochs(cfg: StudyConfig) -> tuple[int, ...]:
    """The epochs after which a trial writes its checkpoint: every checkpoint_every-th, but not
    the last (nothing resumes a finished trial) nor a rung of ASHA / HyperBand, where they stop
    all but 1/reduction_factor of the trials that reach it (their checkpoint would be written for
    nothing); a trial that goes on from a rung writes one an epoch later."""
    rungs = set(stop_epochs(cfg))
    return tuple(e for e in range(1, cfg.max_epochs) if e % cfg.checkpoint_every == 0 and e not in rungs)


def search_space(cfg: StudyConfig) -> dict[str, BaseDistribution]:
    """Optuna's distributions of the keys the study searches, as TrialParams declares them."""
    space: dict[str, BaseDistribution] = {}
    for key, (kind, values) in cfg.space.searched().items():
        if kind == "log-uniform":
            space[key] = FloatDistribution(*values, log=True)
        elif kind == "ordinal":  # an int range lets TPE exploit the order (freeze depth)
            levels = sorted(set(values[0]))
            space[key] = IntDistribution(levels[0], levels[-1]) if levels == list(range(levels[0], levels[-1] + 1)) \
                else CategoricalDistribution(levels)
        else:
            space[key] = CategoricalDistribution(list(values[0]))
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


def make_sampler(cfg: StudyConfig) -> optuna.samplers.BaseSampler:
    """Optuna's sampler for cfg.searcher, seeded. The model-based ones start from the same number
    of random trials (a third of the study, 4..10)."""
    startup = max(4, min(10, cfg.num_samples // 3))
    with warnings.catch_warnings():  # QMC and consider_pruned_trials are "experimental" in Optuna 5.0
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if cfg.searcher == "tpe":
            # constant_liar keeps parallel TPE from proposing the same point to trials running at once
            return optuna.samplers.TPESampler(seed=cfg.seed, multivariate=True, constant_liar=True,
                                              n_startup_trials=startup)
        if cfg.searcher == "gp":
            return optuna.samplers.GPSampler(seed=cfg.seed, n_startup_trials=startup)
        if cfg.searcher == "cmaes":
            # consider_pruned_trials: with a scheduler most trials end PRUNED, CMA-ES would learn from few
            return optuna.samplers.CmaEsSampler(seed=cfg.seed, n_startup_trials=startup, consider_pruned_trials=True)
        if cfg.searcher == "qmc":  # scrambled Sobol: a fresh low-discrepancy sequence per seed
            return optuna.samplers.QMCSampler(seed=cfg.seed, scramble=True, warn_independent_sampling=False)
        return optuna.samplers.RandomSampler(seed=cfg.seed)


def make_searcher(cfg: StudyConfig, study_dir: Path, start: bool = True) -> EpochAwareOptunaSearch:
    """`start`: run the start points first (False when the journal already holds the study's trials)."""
    space = search_space(cfg)
    return EpochAwareOptunaSearch(space=space, metric=cfg.metric, mode="max",
                                  points_to_evaluate=start_points(cfg, space) if start else None,
                                  sampler=make_sampler(cfg), study_name=cfg.name, study_dir=study_dir,
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
    # private: optuna 5.0.0 Study._storage and FrozenTrial._trial_id (no public way to fail a trial
    # another process asked, with a note on it)
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
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
