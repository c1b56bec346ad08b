"""python tune/run.py --num-samples 32

The tuning study, top to bottom: read the experiment file and flags into a StudyConfig,
connect to (or start) Ray, decode the data once and ship it through the object store, run
Optuna TPE + ASHA trials with Ray Tune, then retrain the best configuration from scratch,
evaluate it on the held-out test split and write every output under results/<study>/.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import socket
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from crackcore.config import (SEARCH_KEYS, SPLIT_STRATEGIES, ConfigError, StudyConfig, TrainConfig,
                              apply_overrides, config_json, load_study_config)
from crackcore.data import check_root, prepare_data
from crackcore.errors import write_json, write_parquet
from crackcore.fit import summary_lines, versions, write_run_outputs
from crackcore.metrics import format_accuracy, wilson_interval
from crackcore.model import load_backbone, resolve_weights
from crackcore.train import fit
from tune.storage import (CONFIG_FILE, OUTPUTS_DIR, RAY_DIR, RESUME_FILES, SyncStudyFiles, fetch_saved_study,
                          ray_storage, study_started, sync_outputs)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_EXPERIMENT = REPO / "experiments" / "study.toml"
DOWNLOAD_DEFAULT = REPO / "data" / "concrete-crack-images"
SMOKE = {"num_samples": 4, "max_epochs": 2, "grace_period": 1, "final_epochs": 2, "train.image_size": 32,
         "train.subset": 40, "train.synthetic_per_class": 60}


class StudyError(Exception):
    """The study cannot start or go on; the message says why and what to do."""


# --------------------------------------------------------------------------- configuration


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python tune/run.py", description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", type=Path, default=DEFAULT_EXPERIMENT, help="experiment TOML under experiments/")
    p.add_argument("--num-samples", type=int, help="number of trials")
    p.add_argument("--data", help="folder with Positive/ Negative/ (default $CRACK_DATA, then data/concrete-crack-images, "
                   "else the synthetic set)")
    p.add_argument("--study-name", help="results go to STORAGE/STUDY-NAME")
    p.add_argument("--storage-path", default="results", help="local folder or URI (s3://, gs://) shared by all nodes")
    p.add_argument("--address", default=os.environ.get("RAY_ADDRESS"),
                   help="existing Ray cluster (host:port or auto); default $RAY_ADDRESS, else a local Ray")
    p.add_argument("--resume", action="store_true", help="continue an interrupted study with this name")
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
    p.add_argument("--smoke-test", action="store_true", help="tiny budget: 4 trials x 2 epochs at 32 px")
    return p


def flag_overrides(a: argparse.Namespace) -> dict[str, Any]:
    data = a.data or os.environ.get("CRACK_DATA") or (str(DOWNLOAD_DEFAULT) if DOWNLOAD_DEFAULT.is_dir() else None)
    data = str(Path(data).expanduser().resolve()) if data else None  # one spelling, saved and compared on --resume
    return {"num_samples": a.num_samples, "name": a.study_name, "max_epochs": a.max_epochs,
            "grace_period": a.grace_period, "final_epochs": a.final_epochs, "gpus_per_trial": a.gpus_per_trial,
            "cpus_per_trial": a.cpus_per_trial, "max_concurrent_trials": a.max_concurrent_trials, "seed": a.seed,
            "repeat_top": a.repeat_top, "repeats": a.repeats, "compare_splits": a.compare_splits,
            "train.data": data, "train.image_size": a.image_size, "train.subset": a.subset,
            "train.weights": a.weights, "train.split_strategy": a.split_strategy,
            "train.seed": a.seed}


def setting(cfg: StudyConfig, key: str) -> Any:
    """The value of a dotted key ("max_epochs", "train.image_size")."""
    value: Any = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value


def resume_conflicts(a: argparse.Namespace, cfg: StudyConfig, saved: StudyConfig) -> list[str]:
    """Flags given with --resume that disagree with the saved study: a resumed study keeps its
    settings, so such a flag would be silently ignored (the experiment file is not re-read)."""
    wanted = {k: v for k, v in flag_overrides(a).items() if v is not None and k != "name"}
    if a.data is None:
        wanted.pop("train.data", None)  # $CRACK_DATA or the download folder, not the user's words now
    if a.smoke_test:
        wanted = {**{k: setting(cfg, k) for k in SMOKE}, **wanted}
    return [f"{k} is {setting(saved, k)!r} there, not {v!r}" for k, v in sorted(wanted.items())
            if setting(saved, k) != v]


def resolve_config(a: argparse.Namespace, from_file: StudyConfig, has_gpu: bool) -> StudyConfig:
    """Defaults < experiment file < its [cpu]/[gpu] profile < --smoke-test < flags. With GPUs
    and no gpus_per_trial from file or flag, trials pack 4 per GPU."""
    cfg = apply_overrides(from_file, from_file.gpu if has_gpu else from_file.cpu)
    if a.smoke_test:
        cfg = apply_overrides(cfg, {k: v for k, v in SMOKE.items() if k != "num_samples"})
        cfg = apply_overrides(cfg, {"num_samples": min(cfg.num_samples, SMOKE["num_samples"])})
    flags = flag_overrides(a)
    if flags["max_epochs"] is not None and flags["grace_period"] is None:
        flags["grace_period"] = min(cfg.grace_period, flags["max_epochs"])
    cfg = apply_overrides(cfg, flags)
    if not has_gpu:
        return apply_overrides(cfg, {"gpus_per_trial": 0.0})
    if cfg.gpus_per_trial is None:  # set nowhere; an explicit 0 (file or flag) keeps trials on CPUs
        return apply_overrides(cfg, {"gpus_per_trial": 0.25})
    return cfg


# --------------------------------------------------------------------------- Ray


def connect_ray(address: str | None) -> dict[str, Any]:
    import ray

    if address and address.startswith("ray://"):
        # under Ray Client the Tuner runs on the head while our journal and outputs are local paths
        raise StudyError(f"--address {address}: Ray Client (ray://) is not supported; submit the study with "
                         "`ray job submit --address http://HEAD:8265 -- python tune/run.py ...`, or run it on the "
                         "head node with --address auto")
    if address and "://" not in address and address != "auto":
        host, _, port = address.rpartition(":")
        try:
            socket.create_connection((host or "127.0.0.1", int(port)), timeout=5).close()
        except (OSError, ValueError) as exc:
            raise StudyError(f"cannot reach a Ray cluster at {address} ({exc}); start one with `ray start --head "
                             f"--port={port or 6379}` or drop --address to run locally") from None
    try:
        if address:
            ray.init(address=address, logging_level="WARNING", log_to_driver=True)
        else:
            from crackcore.train import available_cpus

            ray.init(num_cpus=available_cpus(), include_dashboard=False, logging_level="WARNING",
                     _node_ip_address="127.0.0.1")
    except ConnectionError as exc:
        raise StudyError(f"cannot connect to Ray at {address}: {str(exc).splitlines()[0]}; check the address "
                         "(ray status) or drop --address") from None
    except ValueError as exc:  # ray.init() found a cluster started with `ray start` on this machine
        if "existing cluster" not in str(exc):
            raise
        raise StudyError("a Ray cluster is already running on this machine; pass --address auto to run the study "
                         "on it, or stop it with `ray stop`") from None
    return ray.cluster_resources()


def trial_slots(cfg: StudyConfig, resources: dict[str, float]) -> int:
    """Trials running at once: what the cluster holds now, or --max-concurrent-trials when given.
    The cap also bounds how many points TPE proposes before seeing results; on an autoscaling
    cluster give it explicitly, so pending trials make Ray add nodes."""
    slots = int(resources.get("CPU", 0) // cfg.cpus_per_trial)
    if cfg.gpus_per_trial > 0:
        slots = min(slots, int(resources.get("GPU", 0) // cfg.gpus_per_trial))
    if cfg.max_concurrent_trials:
        return min(cfg.max_concurrent_trials, cfg.num_samples)
    if slots < 1:
        raise StudyError(f"one trial needs {cfg.cpus_per_trial:g} CPU / {cfg.gpus_per_trial:g} GPU but the cluster has "
                         f"{resources.get('CPU', 0):g} CPU / {resources.get('GPU', 0):g} GPU; lower --cpus-per-trial")
    return min(slots, cfg.num_samples)


# --------------------------------------------------------------------------- search


def run_search(cfg: StudyConfig, study_dir: Path, storage: str, data_ref: Any, backbone_ref: Any, resume: bool,
               slots: int) -> Any:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from tune.search import EpochAwareOptunaSearch, make_searcher
    from tune.trainable import train_trial

    base = {k: v for k, v in cfg.train.to_dict().items() if k not in ("epochs",)}
    trainable = tune.with_resources(
        tune.with_parameters(train_trial, data_ref=[data_ref], base=base, backbone_ref=[backbone_ref],
                             max_epochs=cfg.max_epochs, cpus=cfg.cpus_per_trial, gpus=cfg.gpus_per_trial),
        {"cpu": cfg.cpus_per_trial, "gpu": cfg.gpus_per_trial})
    experiment = f"{storage}/{RAY_DIR}"
    # num_to_keep=1 (checkpoints are ~86 MB) forces an experiment-state snapshot after every
    # checkpoint, so --resume knows which one was kept; Ray warns about that frequency on
    # every short epoch. Its separate warning for a snapshot that is actually slow stays on.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    if resume:
        if not tune.Tuner.can_restore(experiment):
            raise StudyError(f"nothing to resume at {experiment}; run without --resume to start the study")
        # errored trials stay errored: they already spent their retries (max_failures), and the
        # restored searcher has told Optuna FAIL for them, so re-running one would split the record
        EpochAwareOptunaSearch.resume_study_dir = study_dir  # the journal here, wherever the study began
        return tune.Tuner.restore(experiment, trainable=trainable).fit()
    scheduler = ASHAScheduler(time_attr="epoch", max_t=cfg.max_epochs, grace_period=cfg.grace_period,
                              reduction_factor=cfg.reduction_factor)
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(metric=cfg.metric, mode="max", search_alg=make_searcher(cfg, study_dir),
                                    scheduler=scheduler, num_samples=cfg.num_samples,
                                    max_concurrent_trials=slots),  # without it OptunaSearch runs 1 trial at a time
        run_config=tune.RunConfig(
            name=RAY_DIR, storage_path=storage,
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),  # ~86 MB each
            failure_config=tune.FailureConfig(max_failures=cfg.max_failures),
            callbacks=[SyncStudyFiles(study_dir, storage)] if "://" in storage else None,
            verbose=1),
    )
    return tuner.fit()


def collect_trials(results: Any, cfg: StudyConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """trials.parquet (one row per trial) and history.parquet (one row per trial-epoch)."""
    trials, history = [], []
    for r in results:
        hist = r.metrics_dataframe if r.metrics_dataframe is not None else pd.DataFrame()
        trial_id = (r.metrics or {}).get("trial_id") or Path(r.path).name
        config = r.config or {}  # None for a trial still pending when the study was interrupted
        params = {k: config[k] for k in SEARCH_KEYS if k in config}
        if len(hist) and "epoch" in hist:
            hist = hist.drop_duplicates("epoch", keep="last").sort_values("epoch")
            h = hist[["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "current_lr", "seconds", "train_img_s",
                      "node_id", "timestamp"]].assign(trial_id=trial_id, **params)
            history.append(h)
        epochs = int(hist["epoch"].max()) if len(hist) and "epoch" in hist else 0
        diverged = "diverged" in hist and bool(hist["diverged"].iloc[-1] == True)  # noqa: E712 (NaN: False)
        # not done: stopped by Ctrl-C / a lost driver, not by ASHA (--resume continues it)
        status = ("ERROR" if r.error else "DIVERGED" if diverged else "COMPLETE" if epochs >= cfg.max_epochs else
                  "PRUNED" if (r.metrics or {}).get("done") else "INTERRUPTED")
        last = hist.iloc[-1] if len(hist) else None
        clock = hist["wall_time"] if "wall_time" in hist else hist.get("timestamp")
        trials.append({
            "trial_id": trial_id, **params, "status": status, "epochs": epochs,
            "best_val_acc": float(hist["val_acc"].max()) if last is not None else np.nan,
            "last_val_acc": float(last["val_acc"]) if last is not None else np.nan,
            "last_val_loss": float(last["val_loss"]) if last is not None else np.nan,
            "seconds": float(hist["seconds"].sum()) if last is not None else np.nan,
            # wall_time: the trial's float clock at each report (Ray's timestamp is whole seconds)
            "start_time": float(clock.min() - hist["seconds"].iloc[0]) if last is not None else np.nan,
            "end_time": float(clock.max()) if last is not None else np.nan,
            "node_id": str(last["node_id"]) if last is not None else None,
            "error": str(r.error).splitlines()[0][:300] if r.error else None,
        })
    trials_df = pd.DataFrame(trials).sort_values("trial_id").reset_index(drop=True)
    history_df = pd.concat(history, ignore_index=True) if history else pd.DataFrame()
    return trials_df, history_df


def max_parallel(trials: pd.DataFrame) -> int:
    """Most trials running at the same moment, from their start/end times."""
    ok = trials.dropna(subset=["start_time", "end_time"])
    events = sorted([(t, 1) for t in ok["start_time"]] + [(t, -1) for t in ok["end_time"]], key=lambda e: (e[0], e[1]))
    running = best = 0
    for _, step in events:
        running += step
        best = max(best, running)
    return best


BEST_RULE = ("highest val accuracy at the last epoch among trials that ran all max_epochs (ties: lower val loss, "
             "then lower trial id); if none did, among all trials that reported and did not diverge")


def pick_best(trials: pd.DataFrame) -> pd.Series:
    reported = trials[(trials["epochs"] > 0) & (trials["status"] != "DIVERGED")]
    if reported.empty and (trials["status"] == "DIVERGED").any():
        raise StudyError("every trial that reported diverged (non-finite training loss); lower space.lr_max in the "
                         "experiment file")
    if reported.empty:
        raise StudyError("every trial failed before reporting a metric; see errors in trials.parquet and Ray's logs")
    pool = reported[reported["status"] == "COMPLETE"]
    pool = pool if len(pool) else reported
    return pool.sort_values(["last_val_acc", "last_val_loss", "trial_id"], ascending=[False, True, True]).iloc[0]


# --------------------------------------------------------------------------- final retrain


def fit_remote(data_ref: Any, cfgs: list[TrainConfig], backbone_ref: Any, num_cpus: float, num_gpus: float,
               evaluate_test: bool, label: str, diverged_ok: bool = False) -> list[Any]:
    """Run crackcore.fit for each config as a Ray task, in parallel as resources allow (the
    driver may have no GPU). Returns FitResults; models only when the test split is evaluated.
    A run whose loss turned non-finite is None with `diverged_ok`, else a one-line StudyError."""
    import ray

    from tune.trainable import within_resources

    @ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_retries=1)
    def _fit(refs: list, cfg: TrainConfig) -> Any:
        data, (weights, backbone) = ray.get(refs)
        result = fit(within_resources(cfg, num_cpus, num_gpus), data, evaluate_test=evaluate_test,
                     weights_info=weights, backbone=backbone, log=lambda s: print(f"[{label} seed {cfg.seed}] {s}", flush=True))
        result.model = result.model.cpu() if evaluate_test else None
        result.extra["node_id"] = ray.get_runtime_context().get_node_id()
        return result

    results = []
    for cfg, ref in [(cfg, _fit.remote([data_ref, backbone_ref], cfg)) for cfg in cfgs]:
        try:
            results.append(ray.get(ref))
        except ray.exceptions.RayTaskError as exc:
            if not isinstance(exc.cause, FloatingPointError):
                raise
            if not diverged_ok:  # one line, not a remote traceback
                raise StudyError(f"{label} diverged (non-finite training loss) at lr {cfg.lr:.3g}; best_config.json "
                                 "and trials.parquet are written: retrain a runner-up or a lower lr with python -m "
                                 "crackcore.fit") from None
            results.append(None)
    return results


def trial_params(row: pd.Series) -> dict[str, Any]:
    params = {k: row[k] for k in SEARCH_KEYS if k in row and pd.notna(row[k])}
    return {k: (v.item() if hasattr(v, "item") else v) for k, v in params.items()}


def repeat_top(cfg: StudyConfig, trials: pd.DataFrame, data_ref: Any, backbone_ref: Any) -> pd.DataFrame:
    """Re-run the top-K configs R times with fresh seeds (same split) for max_epochs. One
    seed cannot rank trials that differ by a few errors in a thousand."""
    done = trials[trials["status"] == "COMPLETE"].sort_values(["last_val_acc", "last_val_loss"], ascending=[False, True])
    top = done.head(cfg.repeat_top)
    cfgs, rows = [], []
    for rank, row in enumerate(top.itertuples(index=False), start=1):
        params = trial_params(pd.Series(row._asdict()))
        for r in range(cfg.repeats):
            seed = cfg.seed + 1000 * rank + r + 1
            cfgs.append(cfg.train.replace(**params, epochs=cfg.max_epochs, seed=seed))
            rows.append({"config_rank": rank, "trial_id": row.trial_id, "seed": seed, **params})
    results = fit_remote(data_ref, cfgs, backbone_ref, cfg.cpus_per_trial, cfg.gpus_per_trial, False, "repeat",
                         diverged_ok=True)
    for row, res in zip(rows, results):
        if res is None:  # as in the search: a diverged seed counts as the worst result
            row.update(val_acc=0.0, val_loss=float("nan"), n_val=0, diverged=True)
        else:
            row.update(val_acc=res.val["accuracy"], val_loss=res.val["loss"], n_val=res.val["n"], diverged=False)
    return pd.DataFrame(rows)


def rank_repeats(repeats: pd.DataFrame) -> pd.DataFrame:
    """Mean val accuracy per config with a 95 % t-interval over seeds, best first."""
    from scipy.stats import t

    g = repeats.groupby(["config_rank", "trial_id"], sort=False)
    ranked = g.agg(mean_val_acc=("val_acc", "mean"), sd_val_acc=("val_acc", "std"), repeats=("val_acc", "size"),
                   mean_val_loss=("val_loss", "mean")).reset_index()
    half = t.ppf(0.975, (ranked["repeats"] - 1).clip(lower=1)) * ranked["sd_val_acc"].fillna(0) / ranked["repeats"] ** 0.5
    # an accuracy interval stays within [0, 1] (a t-interval over 2 seeds is wider than that)
    ranked = ranked.assign(ci95_low=(ranked["mean_val_acc"] - half).clip(lower=0),
                           ci95_high=(ranked["mean_val_acc"] + half).clip(upper=1))
    return ranked.sort_values(["mean_val_acc", "mean_val_loss"], ascending=[False, True]).reset_index(drop=True)


def split_summary(test: dict[str, Any], data: Any, near_groups: pd.Series) -> dict[str, Any]:
    from crackcore.neardup import near_duplicate_leaks

    return {"test_accuracy": test["accuracy"], "n_test": test["n"], "ci95_low": test["ci95_low"],
            "ci95_high": test["ci95_high"], "errors": test["errors"], "groups": data.source["groups"],
            "exact_duplicate_files": data.source["exact_duplicate_files"],
            "test_images_with_near_duplicate_in_train": near_duplicate_leaks(data.samples, near_groups)}


def compare_splits(best_cfg: TrainConfig, data: Any, result: Any, backbone_ref: Any, num_cpus: int,
                   num_gpus: float) -> dict[str, Any]:
    """Retrain the best config under the other split strategy: how much did duplicates flatter it?"""
    import ray

    other = "grouped" if best_cfg.split_strategy == "random" else "random"
    other_cfg = best_cfg.replace(split_strategy=other)
    other_data = prepare_data(other_cfg)
    print(f"\n--compare-splits: retraining under the {other} split ({other_data.source['groups']} groups) ...", flush=True)
    ref = put_data(other_data)
    [other_result] = fit_remote(ref, [other_cfg], backbone_ref, num_cpus, num_gpus, True, f"{other} split")
    near_groups = (other_data if other == "grouped" else data).samples.set_index("path")["group"]
    return {best_cfg.split_strategy: split_summary(result.test, data, near_groups),
            other: split_summary(other_result.test, other_data, near_groups)}


def put_data(data: Any) -> Any:
    """The prepared data in Ray's object store, once for the whole cluster. A plain ndarray (not
    a memmap subclass) is stored out-of-band: zero-copy reads per node."""
    import ray

    return ray.put(dataclasses.replace(data, images=np.asarray(data.images).view(np.ndarray)))


def node_resources() -> dict[str, dict[str, float]]:
    """CPUs and GPUs of each live node, by node id (trials.parquet's node_id)."""
    import ray

    return {n["NodeID"]: {k: n["Resources"].get(k, 0.0) for k in ("CPU", "GPU")} for n in ray.nodes() if n["Alive"]}


def final_resources(cfg: StudyConfig) -> tuple[int, float]:
    """(CPUs, GPUs) of the final retrain: one whole GPU when trials used GPUs, and as many CPUs
    (up to 8) as the biggest node that can hold it has, so the task is always schedulable."""
    gpus = 1.0 if cfg.gpus_per_trial > 0 else 0.0
    biggest_node = max((r["CPU"] for r in node_resources().values() if r["GPU"] >= gpus), default=1)
    return max(1, int(min(biggest_node, 8))), gpus


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    import ray

    t_start = time.time()
    a = build_parser().parse_args(argv)
    for name in ("num_samples", "max_epochs", "final_epochs", "image_size", "subset"):
        value = getattr(a, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1 (got {value})")
    from_file = load_study_config(a.config)  # bad file or data path fail before Ray starts
    if flag_overrides(a)["train.data"]:
        check_root(flag_overrides(a)["train.data"])  # a wrong --data fails before Ray starts
    resources = connect_ray(a.address)
    has_gpu = resources.get("GPU", 0) > 0
    cfg = resolve_config(a, from_file, has_gpu)
    study_dir, storage = ray_storage(cfg, a.storage_path)
    if not a.resume and not a.study_name and study_started(study_dir, storage):
        # a default-named re-run (e.g. a second `make study`) gets the next free name, never an overwrite
        base, n = cfg.name, 2
        while study_started(study_dir, storage):
            cfg = apply_overrides(cfg, {"name": f"{base}-{n}"})
            study_dir, storage = ray_storage(cfg, a.storage_path)
            n += 1
        print(f"{base!r} already exists; this run is study {cfg.name!r} ({study_dir})", flush=True)
    saved = study_dir / CONFIG_FILE
    if a.resume:
        if not saved.is_file() and fetch_saved_study(study_dir, storage):
            print(f"fetched {', '.join(RESUME_FILES)} of study {cfg.name} from {storage}/{OUTPUTS_DIR}", flush=True)
        if not saved.is_file():
            raise StudyError(f"no study to resume at {study_dir} ({CONFIG_FILE} missing); run without --resume")
        import json

        saved_cfg = apply_overrides(StudyConfig(**json.loads(saved.read_text())), {})
        conflicts = resume_conflicts(a, cfg, saved_cfg)
        if conflicts:
            raise StudyError(f"--resume continues study {cfg.name} with its saved settings, but {'; '.join(conflicts)}: "
                             "drop those flags, or start a new study with --study-name NEW")
        if (study_dir / "study.json").is_file():
            print(f"study {cfg.name} is complete ({study_dir / 'study.json'}); nothing to resume")
            return 0
        cfg = saved_cfg
        print(f"resuming study {cfg.name} with its saved configuration ({saved})")
    elif study_started(study_dir, storage):
        raise StudyError(f"study {cfg.name!r} already exists at {study_dir}; pass --resume to continue it or "
                         "--study-name NEW for a new one (nothing was changed)")
    print("study config:", config_json(cfg), flush=True)
    slots = trial_slots(cfg, resources)
    # data and weights problems stop the run before the study folder exists; a folder holding
    # only study_config.json (a start that failed before Ray's first trial) is started afresh
    data = prepare_data(cfg.train)
    weights = resolve_weights(cfg.train.weights)
    study_dir.mkdir(parents=True, exist_ok=True)
    if not a.resume:
        write_json(cfg.to_dict(), saved)
        sync_outputs(study_dir, storage, (CONFIG_FILE,))
    print(f"data: {data.source['kind']} {data.source['root']}  {data.counts()}  "
          f"exact duplicates: {data.source['exact_duplicate_files']}\nweights: {weights.describe()}\n"
          f"cluster: {resources.get('CPU', 0):g} CPU, {resources.get('GPU', 0):g} GPU, "
          f"{len(node_resources())} node(s)", flush=True)
    data_ref = put_data(data)
    # (WeightsInfo, state dict) for every trial and retrain: the weights file exists on this node only
    backbone_ref = ray.put((weights, load_backbone(weights)))
    print(f"trials: {cfg.num_samples}, up to {slots} at once ({cfg.cpus_per_trial:g} CPU, {cfg.gpus_per_trial:g} GPU "
          f"each), ASHA {cfg.grace_period}..{cfg.max_epochs} epochs", flush=True)

    t_search = time.time()
    results = run_search(cfg, study_dir, storage, data_ref, backbone_ref, a.resume, slots)
    search_seconds = time.time() - t_search
    trials, history = collect_trials(results, cfg)
    # not results.num_terminated: on Ctrl-C Ray marks the trials it stops TERMINATED, though they
    # did not finish; a trial that ran to its end (or ASHA stopped) has done=True in its last result
    finished = sum(1 for r in results if r.error or (r.metrics or {}).get("done"))
    if finished >= cfg.num_samples:
        from tune.search import fail_orphaned_trials

        fail_orphaned_trials(study_dir, cfg.name)
    write_parquet(trials, study_dir / "trials.parquet")
    if len(history):
        write_parquet(history, study_dir / "history.parquet")
    if finished < cfg.num_samples:
        print(f"study interrupted after {finished}/{cfg.num_samples} trials; continue it with: python tune/run.py "
              f"--study-name {cfg.name} --storage-path {a.storage_path} --resume", file=sys.stderr)
        return 130
    best = pick_best(trials)
    rule, repeated = BEST_RULE, {}
    n_complete = int((trials["status"] == "COMPLETE").sum())
    if cfg.repeat_top > 0 and n_complete == 0:
        print("warning: no trial ran all max_epochs, so there is nothing for --repeat-top to repeat; the best trial "
              "is chosen by the single-seed rule", file=sys.stderr)
    elif cfg.repeat_top > 0:
        n_configs = min(cfg.repeat_top, n_complete)  # only trials that ran all max_epochs are repeated
        print(f"\nrepeating the top {n_configs} complete trial(s) with {cfg.repeats} seeds each ...", flush=True)
        repeats = repeat_top(cfg, trials, data_ref, backbone_ref)
        ranked = rank_repeats(repeats)
        write_parquet(repeats.merge(ranked[["trial_id", "mean_val_acc", "ci95_low", "ci95_high"]], on="trial_id"),
                      study_dir / "repeats.parquet")
        print(ranked.to_string(index=False), flush=True)
        chosen = ranked.iloc[0]
        best = trials[trials["trial_id"] == chosen["trial_id"]].iloc[0]
        rule = (f"highest mean val accuracy over {cfg.repeats} seeds among the top {n_configs} trials that ran all "
                "max_epochs (repeats.parquet); ties: lower mean val loss")
        repeated = {"mean_val_acc": float(chosen["mean_val_acc"]), "ci95_low": float(chosen["ci95_low"]),
                    "ci95_high": float(chosen["ci95_high"]), "seeds": cfg.repeats, "configs_repeated": n_configs}
    params = trial_params(best)
    best_cfg = cfg.train.replace(**params, epochs=cfg.final_epochs)
    write_json({"trial_id": best["trial_id"], "params": params, "rule": rule,
                "val_acc": float(best["last_val_acc"]), "val_loss": float(best["last_val_loss"]),
                **({"repeats": repeated} if repeated else {}),
                "train_config": best_cfg.to_dict()}, study_dir / "best_config.json")
    n_val = len(data.indices("val"))
    val_ci = wilson_interval(round(best["last_val_acc"] * n_val), n_val)
    print(f"\nbest trial {best['trial_id']}: {params}  val acc {format_accuracy(best['last_val_acc'], n_val, *val_ci)}\n"
          f"retraining it from scratch for {cfg.final_epochs} epochs ...", flush=True)

    t_final = time.time()
    num_cpus, num_gpus = final_resources(cfg)
    [result] = fit_remote(data_ref, [best_cfg], backbone_ref, num_cpus, num_gpus, True, "final retrain")
    final_seconds = time.time() - t_final
    extra: dict[str, Any] = {"best_trial_id": best["trial_id"]}
    if cfg.compare_splits:
        extra["split_comparison"] = compare_splits(best_cfg, data, result, backbone_ref, num_cpus, num_gpus)
    metrics = write_run_outputs(study_dir, result, data, best_cfg, extra)
    counts = trials["status"].value_counts().to_dict()
    write_json({
        "name": cfg.name, "command": shlex.join([sys.executable, *sys.argv]), "argv": sys.argv,
        "data_source": data.source, "weights": weights.to_dict(), "versions": {**versions(), "ray": ray.__version__,
        "optuna": __import__("optuna").__version__}, "seed": cfg.seed, "final_device": result.device,
        "final_train_precision": result.precision,
        "final_node_id": result.extra["node_id"], "cluster_resources": resources,
        "nodes": len(nodes := node_resources()), "node_resources": nodes,
        "ray_address": a.address or "local", "storage": storage, "trials": int(len(trials)),
        "trial_status": {k: int(v) for k, v in counts.items()}, "max_parallel_trials": max_parallel(trials),
        "trial_slots": slots, "search_seconds": search_seconds, "final_seconds": final_seconds,
        "wall_seconds": time.time() - t_start, "best_trial_id": best["trial_id"], "best_rule": rule,
        "config": cfg.to_dict(), "resumed": a.resume,
    }, study_dir / "study.json")
    sync_outputs(study_dir, storage)
    print(f"\n=== study {cfg.name}: {len(trials)} trials {counts}, up to {max_parallel(trials)} in parallel, "
          f"wall {time.time() - t_start:.0f}s ===")
    print(f"best config: {params}  (data: {data.source['kind']}, weights: {weights.describe()})")
    print("\n".join(summary_lines(metrics, study_dir)))
    return 0


if __name__ == "__main__":
    from crackcore.cli import run_main

    code = run_main(main, extra_errors=(StudyError,))
    sys.exit(code)
