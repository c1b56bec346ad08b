"""python tune/run.py --num-samples 32

The tuning study, top to bottom: read the experiment file and flags into a StudyConfig,
connect to (or start) Ray, decode the data once and ship it through the object store, run
Optuna TPE + ASHA trials with Ray Tune, then retrain the best configuration from scratch,
evaluate it on the held-out test split and write every output under results/<study>/.
`main` tells it in stages: open (or resume) the study, load its inputs, search, choose,
retrain, write.
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
from operator import attrgetter
from pathlib import Path
from typing import Any

import optuna
import numpy as np
import pandas as pd
import ray
from ray.tune.error import TuneError

from crackcore import faults
from crackcore.config import (SPLIT_STRATEGIES, StudyConfig, TrainConfig, TrialParams, apply_overrides, config_json,
                              leave_one_out,
                              load_study_config, trial_config)
from crackcore.data import PreparedData, prepare_data
from crackcore.exceptions import ConfigError, StorageError, StudyError, storage_error
from crackcore.metrics import format_accuracy, wilson_interval
from crackcore.model import WeightsInfo, load_backbone, resolve_weights
from crackcore.neardup import near_duplicate_leaks
from crackcore.images import CACHE_ENV, cache_dir
from crackcore.outputs import check_writable, loso_table, summary_lines, versions, write_json, write_parquet, write_run_outputs
from crackcore.sources import EMBEDDED_SAMPLE, SYNTHETIC, check_root, data_setting, parse_sources
from crackcore.tracking import experiment, open_store
from tune.cluster import connect_ray, final_resources, fit_remote, node_resources, put_data, trial_slots
from tune.search import (checkpoint_epochs, fail_orphaned_trials, make_scheduler, make_searcher, restart_from_journal,
                         resume_search)
from tune.storage import (CONFIG_FILE, OUTPUTS_DIR, RAY_DIR, RESUME_FILES, STATE_HASHES, DropFinishedCheckpoints,
                          KillPoints, CheckpointWatch, StateHashes, StopOnStorageFault, SyncStudyFiles, changed_state,
                          clear_experiment, damaged_state, fetch_saved_study, has_experiment_state, ray_storage,
                          set_damaged_state_aside, study_started, sync_outputs)
from tune.tracking import RETRAIN_EVENTS, TrialRuns, log_retrain, mark_trials, write_retrain_events
from tune.trainable import train_trial
from tune.trials import (best_rule, collect_trials, earlier_trials, journal_wins, max_parallel, pick_best, rank_repeats,
                         repeat_top)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_EXPERIMENT = REPO / "experiments" / "study.toml"
DOWNLOAD_DEFAULT = REPO / "data" / "concrete-crack-images"
SMOKE = {"num_samples": 4, "max_epochs": 2, "grace_period": 1, "final_epochs": 2, "train.image_size": 32,
         "train.subset": 40, "train.synthetic_per_class": 60}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python tune/run.py", description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", type=Path, default=DEFAULT_EXPERIMENT, help="experiment TOML under experiments/")
    p.add_argument("--num-samples", type=int, help="number of trials")
    p.add_argument("--data", action="append", metavar="[NAME=]PATH",
                   help="a crack/no-crack folder, repeatable for several sources, or `synthetic` (default "
                   "$CRACK_DATA, then data/concrete-crack-images, then the experiment file, else the embedded real "
                   "sample)")
    p.add_argument("--group-by", help="regex: file names with the same first capture group (one photo) share a split")
    p.add_argument("--val-source", help="a --data source never trained on: trials and the best trial are scored on it")
    p.add_argument("--test-source", help="a --data source used only for the final evaluation")
    p.add_argument("--eval", action="append", metavar="NAME=PATH", help="labelled folder the final model is evaluated on")
    p.add_argument("--leave-one-out", action="store_true", default=None,
                   help="retrain the chosen setting once per source with that source held out (loso.parquet)")
    p.add_argument("--study-name", help="results go to STORAGE/STUDY-NAME")
    p.add_argument("--storage-path", default="results", help="local folder or URI (s3://, gs://) shared by all nodes")
    p.add_argument("--address", default=os.environ.get("RAY_ADDRESS"),
                   help="existing Ray cluster (host:port or auto); default $RAY_ADDRESS, else a local Ray")
    p.add_argument("--resume", nargs="?", const=True, default=False, metavar="auto",
                   help="continue an interrupted study with this name; `--resume auto`: continue it if it exists and "
                   "is unfinished, start it if it does not, leave a finished one alone (a restarted driver pod)")
    p.add_argument("--trust-changed-state", action="store_true",
                   help="--resume a study whose saved Ray state (pickles: resuming runs them) changed since the study "
                   "wrote it; only for a study folder you trust")
    p.add_argument("--max-epochs", type=int)
    p.add_argument("--grace-period", type=int)
    p.add_argument("--final-epochs", type=int)
    p.add_argument("--image-size", type=int)
    p.add_argument("--subset", type=int, help="images per class, for quick runs")
    p.add_argument("--gpus-per-trial", type=float, help="fractional packs trials per GPU, e.g. 0.25 = 4 per GPU")
    p.add_argument("--cpus-per-trial", type=float)
    p.add_argument("--max-concurrent-trials", type=int, help="default: as many as the resources allow")
    p.add_argument("--seed", type=int)
    p.add_argument("--weights", help="auto | imagenet | random | PATH to resnet18-f37072fd.pth")
    p.add_argument("--split-strategy", choices=SPLIT_STRATEGIES)
    p.add_argument("--repeat-top", type=int, help="re-run the top K configs with --repeats seeds")
    p.add_argument("--repeats", type=int)
    p.add_argument("--compare-splits", action=argparse.BooleanOptionalAction,
                   help="also retrain the best config under the other split strategy")
    p.add_argument("--mlflow", metavar="URI", help="record every trial and the final retrain as MLflow runs of an "
                   "experiment named after the study, e.g. sqlite:///results/mlflow.db")
    p.add_argument("--no-shift-suite", dest="shift_suite", action="store_const", const=False,
                   help="skip the shift suite on the test split after the final retrain")
    p.add_argument("--smoke-test", action="store_true", help="tiny budget: 4 trials x 2 epochs at 32 px")
    return p


def flag_overrides(a: argparse.Namespace) -> dict[str, Any]:
    data = data_setting(a.data) or os.environ.get("CRACK_DATA") or (str(DOWNLOAD_DEFAULT) if DOWNLOAD_DEFAULT.is_dir()
                                                                     else None)
    if isinstance(data, str) and data != SYNTHETIC:  # one spelling, saved and compared on --resume (parse_sources resolves the others)
        data = str(Path(data).expanduser().resolve())
    return {"num_samples": a.num_samples, "name": a.study_name, "max_epochs": a.max_epochs,
            "grace_period": a.grace_period, "final_epochs": a.final_epochs, "gpus_per_trial": a.gpus_per_trial,
            "cpus_per_trial": a.cpus_per_trial, "max_concurrent_trials": a.max_concurrent_trials, "seed": a.seed,
            "repeat_top": a.repeat_top, "repeats": a.repeats, "compare_splits": a.compare_splits,
            "leave_one_out": a.leave_one_out, "train.group_by": a.group_by, "train.val_source": a.val_source,
            "train.test_source": a.test_source, "train.external": parse_sources(a.eval) if a.eval else None,
            "train.data": data, "train.image_size": a.image_size, "train.subset": a.subset,
            "train.weights": a.weights, "train.split_strategy": a.split_strategy, "train.shift_suite": a.shift_suite,
            "train.seed": a.seed, "mlflow": a.mlflow}


def resume_conflicts(a: argparse.Namespace, cfg: StudyConfig, saved: StudyConfig,
                     flags: dict[str, Any] | None = None, from_file: StudyConfig | None = None) -> list[str]:
    """Flags given with --resume that disagree with the saved study: a resumed study keeps its
    settings, so such a flag would be silently ignored (the experiment file is not re-read). A
    --config file given with --resume counts as flags: each setting it makes (`from_file`)."""
    wanted = {k: v for k, v in (flags or flag_overrides(a)).items() if v is not None and k != "name"}
    if a.data is None:
        wanted.pop("train.data", None)  # $CRACK_DATA or the download folder, not the user's words now
    if a.smoke_test:
        wanted = {**{k: attrgetter(k)(cfg) for k in SMOKE}, **wanted}
    conflicts = [f"{k} is {attrgetter(k)(saved)!r} there, not {v!r}" for k, v in sorted(wanted.items())
                 if attrgetter(k)(saved) != v]
    if from_file is not None and a.config != DEFAULT_EXPERIMENT:
        # the file given now: what it sets (top level or in a profile) must be the study's setting too
        file, default = _flat(from_file.to_dict()), _flat(StudyConfig().to_dict())
        sets = {k for k in file if k not in PROFILES and file[k] != default.get(k)}
        sets |= {k for p in PROFILES for k in getattr(from_file, p) or {}}
        now, then = _flat(cfg.to_dict()), _flat(saved.to_dict())
        conflicts += [f"{k} is {then.get(k)!r} there, not {now.get(k)!r} (--config {a.config})"
                      for k in sorted(sets - {"name", *wanted}) if k in now and now[k] != then.get(k)]
    return conflicts


PROFILES = ("cpu", "gpu")  # StudyConfig's per-hardware overrides, already in the form "train.subset"


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"subset": 40}} as {"train.subset": 40}; the profiles stay whole."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) and k not in PROFILES else {f"{prefix}{k}": v})
    return out


def resolve_config(a: argparse.Namespace, from_file: StudyConfig, has_gpu: bool,
                   flags: dict[str, Any] | None = None, warn: bool = True) -> StudyConfig:
    """Defaults < experiment file < its [cpu]/[gpu] profile < --smoke-test < flags (`flags`:
    flag_overrides(a), resolved once by main). With GPUs and no gpus_per_trial from file or
    flag, trials pack 4 per GPU."""
    cfg = apply_overrides(from_file, from_file.gpu if has_gpu else from_file.cpu)
    if a.smoke_test:
        cfg = apply_overrides(cfg, {**SMOKE, "num_samples": min(cfg.num_samples, SMOKE["num_samples"])})
    flags = dict(flags or flag_overrides(a))
    if flags["max_epochs"] is not None and flags["grace_period"] is None:
        flags["grace_period"] = min(cfg.grace_period, flags["max_epochs"])
    cfg = apply_overrides(cfg, flags)
    if cfg.train.data is None:  # nothing from flags, $CRACK_DATA, the download folder or the file
        cfg = apply_overrides(cfg, {"train.data": str(EMBEDDED_SAMPLE)})
    if not has_gpu:
        if flags["gpus_per_trial"] and warn:
            print(f"warning: --gpus-per-trial {flags['gpus_per_trial']:g} ignored: the cluster has no GPU, trials run "
                  "on CPUs", file=sys.stderr)
        return apply_overrides(cfg, {"gpus_per_trial": 0.0})
    if cfg.gpus_per_trial is None:  # set nowhere; an explicit 0 (file or flag) keeps trials on CPUs
        return apply_overrides(cfg, {"gpus_per_trial": 0.25})
    return cfg


def run_search(cfg: StudyConfig, study_dir: Path, storage: str, data_ref: Any, backbone_ref: Any, resume: bool,
               slots: int) -> Any:
    from ray import tune

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
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(metric=cfg.metric, mode="max", search_alg=searcher,
                                    scheduler=make_scheduler(cfg), num_samples=cfg.num_samples,
                                    max_concurrent_trials=slots,  # without it OptunaSearch runs 1 trial at a time
                                    reuse_actors=True),  # a new trial starts in a warm worker: no process start, imports
        run_config=tune.RunConfig(
            name=RAY_DIR, storage_path=storage,
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),  # the one a crashed trial resumes from
            failure_config=tune.FailureConfig(max_failures=cfg.max_failures),
            # StateHashes before SyncStudyFiles (which mirrors its record) and KillPoints (search-start)
            callbacks=[DropFinishedCheckpoints(), StateHashes(study_dir, experiment, searcher), KillPoints(),
                       StopOnStorageFault(study_dir, storage),
                       *([SyncStudyFiles(study_dir, storage)] if "://" in storage else []),
                       *([TrialRuns(cfg.mlflow, cfg.name)] if cfg.mlflow else [])],  # restored with the rest on --resume
            verbose=1),
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


def parse_flags(argv: list[str] | None) -> tuple[argparse.Namespace, dict[str, Any]]:
    """The command line and its overrides of the experiment file, resolved once. Counts are
    checked here, before Ray starts, in the flags' own words."""
    a = build_parser().parse_args(argv)
    if a.resume not in (False, True, "auto"):
        raise ConfigError(f"--resume takes no value, or 'auto' (got {a.resume!r})")
    for name in ("num_samples", "max_epochs", "final_epochs", "image_size", "subset"):
        value = getattr(a, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1 (got {value})")
    return a, flag_overrides(a)


def open_study(a: argparse.Namespace, flags: dict[str, Any], from_file: StudyConfig,
               resources: dict[str, float]) -> StudyRun | None:
    """A new study under a free name, or with --resume the saved one and its saved config.
    None: the study is already complete."""
    cfg = resolve_config(a, from_file, resources.get("GPU", 0) > 0, flags)
    study_dir, storage = ray_storage(cfg, a.storage_path)
    resume = a.resume is True or (a.resume == "auto" and study_started(study_dir, storage))
    if not resume and not a.study_name and study_started(study_dir, storage):
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
    saved = study_dir / CONFIG_FILE
    if not saved.is_file() and fetch_saved_study(study_dir, storage):
        print(f"fetched {', '.join(RESUME_FILES)} of study {cfg.name} from {storage}/{OUTPUTS_DIR}", flush=True)
    if not saved.is_file():
        raise StudyError(f"no study to resume at {study_dir} ({CONFIG_FILE} missing); run without --resume")
    saved_cfg = apply_overrides(StudyConfig(**json.loads(saved.read_text())), {})
    conflicts = resume_conflicts(a, cfg, saved_cfg, flags, from_file)
    if conflicts:
        raise StudyError(f"--resume continues study {cfg.name} with its saved settings, but {'; '.join(conflicts)}: "
                         "drop those flags, or start a new study with --study-name NEW")
    if (study_dir / "study.json").is_file():
        print(f"study {cfg.name} is complete ({study_dir / 'study.json'}); nothing to resume")
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


def load_inputs(run: StudyRun, resources: dict[str, float]) -> None:
    """Data and weights, checked before the study folder exists (a folder holding only
    study_config.json is a start that failed before Ray's first trial, started afresh), then
    put into the object store once for the whole cluster."""
    cfg = run.cfg
    print("study config:", config_json(cfg), flush=True)
    run.slots = trial_slots(cfg, resources)
    run.data = prepare_data(cfg.train)
    run.weights = resolve_weights(cfg.train.weights)
    run.study_dir.mkdir(parents=True, exist_ok=True)
    if not run.resumed:
        write_json(cfg.to_dict(), run.study_dir / CONFIG_FILE)
        sync_outputs(run.study_dir, run.storage, (CONFIG_FILE,))
    print(f"data: {run.data.source['kind']} {run.data.source['root']}  {run.data.counts()}  "
          f"exact duplicates: {run.data.source['exact_duplicate_files']}\nweights: {run.weights.describe()}\n"
          f"cluster: {resources.get('CPU', 0):g} CPU, {resources.get('GPU', 0):g} GPU, "
          f"{len(node_resources())} node(s)", flush=True)
    run.data_ref = put_data(run.data)
    # (WeightsInfo, state dict) for every trial and retrain: the weights file exists on this node only
    run.backbone_ref = ray.put((run.weights, load_backbone(run.weights)))
    print(f"trials: {cfg.num_samples}, up to {run.slots} at once ({cfg.cpus_per_trial:g} CPU, {cfg.gpus_per_trial:g} "
          f"GPU each), ASHA {cfg.grace_period}..{cfg.max_epochs} epochs", flush=True)


def search(run: StudyRun) -> tuple[pd.DataFrame, dict[str, TrialParams], int, float]:
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
    write_parquet(trials, run.study_dir / "trials.parquet")
    if len(history):
        write_parquet(history, run.study_dir / "history.parquet")
    run.slot_use = slot_use(trials, history, run.slots, search_seconds, t_search if run.resumed else None)
    largest = history["checkpoint_bytes"].max() if "checkpoint_bytes" in history and len(history) else 0
    # the peak is this driver's: a resumed search's earlier drivers are not in it
    run.checkpoints = {"checkpoint_bytes_peak": watch.peak, "checkpoint_bytes_largest": int(largest)}
    if run.experiment_id:
        mark_trials(run.cfg.mlflow, run.experiment_id, trials)
    return trials, params_of, finished, search_seconds


def choose(run: StudyRun, trials: pd.DataFrame, params_of: dict[str, TrialParams]) -> tuple[pd.Series, str, dict]:
    """The trial to retrain (best_rule, or the best mean over seeds with --repeat-top), the
    rule that chose it and the repeats' figures."""
    cfg = run.cfg
    best = pick_best(trials, cfg.metric)
    n_complete = int((trials["status"] == "COMPLETE").sum())
    if cfg.repeat_top > 0 and n_complete == 0:
        print("warning: no trial ran all max_epochs, so there is nothing for --repeat-top to repeat; the best trial "
              "is chosen by the single-seed rule", file=sys.stderr)
    if cfg.repeat_top == 0 or n_complete == 0:
        return best, best_rule(cfg.metric), {}
    n_configs = min(cfg.repeat_top, n_complete)  # only trials that ran all max_epochs are repeated
    print(f"\nrepeating the top {n_configs} complete trial(s) with {cfg.repeats} seeds each ...", flush=True)
    repeats = repeat_top(cfg, trials, params_of, run.data_ref, run.backbone_ref)
    ranked = rank_repeats(repeats)
    write_parquet(repeats.merge(ranked[["trial_id", "mean_val_acc", "ci95_low", "ci95_high"]], on="trial_id"),
                  run.study_dir / "repeats.parquet")
    print(ranked.to_string(index=False), flush=True)
    chosen = ranked.iloc[0]
    rule = (f"highest mean val accuracy over {cfg.repeats} seeds among the top {n_configs} trials that ran all "
            "max_epochs (repeats.parquet); ties: lower mean val loss")
    return trials[trials["trial_id"] == chosen["trial_id"]].iloc[0], rule, {
        "mean_val_acc": float(chosen["mean_val_acc"]), "ci95_low": float(chosen["ci95_low"]),
        "ci95_high": float(chosen["ci95_high"]), "seeds": cfg.repeats, "configs_repeated": n_configs}


def retrain(run: StudyRun, best: pd.Series, params: TrialParams, rule: str, repeated: dict) -> tuple[Any, dict, float]:
    """best_config.json, then the chosen setting retrained from scratch for final_epochs and
    its outputs written. Returns the FitResult, its metrics and the retrain's seconds."""
    cfg, data = run.cfg, run.data
    best_cfg = trial_config(cfg.train, params, cfg.final_epochs)
    write_json({"trial_id": best["trial_id"], "params": params.to_dict(), "rule": rule, "selection": cfg.train.selection(),
                "val_acc": float(best["last_val_acc"]), "val_loss": float(best["last_val_loss"]),
                **({"val_shift_acc": float(best["last_val_shift_acc"])} if "last_val_shift_acc" in best else {}),
                **({"repeats": repeated} if repeated else {}),
                "train_config": best_cfg.to_dict()}, run.study_dir / "best_config.json")
    n_val = len(data.indices("val", cfg.train.selection_sources()))
    val_ci = wilson_interval(round(best["last_val_acc"] * n_val), n_val)
    print(f"\nbest trial {best['trial_id']}: {params.to_dict()}  val acc "
          f"{format_accuracy(best['last_val_acc'], n_val, *val_ci)}\n"
          f"retraining it from scratch for {cfg.final_epochs} epochs ...", flush=True)
    t_final = time.time()
    num_cpus, num_gpus = final_resources(cfg)
    [result] = fit_remote(run.data_ref, [best_cfg], run.backbone_ref, num_cpus, num_gpus, True, "final retrain")
    final_seconds = time.time() - t_final
    extra: dict[str, Any] = {"best_trial_id": best["trial_id"]}
    if cfg.compare_splits:
        extra["split_comparison"] = compare_splits(best_cfg, data, result, run.backbone_ref, num_cpus, num_gpus)
    metrics = write_run_outputs(run.study_dir, result, data, best_cfg, extra)
    write_retrain_events(result.history, run.study_dir / RAY_DIR / RETRAIN_EVENTS)
    if run.experiment_id:
        run.retrain_run_id = log_retrain(cfg.mlflow, run.experiment_id, cfg.name, best["trial_id"], result, best_cfg,
                                         metrics, run.study_dir)
    if cfg.leave_one_out:
        results = {}
        for name, held_cfg in leave_one_out(best_cfg).items():
            print(f"\nleave-one-out: retraining without {name} ...", flush=True)
            [results[name]] = fit_remote(put_data(prepare_data(held_cfg)), [held_cfg], run.backbone_ref, num_cpus,
                                         num_gpus, True, f"without {name}")
        write_parquet(table := loso_table(results), run.study_dir / "loso.parquet")
        print(table.to_string(index=False), flush=True)
    return result, metrics, final_seconds


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
                 result: Any, best_trial_id: str, rule: str, seconds: dict[str, float]) -> dict[str, Any]:
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
        "best_trial_id": best_trial_id, "best_rule": rule, "selection": run.cfg.train.selection(), "config": run.cfg.to_dict(),
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
    if a.resume is not True:  # a resumed study keeps its saved sources
        train = apply_overrides(from_file, {k: v for k, v in flags.items() if k.startswith("train.")}).train
        train.check_sources()
        if a.leave_one_out or from_file.leave_one_out:
            leave_one_out(train)  # at least two sources
        for path in {**train.sources(), **train.external}.values():
            if path and path != SYNTHETIC:
                check_root(path)
        for has_gpu in (False, True):  # ranges of both profiles (which one applies is known once Ray is up)
            resolve_config(a, from_file, has_gpu, flags, warn=False)
    if "://" not in a.storage_path:
        check_writable(a.storage_path, f"--storage-path {a.storage_path}", "pass another --storage-path")
    check_writable(cache_dir(), "the decode cache", f"set {CACHE_ENV} to a writable folder")
    if uri := a.mlflow or (None if a.resume is True else from_file.mlflow):  # a resumed study keeps its own
        flags["mlflow"] = open_store(uri, create_in=None if "://" in a.storage_path else a.storage_path)
    resources = connect_ray(a.address)
    run = open_study(a, flags, from_file, resources)
    if run is None:
        return 0
    if run.cfg.mlflow:  # one experiment per study: a resumed study goes on in its own
        run.experiment_id = experiment(open_store(run.cfg.mlflow), run.cfg.name, new_study=not run.resumed)
    try:
        load_inputs(run, resources)
        trials, params_of, finished, search_seconds = search(run)
        if finished < run.cfg.num_samples:
            print(f"study interrupted after {finished}/{run.cfg.num_samples} trials; continue it with: "
                  f"{resume_command(run, a)}", file=sys.stderr)
            return 130
        best, rule, repeated = choose(run, trials, params_of)
        params = params_of[best["trial_id"]]
        result, metrics, final_seconds = retrain(run, best, params, rule, repeated)
        record = study_record(run, a, resources, trials, result, best["trial_id"], rule, {
            "search_seconds": search_seconds, "final_seconds": final_seconds, "wall_seconds": time.time() - t_start})
        write_json(record, run.study_dir / "study.json")
        sync_outputs(run.study_dir, run.storage)
        print(f"\n=== study {run.cfg.name}: {len(trials)} trials {trials['status'].value_counts().to_dict()}, up to "
              f"{max_parallel(trials)} in parallel, slots busy {100 * record['slot_utilisation']:.0f} %, study folder "
              f"{record['footprint']['bytes_left'] / 1e6:.0f} MB, wall {time.time() - t_start:.0f}s ===")
        print(footprint_line(record["footprint"], run.slots))
        print(f"best config: {params.to_dict()}  selected on {run.cfg.train.selection()}  (data: {run.data.source['kind']}, "
              f"weights: {run.weights.describe()})")
        print("\n".join(summary_lines(metrics, run.study_dir)))
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
