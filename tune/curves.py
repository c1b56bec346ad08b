"""python -m tune.curves --num-settings 64 --max-epochs 4 --out curves.parquet

A learning-curve table of this problem: a fixed, seeded grid of settings from the study's search
space, each trained to max_epochs with no early stopping (Ray Tune, FIFO), one row per setting
and epoch. tune.replay replays searchers and schedulers against it in simulated time.

A grid of log-spaced lr x policies x --freeze-depths (a seeded draw of N when larger), not a random
sample, so the replay's nearest-setting lookups are exact in policy and depth."""
from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import ray
from ray import tune

from crackcore.config import StudyConfig, TrainConfig, apply_overrides, load_study_config
from crackcore.flags import add_flags, flag_values
from crackcore.data import prepare_data
from crackcore.exceptions import ConfigError, StudyError
from crackcore.model import load_backbone, resolve_weights
from crackcore.outputs import versions, write_json, write_parquet
from crackcore.sources import EMBEDDED_SAMPLE, default_data
from tune.cluster import connect_ray, put_data, trial_slots
from tune.storage import DropFinishedCheckpoints
from tune.trainable import train_trial

REPO = Path(__file__).resolve().parents[1]
PARAMS = ["lr", "freeze_depth", "augment_policy"]
CURVE_TRAIN_FLAGS = ["data", "val_source", "group_by", "image_size", "subset", "weights"]
CURVE_COLUMNS = [*PARAMS, "setting", "epoch", "val_acc", "val_loss", "seconds"]  # what tune.replay needs


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tune.curves", description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--num-settings", type=int, required=True, help="settings in the table")
    p.add_argument("--max-epochs", type=int, required=True, help="epochs every setting trains for")
    p.add_argument("--out", type=Path, required=True, help="the table (.parquet); its recipe goes beside it (.json)")
    p.add_argument("--config", type=Path, default=REPO / "experiments" / "study.toml",
                   help="experiment file: search space, [train] settings and the cpu/gpu profile")
    add_flags(p, TrainConfig, CURVE_TRAIN_FLAGS)  # as tune/run.py's (the held-out val source: val_acc_<source>)
    add_flags(p, StudyConfig, ["cpus_per_trial"])
    p.add_argument("--freeze-depths", default="0", help="comma-separated depths in the grid")
    p.add_argument("--seed", type=int, default=0, help="training seed, and the draw when the grid exceeds N")
    p.add_argument("--storage-path", default="results", help="Ray's experiment goes to STORAGE/NAME")
    p.add_argument("--name", default="curves")
    p.add_argument("--address", default=os.environ.get("RAY_ADDRESS"), help="existing Ray cluster, else a local Ray")
    p.add_argument("--resume", action="store_true", help="continue an interrupted recording of NAME")
    return p


def settings_grid(cfg: StudyConfig, n: int, depths: list[int], seed: int) -> list[dict[str, Any]]:
    """N settings: lr log-spaced over the space's range x policies x depths, drawn with `seed` when
    the full grid is larger than N."""
    policies = list(cfg.space.augment_policies)
    n_lr = max(1, math.ceil(n / (len(policies) * len(depths))))
    lrs = np.geomspace(cfg.space.lr_min, cfg.space.lr_max, n_lr) if n_lr > 1 else [
        math.sqrt(cfg.space.lr_min * cfg.space.lr_max)]
    grid = [{"lr": float(f"{lr:.6g}"), "freeze_depth": d, "augment_policy": p} for lr in lrs for d in depths
            for p in policies]
    if len(grid) > n:
        grid = [grid[i] for i in np.sort(np.random.default_rng(seed).choice(len(grid), n, replace=False))]
    return grid


def curve_trial(config: dict[str, Any], **kwargs: Any) -> None:
    train_trial(config["setting"], **kwargs)


def study_config(a: argparse.Namespace, has_gpu: bool) -> StudyConfig:
    from_file = load_study_config(a.config)
    cfg = apply_overrides(from_file, from_file.gpu if has_gpu else from_file.cpu)
    train = flag_values(a, CURVE_TRAIN_FLAGS)  # --data parsed once, here
    return apply_overrides(cfg, {
        "max_epochs": a.max_epochs, "grace_period": 1, "num_samples": a.num_samples, "seed": a.seed,
        "cpus_per_trial": a.cpus_per_trial, "gpus_per_trial": None if has_gpu else 0.0,
        **{f"train.{k}": v for k, v in train.items()},
        "train.data": train["data"] or default_data() or str(EMBEDDED_SAMPLE), "train.seed": a.seed,
        "train.shift_suite": False})


def curves_table(results: Any, data: Any, cfg: StudyConfig) -> pd.DataFrame:
    """One row per setting and epoch. val_acc / val_loss are in-domain (the val split of the
    sources trained on); a held-out val source has val_acc_<source> and val_loss_<source>."""
    held = cfg.train.val_source
    train_sources = data.roles("train") or []
    n_val = {s: len(data.indices("val", [s])) for s in train_sources}
    frames = []
    for r in results:
        if r.error:
            raise StudyError(f"a curve trial failed ({r.error}); rerun with --resume to finish the table")
        df = r.metrics_dataframe.sort_values("epoch").drop_duplicates("epoch", keep="last")
        row = df.assign(**{k: r.config["setting"][k] for k in PARAMS})
        if held:  # fit scores selection on the held-out source: val_acc is its accuracy, val_loss its loss
            row[f"val_acc_{held}"], row[f"val_loss_{held}"] = row[f"val_acc_{held}"], row["val_loss"]
            in_domain = [f"val_acc_{s}" for s in train_sources]
            weights = np.array([n_val[s] for s in train_sources], float)
            row["val_acc"] = row[in_domain].to_numpy() @ weights / weights.sum()
            row["val_loss"] = row["val_loss_domain"]
        frames.append(row)
    table = pd.concat(frames, ignore_index=True)
    table.insert(0, "setting", pd.factorize(table[PARAMS].astype(str).agg("|".join, axis=1))[0])
    extra = sorted(c for c in table.columns if c.startswith(("val_acc_", "val_loss_")) and c != "val_loss_domain")
    cols = [*CURVE_COLUMNS, *extra, "train_loss", "train_acc", *(["diverged"] if "diverged" in table else [])]
    return table[cols].sort_values(["setting", "epoch"]).reset_index(drop=True)


def main(argv: list[str] | None = None) -> int:
    t0 = time.time()
    a = build_parser().parse_args(argv)
    for name in ("num_settings", "max_epochs"):
        if getattr(a, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(a, name)})")
    if a.out.suffix != ".parquet":
        raise ConfigError(f"--out {a.out} must end in .parquet (its recipe goes beside it as .json)")
    try:
        depths = [int(d) for d in a.freeze_depths.split(",")]
    except ValueError:
        raise ConfigError(f"--freeze-depths {a.freeze_depths!r} must be comma-separated integers, e.g. 0,1,2") from None
    a.num_samples = a.num_settings
    study_config(a, False).train.check_sources()  # bad flags fail before Ray starts
    resources = connect_ray(a.address)
    cfg = apply_overrides(study_config(a, resources.get("GPU", 0) > 0), {"space.freeze_depths": depths})
    grid = settings_grid(cfg, a.num_settings, depths, a.seed)
    data = prepare_data(cfg.train)
    weights = resolve_weights(cfg.train.weights)
    slots = trial_slots(cfg, resources)
    print(f"{len(grid)} settings x {cfg.max_epochs} epochs, {slots} at once; data {data.counts()}; "
          f"weights: {weights.describe()}", flush=True)
    trainable = tune.with_resources(
        tune.with_parameters(curve_trial, data_ref=[put_data(data)], train=cfg.train,
                             backbone_ref=[ray.put((weights, load_backbone(weights)))], max_epochs=cfg.max_epochs,
                             cpus=cfg.cpus_per_trial, gpus=cfg.gpus_per_trial,
                             checkpoint_epochs=tuple(range(1, cfg.max_epochs))),  # every epoch but the last: resumable
        {"cpu": cfg.cpus_per_trial, "gpu": cfg.gpus_per_trial})
    storage = str(Path(a.storage_path).resolve()) if "://" not in a.storage_path else a.storage_path
    experiment = f"{storage}/{a.name}"
    if a.resume:
        if not tune.Tuner.can_restore(experiment):
            raise StudyError(f"nothing to resume at {experiment}; run without --resume")
        tuner = tune.Tuner.restore(experiment, trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        if tune.Tuner.can_restore(experiment):
            raise StudyError(f"{experiment} exists; pass --resume to continue it or --name NEW")
        tuner = tune.Tuner(trainable, param_space={"setting": tune.grid_search(grid)},
                           tune_config=tune.TuneConfig(metric="val_acc", mode="max", max_concurrent_trials=slots,
                                                       reuse_actors=True),  # FIFO: no trial stops early
                           run_config=tune.RunConfig(name=a.name, storage_path=storage, verbose=1,
                                                     checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                                                     callbacks=[DropFinishedCheckpoints()]))
    table = curves_table(tuner.fit(), data, cfg)
    recipe = {"command": shlex.join([sys.executable, "-m", "tune.curves", *(argv or sys.argv[1:])]),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "settings": len(grid),
              "max_epochs": cfg.max_epochs, "grid": grid, "freeze_depths": depths,
              "weights": weights.describe(), "data_counts": data.counts(), "data_source": data.source,
              "val_source": cfg.train.val_source, "trial_slots": slots, "cluster_resources": resources,
              "wall_seconds": round(time.time() - t0, 1), "epoch_seconds_total": round(float(table["seconds"].sum()), 1),
              "train": cfg.train.to_dict(), "versions": {**versions(), "ray": ray.__version__}}
    write_parquet(table, a.out)
    write_json(recipe, a.out.with_suffix(".json"))
    print(f"{a.out}: {table['setting'].nunique()} settings x {cfg.max_epochs} epochs, "
          f"{recipe['wall_seconds']:.0f} s wall; recipe {a.out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    from crackcore.cli import run_main

    sys.exit(run_main(main))
