"""`python -m crackcore.fit`: one training run (the seed notebook's baseline) that writes the
same files as the study's final retrain (crackcore.outputs)."""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from crackcore.config import (AUGMENT_POLICIES, FREEZE_DEPTHS, LR_SCHEDULES, SPLIT_STRATEGIES, TrainConfig, config_json,
                              leave_one_out)
from crackcore.data import prepare_data
from crackcore.exceptions import ConfigError
from crackcore.images import CACHE_ENV, cache_dir
from crackcore.outputs import check_writable, claim_folder, folder_in_use, loso_table, summary_lines, versions, write_folder, write_parquet, write_run_outputs
from crackcore.sources import EMBEDDED_SAMPLE, data_setting, parse_sources
from crackcore.tracking import experiment, finish_run, log_epoch, open_store, tracked_run
from crackcore.train import HISTORY_COLUMNS, fit


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = argparse.ArgumentParser(prog="python -m crackcore.fit", description="Train one ResNet-18 crack classifier "
                                "(the baseline) and write its metrics, errors and model.")
    p.add_argument("--data", action="append", metavar="[NAME=]PATH",
                   help="a crack/no-crack folder, repeatable for several sources, or `synthetic` (default $CRACK_DATA, "
                   "else the embedded real sample)")
    p.add_argument("--group-by", help="regex: file names with the same first capture group share a split, "
                   "e.g. '^(.*)__' for PHOTO__rYcX.jpg windows")
    p.add_argument("--val-source", help="a --data source never trained on: the val figures are its images")
    p.add_argument("--test-source", help="a --data source used only for the final evaluation")
    p.add_argument("--eval", action="append", default=[], metavar="NAME=PATH", help="labelled folder evaluated after "
                   "training (repeatable)")
    p.add_argument("--leave-one-out", action="store_true", help="also retrain once per source with it held out "
                   "(loso.parquet)")
    p.add_argument("--out", type=Path, default=Path("results/baseline"))
    p.add_argument("--overwrite", action="store_true", help="replace an earlier run in --out (once the new one is written)")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--freeze-depth", type=int, default=d.freeze_depth, choices=FREEZE_DEPTHS)
    p.add_argument("--augment-policy", default=d.augment_policy, choices=AUGMENT_POLICIES)
    p.add_argument("--image-size", type=int, default=d.image_size)
    p.add_argument("--subset", type=int, default=None, help="images per class (deterministic)")
    p.add_argument("--weights", default=d.weights, help="auto | imagenet | random | PATH to resnet18 .pth")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--split-strategy", default=d.split_strategy, choices=SPLIT_STRATEGIES)
    p.add_argument("--device", default=d.device)
    p.add_argument("--lr-schedule", default=d.lr_schedule, choices=LR_SCHEDULES)
    p.add_argument("--mlflow", metavar="URI", help="also record the run in MLflow (parameters, per-epoch and test "
                   "metrics, model.pt, errors.parquet), in an experiment named after --out's folder; e.g. "
                   "sqlite:///results/mlflow.db")
    p.add_argument("--no-shift-suite", dest="shift_suite", action="store_false",
                   help="skip the shift suite on the test split (final_metrics.json 'shift')")
    p.add_argument("--shift-max-images", type=int, default=d.shift_max_images,
                   help="test images scored per shift cell (a stratified seeded subset); 0 = all")
    p.add_argument("--val-shift", action="store_true", help="also score val under the cheap shifts each epoch "
                   "(final_history.parquet: val_shift_acc)")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    data = data_setting(a.data) or os.environ.get("CRACK_DATA") or str(EMBEDDED_SAMPLE)
    cfg = TrainConfig(data=data, group_by=a.group_by, val_source=a.val_source, test_source=a.test_source,
                      external=parse_sources(a.eval), epochs=a.epochs, lr=a.lr, batch_size=a.batch_size, freeze_depth=a.freeze_depth,
                      augment_policy=a.augment_policy, image_size=a.image_size, subset=a.subset, weights=a.weights,
                      seed=a.seed, split_strategy=a.split_strategy, device=a.device, lr_schedule=a.lr_schedule,
                      shift_suite=a.shift_suite, shift_max_images=a.shift_max_images or None, val_shift=a.val_shift)
    if a.leave_one_out:
        leave_one_out(cfg)  # at least two sources, before any training
    if a.out.is_file():
        raise ConfigError(f"--out {a.out} is a file; pass a folder for the run")
    check_writable(a.out.parent, f"--out {a.out}", "choose another --out")  # before training, not after
    check_writable(cache_dir(), "the decode cache", f"set {CACHE_ENV} to a writable folder")
    with claim_folder(a.out):  # two runs started at once to one --out: one goes on, the other stops here
        if folder_in_use(a.out) and not a.overwrite:
            raise ConfigError(f"--out {a.out} is not empty (an earlier run?); pass --overwrite to replace it once the "
                              "new run is written, or another --out")
        return train_to(a, cfg)


def train_to(a: argparse.Namespace, cfg: TrainConfig) -> int:
    """The run, with --out claimed: tracked in MLflow if asked, trained and written."""
    uri = open_store(a.mlflow, create_in=a.out.parent) if a.mlflow else None  # a bad URI fails before training
    print("config:", config_json(cfg), flush=True)
    t0 = time.time()
    name = a.out.resolve().name  # the MLflow experiment and run
    with tracked_run(uri, experiment(uri, name) if uri else None, name, cfg.to_dict(),
                     {"role": "fit", "out": str(a.out.resolve())}) as run_id:
        metrics = train_and_write(a, cfg, t0, uri, run_id)
        if run_id:
            files = [a.out / n for n in ("model.pt", "errors.parquet", "final_metrics.json", "loso.parquet")]
            finish_run(uri, run_id, metrics, files, skip=set(HISTORY_COLUMNS), step=metrics["epochs"])
            print(f"mlflow: run {run_id} in experiment {name!r} at {uri}")
    return 0


def train_and_write(a: argparse.Namespace, cfg: TrainConfig, t0: float, uri: str | None, run_id: str | None) -> dict:
    """Train (each epoch logged to the MLflow run `run_id`, if any), write --out whole, print the
    summary; returns final_metrics.json's figures."""
    data = prepare_data(cfg)
    print(f"data: {data.source['kind']} {data.source['root']} - {data.counts()}", flush=True)
    result = fit(cfg, data, evaluate_test=True, progress=True,
                 on_epoch=(lambda row, _: log_epoch(uri, run_id, row)) if run_id else None)
    held_out = {}
    for name, held_cfg in (leave_one_out(cfg) if a.leave_one_out else {}).items():
        print(f"\nleave-one-out: training without {name} ...", flush=True)
        held_out[name] = fit(held_cfg, prepare_data(held_cfg), evaluate_test=True, progress=True)
    loso = loso_table(held_out) if held_out else None
    metrics: dict = {}

    def fill(tmp: Path) -> None:  # the whole run written, then put in place of --out
        metrics.update(write_run_outputs(tmp, result, data, cfg, {"wall_seconds": time.time() - t0,
                                                                  "versions": versions(), "data_source": data.source,
                                                                  "command": sys.argv}))
        if loso is not None:
            write_parquet(loso, tmp / "loso.parquet")

    write_folder(a.out, fill)
    print(f"\nweights: {result.weights.describe()}  device: {result.device} ({result.precision})  wall {time.time() - t0:.0f}s")
    print("\n".join(summary_lines(metrics, a.out)))
    if loso is not None:
        print(loso.to_string(index=False))
    return metrics


if __name__ == "__main__":
    from crackcore.cli import run_main

    sys.exit(run_main(main))
