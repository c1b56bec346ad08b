"""python tune/run.py --num-samples 32

The tuning study, top to bottom: read the experiment file and flags into a StudyConfig,
connect to (or start) Ray, decode the data once and ship it through the object store, run
trials with Ray Tune (an Optuna sampler proposes, a Ray scheduler stops early; TPE + ASHA by
default), then retrain the best configuration from scratch, evaluate it on the held-out test
split and write every output under results/<study>/. `main` tells it in stages: open (or
resume) the study, load its inputs, search, choose, retrain, write.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import numpy as np
import pandas as pd
import ray
from ray import tune
from ray.tune.error import TuneError

from crackcore import faults
from crackcore.config import (SEARCH_KEYS as SEARCH_COLUMNS, StudyConfig, TrainConfig, TrialParams, apply_overrides,
                              config_json, leave_one_out, load_study_config, trial_config)
from crackcore.data import PreparedData, prepare_data
from crackcore.exceptions import ConfigError, StorageError, StudyError, storage_error
from crackcore.metrics import format_accuracy, wilson_interval
from crackcore.model import WeightsInfo, load_backbone, resolve_weights
from crackcore.neardup import near_duplicate_leaks
from crackcore.images import CACHE_ENV, cache_dir
from crackcore.lift import TEST_SET, evaluated_sets, lift_by_set, lift_line
from crackcore.outputs import check_writable, loso_table, summary_lines, versions, write_json, write_parquet, write_run_outputs
from crackcore.sources import SYNTHETIC, check_root
from crackcore.studyfiles import (BEST_CONFIG, HISTORY, LOSO, REFERENCE_PREDICTIONS, REPEATS, STATE_HASHES, STUDY,
                                  STUDY_CONFIG, TRIALS)
from crackcore.tracking import experiment, open_store
from tune.cluster import connect_ray, final_resources, fit_remote, node_resources, put_data, trial_slots
from tune.search import (checkpoint_epochs, fail_orphaned_trials, is_setting, make_scheduler, make_searcher, restart_from_journal,
                         resume_search, stop_epochs)
from tune.storage import (OUTPUTS_DIR, RAY_DIR, RESUME_FILES, DropFinishedCheckpoints,
                          KillPoints, CheckpointWatch, StateHashes, StopOnStorageFault, SyncStudyFiles, changed_state,
                          clear_experiment, damaged_state, fetch_saved_study, has_experiment_state, ray_storage,
                          set_damaged_state_aside, study_started, sync_outputs)
from tune.tracking import RETRAIN_EVENTS, log_retrain, mark_trials, write_retrain_events
from tune.trainable import train_trial
from tune.settings import parse_flags, resolve_config, resume_conflicts
from tune.trials import (best_rule, collect_trials, earlier_trials, journal_wins, max_parallel, rank_repeats,
                         rank_trials, repeat_top, rung_fidelity)

def run_search(cfg: StudyConfig, study_dir: Path, storage: str, data_ref: Any, backbone_ref: Any, resume: bool,
               slots: int) -> Any:
    trainable = tune.with_resources(
        tune.with_parameters(train_trial, data_ref=[data_ref], train=cfg.train, backbone_ref=[backbone_ref],
                             max_epochs=cfg.max_epochs, cpus=cfg.cpus_per_trial, gpus=cfg.gpus_per_trial,
                             checkpoint_epochs=checkpoint_epochs(cfg)),
        {"cpu": cfg.cpus_per_trial, "gpu": cfg.gpus_per_trial})
    experiment = f"{storage}/{RAY_DIR}"
    # num_to_keep=1 (one checkpoint per running trial) forces an experiment-state snapshot after every
    # checkpoint, so --resume knows which one was kept; Ray warns about that frequency on
    # every short epoch. Its separate warning for a snapshot that is actually slow stays on.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    rebuild = False
    if resume and tune.Tuner.can_restore(experiment) and not has_experiment_state(experiment):
        # killed between Ray's tuner.pkl and its first snapshot: Ray cannot restore that (it logs a
        # failure and wedges), and there is no trial to continue. Start the search over; the
        # searcher reopens the journal, so Optuna keeps whatever it recorded.
        print(f"Ray's experiment at {experiment} has no saved state (the driver stopped before its first snapshot); "
              "starting the search over", flush=True)
        clear_experiment(experiment)
        resume, rebuild = False, True
    elif resume and (torn := damaged_state(experiment)):
        # a full disk cut Ray's snapshot short: Ray would log the JSON error and start over with no
        # trials, forever. The journal holds every finished trial: a new Ray search runs the rest.
        aside = set_damaged_state_aside(experiment)
        print(f"Ray's experiment state is torn or empty ({', '.join(torn)}: a write cut short, e.g. by a full disk); "
              f"set aside in {aside}: the search goes on from the Optuna journal, finished trials kept, interrupted "
              "ones run again", flush=True)
        resume, rebuild = False, True
    if resume:
        if not tune.Tuner.can_restore(experiment):
            raise StudyError(f"nothing to resume at {experiment}; run without --resume to start the study")
        # errored trials stay errored: they already spent their retries (max_failures), and the
        # restored searcher has told Optuna FAIL for them, so re-running one would split the record
        return resume_search(experiment, trainable, study_dir).fit()
    finished = restart_from_journal(study_dir, cfg.name) if rebuild else 0
    if finished >= cfg.num_samples:
        return []  # every trial is in the journal: tune.trials.journal_wins builds the table from it
    cfg = apply_overrides(cfg, {"num_samples": cfg.num_samples - finished})
    searcher = make_searcher(cfg, study_dir, start=not rebuild)
    # StateHashes before SyncStudyFiles (which mirrors its record) and KillPoints (search-start)
    callbacks = [DropFinishedCheckpoints(), StateHashes(study_dir, experiment, searcher), KillPoints(),
                 StopOnStorageFault(study_dir, storage), *([SyncStudyFiles(study_dir, storage)] if "://" in storage else [])]
    if cfg.mlflow:
        from tune.trial_runs import TrialRuns  # it loads mlflow: only for a study that logs there

        callbacks.append(TrialRuns(cfg.mlflow, cfg.name))  # restored with the rest on --resume
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(metric=cfg.metric, mode="max", search_alg=searcher,
                                    scheduler=make_scheduler(cfg), num_samples=cfg.num_samples,
                                    max_concurrent_trials=slots,  # without it OptunaSearch runs 1 trial at a time
                                    reuse_actors=True),  # a new trial starts in a warm worker: no process start, imports
        run_config=tune.RunConfig(
            name=RAY_DIR, storage_path=storage,
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),  # the one a crashed trial resumes from
            failure_config=tune.FailureConfig(max_failures=cfg.max_failures), callbacks=callbacks, verbose=1),
    )
    return tuner.fit()


def split_summary(test: dict[str, Any], data: Any, near_groups: pd.Series) -> dict[str, Any]:
    return {"test_accuracy": test["accuracy"], "n_test": test["n"], "ci95_low": test["ci95_low"],
            "ci95_high": test["ci95_high"], "errors": test["errors"], "groups": data.source["groups"],
            "exact_duplicate_files": data.source["exact_duplicate_files"],
            # by absolute file (sources may share relative paths), over the sources trained on
            "test_images_with_near_duplicate_in_train": near_duplicate_leaks(
                data.samples.assign(path=data.samples["file"])[data.samples["source"].isin(data.roles("train"))],
                near_groups)}


def compare_splits(best_cfg: TrainConfig, data: Any, result: Any, backbone_ref: Any, num_cpus: int,
                   num_gpus: float) -> dict[str, Any]:
    """Retrain the best config under the other split strategy: how much did duplicates flatter it?"""
    other = "grouped" if best_cfg.split_strategy == "random" else "random"
    other_cfg = best_cfg.replace(split_strategy=other)
    other_data = prepare_data(other_cfg)
    print(f"\n--compare-splits: retraining under the {other} split ({other_data.source['groups']} groups) ...", flush=True)
    ref = put_data(other_data)
    [other_result] = fit_remote(ref, [other_cfg], backbone_ref, num_cpus, num_gpus, True, f"{other} split")
    near_groups = (other_data if other == "grouped" else data).samples.set_index("file")["group"]
    return {best_cfg.split_strategy: split_summary(result.test, data, near_groups),
            other: split_summary(other_result.test, other_data, near_groups)}


@dataclass
class StudyRun:
    """What every stage shares: the study's resolved config, where it lives, and its inputs
    once loaded (the data and the ImageNet backbone, each put once into Ray's object store)."""

    cfg: StudyConfig
    study_dir: Path
    storage: str
    resumed: bool
    data: PreparedData | None = None
    weights: WeightsInfo | None = None
    data_ref: Any = None
    backbone_ref: Any = None
    slots: int = 0
    slot_use: dict[str, Any] | None = None  # the search's slot utilisation and where the slots' seconds went
    checkpoints: dict[str, Any] | None = None  # most checkpoint bytes on local storage at once, and the largest one
    experiment_id: str | None = None  # the study's MLflow experiment, with --mlflow
    retrain_run_id: str | None = None


def open_study(a: argparse.Namespace, flags: dict[str, Any], from_file: StudyConfig,
               configs: dict[bool, StudyConfig]) -> StudyRun | None:
    """A new study under a free name, or with --resume the saved one and its saved config; before
    Ray starts, so that a study that cannot go on says so at once. `configs`: the study's config
    without / with GPUs, as main resolved them (none for --resume); a new study gets the CPU one
    here, and `with_profile` gives it the one the cluster's devices call for. None: the study is
    already complete."""
    cfg = configs.get(False) or resolve_config(a, from_file, False, flags)  # the name is the same in both
    study_dir, storage = ray_storage(cfg, a.storage_path)
    resume = a.resume is True or (a.resume == "auto" and study_started(study_dir, storage))
    if not resume and not a.name and study_started(study_dir, storage):
        # a default-named re-run (e.g. a second `make study`) gets the next free name, never an overwrite
        base, n = cfg.name, 2
        while study_started(study_dir, storage):
            cfg = apply_overrides(cfg, {"name": f"{base}-{n}"})
            study_dir, storage = ray_storage(cfg, a.storage_path)
            n += 1
        print(f"{base!r} already exists; this run is study {cfg.name!r} ({study_dir})", flush=True)
    if not resume:
        if study_started(study_dir, storage):
            raise StudyError(f"study {cfg.name!r} already exists at {study_dir}; pass --resume to continue it or "
                             "--study-name NEW for a new one (nothing was changed)")
        return StudyRun(cfg, study_dir, storage, resumed=False)
    saved = study_dir / STUDY_CONFIG
    if not saved.is_file() and fetch_saved_study(study_dir, storage):
        print(f"fetched {', '.join(RESUME_FILES)} of study {cfg.name} from {storage}/{OUTPUTS_DIR}", flush=True)
    if not saved.is_file():
        raise StudyError(f"no study to resume at {study_dir} ({STUDY_CONFIG} missing); run without --resume")
    saved_cfg = StudyConfig(**json.loads(saved.read_text()))
    if flags.get("reference_retrain") is False and saved_cfg.reference_retrain:
        if (study_dir / BEST_CONFIG).is_file():  # written just before the retrains start
            raise StudyError(f"study {cfg.name}'s reference retrain already began (best_config.json is written); resume "
                             "it without --no-reference, or start a new study with --study-name NEW (nothing was changed)")
        saved_cfg = apply_overrides(saved_cfg, {"reference_retrain": False})  # not begun: the user may still drop it
        write_json(saved_cfg.to_dict(), saved)
    # Ray is not up yet: the saved study ran with one of the two profiles, whichever fits it
    conflicts = min((resume_conflicts(a, resolve_config(a, from_file, has_gpu, flags), saved_cfg, flags, from_file)
                     for has_gpu in (False, True)), key=len)
    if conflicts:
        raise StudyError(f"--resume continues study {cfg.name} with its saved settings, but {'; '.join(conflicts)}: "
                         "drop those flags, or start a new study with --study-name NEW")
    if (study_dir / STUDY).is_file():
        print(f"study {cfg.name} is complete ({study_dir / STUDY}); nothing to resume")
        return None
    experiment = f"{storage}/{RAY_DIR}"
    # Ray unpickles its saved state on --resume: code runs. Torn state is never read (set aside);
    # whole state must be what this study wrote (tune.storage.StateHashes)
    if has_experiment_state(experiment) and not damaged_state(experiment):
        changed = changed_state(study_dir, experiment)
        if changed and not a.trust_changed_state:
            raise StudyError(f"Ray's saved state of study {cfg.name} in {experiment} is not what this study wrote "
                             f"({', '.join(changed)}; {STATE_HASHES}): --resume unpickles it, which runs code; if you "
                             "trust this study folder, pass --trust-changed-state")
        if changed:
            print(f"warning: --trust-changed-state: resuming from Ray state that changed since the study wrote it "
                  f"({', '.join(changed)})", file=sys.stderr)
    print(f"resuming study {cfg.name} with its saved configuration ({saved})")
    return StudyRun(saved_cfg, study_dir, storage, resumed=True)


def with_profile(run: StudyRun, configs: dict[bool, StudyConfig], flags: dict[str, Any],
                 resources: dict[str, float]) -> None:
    """A new study's config for the cluster Ray found: with or without GPUs (a resumed study keeps
    its saved one)."""
    has_gpu = resources.get("GPU", 0) > 0
    if not has_gpu and flags.get("gpus_per_trial"):
        print(f"warning: --gpus-per-trial {flags['gpus_per_trial']:g} ignored: the cluster has no GPU, trials run "
              "on CPUs", file=sys.stderr)
    if not run.resumed:
        run.cfg = apply_overrides(configs[has_gpu], {"name": run.cfg.name})  # a free name open_study found


def narrow_for_random_init(cfg: StudyConfig, weights: WeightsInfo) -> StudyConfig:
    """With random init, freezing depth > 0 freezes random layers: noise, not a setting. Search
    depth 0 only, unless [space] freeze_random_init = true asks otherwise. The reference must
    still be inside the space."""
    if weights.source != "random" or cfg.space.freeze_random_init or cfg.space.freeze_depths == [0]:
        return cfg
    reference = cfg.reference_params()
    if cfg.reference_retrain and reference.freeze_depth != 0:
        raise ConfigError(f"the reference {reference.to_dict()} freezes depth {reference.freeze_depth}, but with random "
                          "init the study searches freeze depth 0 only; give a reference with freeze_depth = 0, set "
                          "[space] freeze_random_init = true, or pass --no-reference")
    print(f"weights are random init: freezing would freeze random layers, so the study searches freeze depth 0 only "
          f"(not {cfg.space.freeze_depths}; [space] freeze_random_init = true searches them anyway)", flush=True)
    return apply_overrides(cfg, {"space.freeze_depths": [0]})


def load_inputs(run: StudyRun, resources: dict[str, float]) -> None:
    """Data and weights, checked before the study folder exists (a folder holding only
    study_config.json is a start that failed before Ray's first trial, started afresh), then
    put into the object store once for the whole cluster."""
    cfg = run.cfg
    print("study config:", config_json(cfg), flush=True)
    run.slots = trial_slots(cfg, resources)
    run.data = prepare_data(cfg.train)
    run.weights = resolve_weights(cfg.train.weights)
    if not run.resumed:  # a resumed study keeps the space it saved
        run.cfg = cfg = narrow_for_random_init(cfg, run.weights)
    run.study_dir.mkdir(parents=True, exist_ok=True)
    if not run.resumed:
        write_json(cfg.to_dict(), run.study_dir / STUDY_CONFIG)
        sync_outputs(run.study_dir, run.storage, (STUDY_CONFIG,))
    print(f"data: {run.data.source['kind']} {run.data.source['root']}  {run.data.counts()}  "
          f"exact duplicates: {run.data.source['exact_duplicate_files']}\nweights: {run.weights.describe()}\n"
          f"cluster: {resources.get('CPU', 0):g} CPU, {resources.get('GPU', 0):g} GPU, "
          f"{len(node_resources())} node(s)", flush=True)
    run.data_ref = put_data(run.data)
    # (WeightsInfo, state dict) for every trial and retrain: the weights file exists on this node only
    run.backbone_ref = ray.put((run.weights, load_backbone(run.weights)))
    print(f"trials: {cfg.num_samples}, up to {run.slots} at once ({cfg.cpus_per_trial:g} CPU, {cfg.gpus_per_trial:g} "
          f"GPU each), {cfg.searcher} + {cfg.scheduler_used}, {cfg.grace_period}..{cfg.max_epochs} epochs", flush=True)


def search(run: StudyRun) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, TrialParams], int, float]:
    """Run (or resume) the trials and write trials.parquet / history.parquet. Returns the
    trials, their TrialParams, how many finished and the search's seconds."""
    t_search = time.time()
    with CheckpointWatch(f"{run.storage}/{RAY_DIR}") as watch:
        results = run_search(run.cfg, run.study_dir, run.storage, run.data_ref, run.backbone_ref, run.resumed, run.slots)
    search_seconds = time.time() - t_search
    results = list(results)
    # trials of a Ray experiment set aside (damaged state) are in the journal and their folders
    if "://" not in run.storage:
        results += earlier_trials(Path(run.storage) / RAY_DIR, results)
    trials, history, params_of = collect_trials(results, run.cfg)
    trials, params_of = journal_wins(trials, params_of, run.study_dir, run.cfg)
    # not Ray's TERMINATED: on Ctrl-C Ray marks the trials it stops TERMINATED, though they did not
    # finish (INTERRUPTED here); a trial that ran to its end, or ASHA stopped, or failed, has finished
    finished = int(trials["status"].isin(["COMPLETE", "PRUNED", "DIVERGED", "ERROR"]).sum())
    if finished >= run.cfg.num_samples:
        fail_orphaned_trials(run.study_dir, run.cfg.name)
    write_parquet(trials, run.study_dir / TRIALS)
    if len(history):
        write_parquet(history, run.study_dir / HISTORY)
    run.slot_use = slot_use(trials, history, run.slots, search_seconds, t_search if run.resumed else None)
    largest = history["checkpoint_bytes"].max() if "checkpoint_bytes" in history and len(history) else 0
    # the peak is this driver's: a resumed search's earlier drivers are not in it
    run.checkpoints = {"checkpoint_bytes_peak": watch.peak, "checkpoint_bytes_largest": int(largest)}
    if run.experiment_id:
        mark_trials(run.cfg.mlflow, run.experiment_id, trials)
    return trials, history, params_of, finished, search_seconds


@dataclass
class Choice:
    """What choose() decided: the trial to retrain, the rule in words, the ranked pool (tie set
    marked) and, with --repeat-top, the repeats' figures."""

    best: pd.Series
    rule: str
    ranked: pd.DataFrame
    repeated: dict[str, Any]

    def tie_set(self) -> list[str]:
        return self.ranked.loc[self.ranked["tied"], "trial_id"].tolist()


def choose(run: StudyRun, trials: pd.DataFrame, params_of: dict[str, TrialParams]) -> Choice:
    """The trial to retrain by best_rule (val accuracy, a tie set of the settings the data
    cannot separate, the reference then fewer trained parameters preferred inside it), or with
    --repeat-top the tie set re-run over seeds and chosen by the same rule on their means."""
    cfg = run.cfg
    reference = cfg.reference_params().to_dict()
    ranked = rank_trials(trials, cfg.metric, reference)
    choice = Choice(ranked.iloc[0], best_rule(cfg.metric), ranked, {})
    if cfg.repeat_top == 0:
        return choice
    n_complete = int((trials["status"] == "COMPLETE").sum())
    tied = int(ranked["tied"].sum())
    if n_complete < cfg.repeat_top:
        print(f"warning: --repeat-top {cfg.repeat_top} is more than the {n_complete} trial(s) that ran all max_epochs; "
              f"repeating at most {min(tied, n_complete)} (the tie set)", file=sys.stderr)
    if n_complete == 0 or tied < 2:
        print(f"--repeat-top: the tie set holds {tied} setting(s) that ran all max_epochs, nothing to separate; the "
              "single-seed rule chose", file=sys.stderr if n_complete == 0 else sys.stdout)
        return choice
    n_configs = min(cfg.repeat_top, tied)
    print(f"\nrepeating the tie set's {n_configs} setting(s) with {cfg.repeats} seeds each for {cfg.final_epochs} "
          "epochs ...", flush=True)
    repeats = repeat_top(cfg, ranked, params_of, run.data_ref, run.backbone_ref)
    ranked_repeats = rank_repeats(repeats, cfg.metric, reference)
    write_parquet(repeats.merge(ranked_repeats[["trial_id", "mean_val_acc", "ci95_low", "ci95_high", "mean_val_loss",
                                                "rule_score", "rule_se", "tied"]], on="trial_id"),
                  run.study_dir / REPEATS)
    print(ranked_repeats.drop(columns=[c for c in SEARCH_COLUMNS if c in ranked_repeats]).to_string(index=False), flush=True)
    chosen = ranked_repeats.iloc[0]
    rule = (f"the tie set of the single-seed rule (at most {cfg.repeat_top} settings, here {n_configs}) re-run with "
            f"{cfg.repeats} seeds for final_epochs = {cfg.final_epochs} (repeats.parquet), then the same rule on the "
            f"means over seeds (standard error over seeds). Single-seed rule: {choice.rule}")
    return Choice(trials[trials["trial_id"] == chosen["trial_id"]].iloc[0], rule, ranked, {
        "mean_val_acc": float(chosen["mean_val_acc"]), "ci95_low": float(chosen["ci95_low"]),
        "ci95_high": float(chosen["ci95_high"]), "mean_val_loss": float(chosen["mean_val_loss"]), "seeds": cfg.repeats,
        "configs_repeated": n_configs, "tie_set": ranked_repeats.loc[ranked_repeats["tied"], "trial_id"].tolist()})


def retrain_resources(cfg: StudyConfig, tasks: int) -> tuple[int, float]:
    """(CPUs, GPUs) of each of `tasks` retrains run side by side: final_resources, split so that
    all of them fit on the biggest node at once (the pick's and the reference's train in parallel)."""
    num_cpus, num_gpus = final_resources(cfg)
    if tasks < 2:
        return num_cpus, num_gpus
    nodes = node_resources().values()
    if num_gpus and max((r["GPU"] for r in nodes), default=0) < tasks * num_gpus:
        num_gpus = num_gpus / tasks
    if max((r["CPU"] for r in nodes), default=1) < tasks * num_cpus:
        num_cpus = max(1, num_cpus // tasks)
    return num_cpus, num_gpus


def reference_record(run: StudyRun, params: TrialParams) -> dict[str, Any]:
    """best_config.json's and final_metrics.json's "reference": which setting, whether it is the pick."""
    cfg = run.cfg
    reference = cfg.reference_params()
    is_pick = bool(is_setting(pd.DataFrame([params.to_dict()]), reference.to_dict()).iloc[0])
    return {"params": reference.to_dict(), "from": "reference" if cfg.reference is not None else "space.start_points[0]",
            "retrained": cfg.reference_retrain and not is_pick, "is_pick": is_pick}


def retrain(run: StudyRun, choice: Choice, params: TrialParams) -> tuple[Any, dict, float]:
    """best_config.json, then the chosen setting retrained from scratch for final_epochs, beside
    it (in parallel where the node holds both) the reference setting with the same data, split,
    epochs and seed, and the pick's outputs written with the lift over the reference. Returns the
    pick's FitResult, its metrics and the retrain's seconds."""
    cfg, data, best = run.cfg, run.data, choice.best
    best_cfg = trial_config(cfg.train, params, cfg.final_epochs)
    reference = reference_record(run, params)
    write_json({"trial_id": best["trial_id"], "params": params.to_dict(), "rule": choice.rule, "selection": cfg.train.selection(),
                "val_acc": float(best["last_val_acc"]), "val_loss": float(best["last_val_loss"]),
                **({"val_shift_acc": float(best["last_val_shift_acc"])} if "last_val_shift_acc" in best else {}),
                "tie_set": choice.tie_set(), "reference": reference,
                **({"repeats": choice.repeated} if choice.repeated else {}),
                "train_config": best_cfg.to_dict()}, run.study_dir / BEST_CONFIG)
    n_val = len(data.indices("val", cfg.train.selection_sources()))
    val_ci = wilson_interval(round(best["last_val_acc"] * n_val), n_val)
    cfgs = [best_cfg]
    if reference["retrained"]:
        # the shift suite is the pick's alone: the reference is compared on the evaluated sets
        cfgs.append(trial_config(cfg.train, cfg.reference_params(), cfg.final_epochs).replace(shift_suite=False))
    print(f"\nbest trial {best['trial_id']}: {params.to_dict()}  val acc "
          f"{format_accuracy(best['last_val_acc'], n_val, *val_ci)}, val loss {best['last_val_loss']:.4f}; the study "
          f"could not separate {len(choice.tie_set())} setting(s) (tie set)\n"
          f"retraining it from scratch for {cfg.final_epochs} epochs" + (
              f", and beside it the reference {reference['params']} ..." if reference["retrained"] else
              " (it is the reference setting: retrained once) ..." if reference["is_pick"] else " ..."), flush=True)
    t_final = time.time()
    num_cpus, num_gpus = retrain_resources(cfg, len(cfgs))
    [result, *ref_result] = fit_remote(run.data_ref, cfgs, run.backbone_ref, num_cpus, num_gpus, True, "final retrain")
    final_seconds = time.time() - t_final
    extra: dict[str, Any] = {"best_trial_id": best["trial_id"], "reference": reference}
    if ref_result:
        [ref] = ref_result
        extra["lift"] = lift_by_set(result, ref, data.samples.set_index(["source", "path"])["group"], seed=cfg.seed)
        reference.update(test=set_summary(ref.test), val={k: ref.val[k] for k in ("accuracy", "loss", "n")},
                         sets={name: set_summary(m) for name, m in {**ref.held_out, **ref.external}.items()},
                         seconds=ref.seconds)
        write_parquet(pd.concat([p.assign(set=name) for name, p in evaluated_sets(ref).items()], ignore_index=True),
                      run.study_dir / REFERENCE_PREDICTIONS)
    else:
        (run.study_dir / REFERENCE_PREDICTIONS).unlink(missing_ok=True)  # a resumed study's stale one
    if cfg.compare_splits:
        extra["split_comparison"] = compare_splits(best_cfg, data, result, run.backbone_ref, *final_resources(cfg))
    metrics = write_run_outputs(run.study_dir, result, data, best_cfg, extra)
    write_retrain_events(result.history, run.study_dir / RAY_DIR / RETRAIN_EVENTS)
    if run.experiment_id:
        run.retrain_run_id = log_retrain(cfg.mlflow, run.experiment_id, cfg.name, best["trial_id"], result, best_cfg,
                                         metrics, run.study_dir)
    if cfg.leave_one_out:
        num_cpus, num_gpus = final_resources(cfg)
        results = {}
        for name, held_cfg in leave_one_out(best_cfg).items():
            print(f"\nleave-one-out: retraining without {name} ...", flush=True)
            [results[name]] = fit_remote(put_data(prepare_data(held_cfg)), [held_cfg], run.backbone_ref, num_cpus,
                                         num_gpus, True, f"without {name}")
        write_parquet(table := loso_table(results), run.study_dir / LOSO)
        print(table.to_string(index=False), flush=True)
    return result, metrics, final_seconds


def set_summary(m: dict[str, Any]) -> dict[str, Any]:
    """An evaluated set's accuracy with its n and Wilson 95 % CI (final_metrics.json "reference")."""
    return {k: m[k] for k in ("accuracy", "n", "ci95_low", "ci95_high", "errors", "f1", "roc_auc")}


def lift_lines(metrics: dict[str, Any], tie_set: int) -> list[str]:
    """The summary's and the report's lines on what tuning bought, and how many settings tied."""
    reference = metrics.get("reference") or {}
    lines = [f"the study could not separate {tie_set} setting(s): the tie set" + (
        "" if tie_set > 1 else " holds the pick alone")]
    if reference.get("is_pick"):
        lines.append(f"the pick is the reference setting {reference['params']}: no lift to measure (retrained once)")
    elif not reference.get("retrained"):
        lines.append("reference not retrained (--no-reference): the lift over it is not measured")
    return lines + [lift_line(name if name != TEST_SET else "test split (in-domain)", lift)
                    for name, lift in (metrics.get("lift") or {}).items()]


def slot_use(trials: pd.DataFrame, history: pd.DataFrame, slots: int, search_seconds: float,
             since: float | None = None) -> dict[str, Any]:
    """slot_utilisation = the trials' train + eval seconds / (slots x search seconds), and the
    slots' seconds by what filled them. A resumed search counts only the epochs this driver
    ran (`since` its start): earlier drivers' epochs are not in its search seconds."""
    epochs = history if since is None or "wall_time" not in history else history[history["wall_time"] >= since]
    parts = {"train_eval": epochs["seconds"].sum() if len(epochs) else 0.0,
             "startup": trials["startup_seconds"].sum() if since is None else np.nan,
             "checkpoint_save": epochs["checkpoint_seconds"].sum() if "checkpoint_seconds" in epochs else np.nan}
    total = slots * search_seconds
    return {"slot_utilisation": float(parts["train_eval"] / total) if total else float("nan"),
            "slot_seconds": {**{k: None if pd.isna(v) else round(float(v), 2) for k, v in parts.items()},
                             "reports_uploads_and_gaps": round(float(total - np.nansum(list(parts.values()))), 2)}}


def resume_command(run: StudyRun, a: argparse.Namespace, auto: bool = False) -> str:
    """The command line that continues this study."""
    return f"python tune/run.py --study-name {run.cfg.name} --storage-path {a.storage_path} --resume" + (" auto" if auto else "")


def footprint_line(footprint: dict[str, Any], slots: int) -> str:
    written, largest, peak = (footprint[k] for k in ("checkpoint_bytes_written", "checkpoint_bytes_largest",
                                                     "checkpoint_bytes_peak"))
    held = "not sampled on URI storage" if peak is None else f"{peak / 1e6:.0f} MB"
    # the bytes left in the study folder are on the summary line above
    return (f"checkpoints: {written / 1e9:.2f} GB written, at most {held} held at once (trial slots x largest "
            f"checkpoint = {slots} x {largest / 1e6:.0f} MB)")


def study_record(run: StudyRun, a: argparse.Namespace, resources: dict[str, float], trials: pd.DataFrame,
                 history: pd.DataFrame, result: Any, choice: Choice, params: TrialParams,
                 seconds: dict[str, float]) -> dict[str, Any]:
    """What study.json holds: how the study ran, where, on what, and how long it took."""
    nodes = node_resources()
    return {
        "name": run.cfg.name, "command": shlex.join([sys.executable, *sys.argv]), "argv": sys.argv,
        "data_source": run.data.source, "weights": run.weights.to_dict(),
        "versions": {**versions(), "ray": ray.__version__, "optuna": optuna.__version__}, "seed": run.cfg.seed,
        "final_device": result.device, "final_train_precision": result.precision,
        "final_node_id": result.extra["node_id"], "cluster_resources": resources,
        "nodes": len(nodes), "node_resources": nodes,
        "ray_address": a.address or "local", "storage": run.storage, "trials": int(len(trials)),
        "trial_status": {k: int(v) for k, v in trials["status"].value_counts().items()},
        "max_parallel_trials": max_parallel(trials), "trial_slots": run.slots, **seconds,
        # the share of the search the trial slots spent training and evaluating, and where the rest went
        **run.slot_use,
        "footprint": {"checkpoint_bytes_written": int(trials["checkpoint_bytes"].sum()),
                      **run.checkpoints,
                      "bytes_left": sum(f.stat().st_size for f in run.study_dir.rglob("*") if f.is_file())},
        "best_trial_id": choice.best["trial_id"], "best_rule": choice.rule, "tie_set": choice.tie_set(),
        "reference": reference_record(run, params),
        # how well each ASHA rung's ranking predicted the last epoch's, over the trials that ran all epochs
        "fidelity": rung_fidelity(
            trials, history, stop_epochs(run.cfg) or list(range(1, run.cfg.max_epochs)), run.cfg.metric).to_dict("records"),
        "selection": run.cfg.train.selection(), "scheduler_used": run.cfg.scheduler_used, "config": run.cfg.to_dict(),
        "resumed": run.resumed, "state_sha256": STATE_HASHES,  # Ray's state as written, checked by --resume
        **({"mlflow": {"uri": run.cfg.mlflow, "experiment": run.cfg.name, "experiment_id": run.experiment_id,
                       "retrain_run_id": run.retrain_run_id}} if run.experiment_id else {}),
    }


def stopped_by_storage(exc: BaseException, folder: Path | None = None) -> str | None:
    """The one line for a study stopped by storage it cannot write, else None. Ray hands an
    error raised in a callback (StopOnStorageFault) back as a TuneError holding its traceback.
    An OSError that names no file (a write that failed at flush) is placed in `folder`."""
    if isinstance(exc, TuneError):
        mark = f"{StorageError.__module__}.{StorageError.__name__}: "
        text = str(exc)
        if line := next((line.split(mark, 1)[1] for line in reversed(text.splitlines()) if mark in line), None):
            return line
        # an OSError raised in the driver's loop (the searcher's journal append, a result file)
        # reaches here as its traceback's text
        if m := re.search(r"(?:OSError|\w+Error): \[Errno (\d+)\] ([^\n:]+)(?:: '([^'\n]+)')?", text):
            line = storage_error(OSError(int(m[1]), m[2], m[3]))
            return None if line is None else str(line)
        return None
    unnamed = isinstance(exc, OSError) and not exc.filename and folder is not None
    line = exc if isinstance(exc, StorageError) else storage_error(exc, path=folder / "study files" if unnamed else None)
    return None if line is None else str(line)


def main(argv: list[str] | None = None) -> int:
    t_start = time.time()
    faults.arm()
    a, flags = parse_flags(argv)
    from_file = load_study_config(a.config)  # bad file, flags or data folders fail before Ray starts
    if "://" not in a.storage_path:
        check_writable(a.storage_path, f"--storage-path {a.storage_path}", "pass another --storage-path")
    check_writable(cache_dir(), "the decode cache", f"set {CACHE_ENV} to a writable folder")
    if uri := a.mlflow or (None if a.resume is True else from_file.mlflow):  # a resumed study keeps its own
        flags["mlflow"] = open_store(uri, create_in=None if "://" in a.storage_path else a.storage_path)
    # both profiles, each resolved and validated once (which one applies is known once Ray is up);
    # a resumed study keeps its saved settings and sources
    configs = {} if a.resume is True else {has_gpu: resolve_config(a, from_file, has_gpu, flags) for has_gpu in (False, True)}
    if configs:
        train = configs[False].train
        train.check_sources()
        if configs[False].leave_one_out:
            leave_one_out(train)  # at least two sources
        for path in {**train.sources(), **train.external}.values():
            if path and path != SYNTHETIC:
                check_root(path)
    run = open_study(a, flags, from_file, configs)
    if run is None:
        return 0
    resources = connect_ray(a.address)
    with_profile(run, configs, flags, resources)
    if run.cfg.mlflow:  # one experiment per study: a resumed study goes on in its own
        run.experiment_id = experiment(open_store(run.cfg.mlflow), run.cfg.name, new_study=not run.resumed)
    try:
        load_inputs(run, resources)
        trials, history, params_of, finished, search_seconds = search(run)
        if finished < run.cfg.num_samples:
            print(f"study interrupted after {finished}/{run.cfg.num_samples} trials; continue it with: "
                  f"{resume_command(run, a)}", file=sys.stderr)
            return 130
        choice = choose(run, trials, params_of)
        params = params_of[choice.best["trial_id"]]
        result, metrics, final_seconds = retrain(run, choice, params)
        record = study_record(run, a, resources, trials, history, result, choice, params, {
            "search_seconds": search_seconds, "final_seconds": final_seconds, "wall_seconds": time.time() - t_start})
        write_json(record, run.study_dir / STUDY)
        sync_outputs(run.study_dir, run.storage)
        print(f"\n=== study {run.cfg.name}: {len(trials)} trials {trials['status'].value_counts().to_dict()}, up to "
              f"{max_parallel(trials)} in parallel, slots busy {100 * record['slot_utilisation']:.0f} %, study folder "
              f"{record['footprint']['bytes_left'] / 1e6:.0f} MB, wall {time.time() - t_start:.0f}s ===")
        print(footprint_line(record["footprint"], run.slots))
        print(f"best config: {params.to_dict()}  selected on {run.cfg.train.selection()}  (data: {run.data.source['kind']}, "
              f"weights: {run.weights.describe()})")
        print("\n".join(summary_lines(metrics, run.study_dir)))
        print("\n".join(lift_lines(metrics, len(choice.tie_set()))))
        print(f"tensorboard --logdir {run.study_dir / RAY_DIR}   (the trials' and the retrain's curves)")
        if run.experiment_id:
            print(f"mlflow: experiment {run.cfg.name!r} (id {run.experiment_id}) at {run.cfg.mlflow}: a run per trial "
                  f"and the retrain ({run.retrain_run_id})")
        return 0
    except (OSError, StorageError, TuneError) as exc:
        line = stopped_by_storage(exc, run.study_dir)
        if line is None:
            raise
        ray.shutdown()  # Ray's log monitor would print the failed trials' tracebacks after our line
        # the journal and Ray's snapshot are whole (see crackcore.results.open_journal): the study resumes
        raise StorageError(f"{line}; study {run.cfg.name} stopped: fix that, then continue it with: "
                           f"{resume_command(run, a, auto=True)}") from exc


if __name__ == "__main__":
    from crackcore.cli import run_main

    sys.exit(run_main(main))
