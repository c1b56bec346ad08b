"""`python -m crackcore.fit`: one training run (the seed notebook's baseline) that writes the
same files as the study's final retrain (crackcore.outputs)."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from crackcore.config import StudyConfig, TrainConfig, config_json, leave_one_out
from crackcore.data import prepare_data
from crackcore.exceptions import ConfigError
from crackcore.images import CACHE_ENV, cache_dir
from crackcore.outputs import (check_writable, claim_folder, folder_in_use, loso_table, summary_lines, versions, write_folder,
                               write_parquet, write_run_outputs)
from crackcore.flags import add_flags, flag_values
from crackcore.sources import EMBEDDED_SAMPLE, default_data
from crackcore.studyfiles import ERRORS, FINAL_METRICS, LOSO, MODEL
from crackcore.tracking import experiment, finish_run, log_epoch, open_store, tracked_run
from crackcore.train import HISTORY_COLUMNS, fit


# the settings python -m crackcore.fit takes as flags, each made from its config field (crackcore.flags)
TRAIN_FLAGS = ["data", "group_by", "val_source", "test_source", "adapt_to", "adapt_method", "adapt_prior", "external",
               "epochs", "lr", "batch_size", "freeze_depth", "augment_policy", "image_size", "subset", "weights", "seed",
               "split_strategy", "device", "lr_schedule", "shift_suite", "shift_max_images", "val_shift"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m crackcore.fit", description="Train one ResNet-18 crack classifier "
                                "(the baseline) and write its metrics, errors and model.")
    add_flags(p, TrainConfig, TRAIN_FLAGS, defaults=True)
    add_flags(p, StudyConfig, ["leave_one_out", "mlflow"])
    p.add_argument("--out", type=Path, default=Path("results/baseline"), help="the run's folder (default results/baseline)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier run in --out (once the new one is written)")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    given = {k: v for k, v in flag_values(a, TRAIN_FLAGS).items() if v is not None}  # --data, --eval: None if not given
    if given.get("shift_max_images") == 0:
        given["shift_max_images"] = None  # every test image
    cfg = TrainConfig(**{**given, "data": given.get("data") or default_data() or str(EMBEDDED_SAMPLE)})
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
            files = [a.out / n for n in (MODEL, ERRORS, FINAL_METRICS, LOSO)]
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
            write_parquet(loso, tmp / LOSO)

    write_folder(a.out, fill)
    print(f"\nweights: {result.weights.describe()}  device: {result.device} ({result.precision})  wall {time.time() - t0:.0f}s")
    print("\n".join(summary_lines(metrics, a.out)))
    if loso is not None:
        print(loso.to_string(index=False))
    return metrics


if __name__ == "__main__":
    from crackcore.cli import run_main

    sys.exit(run_main(main))
