"""The Ray Tune function trainable: one trial = crackcore.fit with per-epoch tune.report.

Everything a trial does, crackcore.fit does without Ray; this layer only adds per-epoch
reports with a checkpoint (crackcore.checkpoint) and resumes from `tune.get_checkpoint()`
when Ray restarts a failed trial."""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import ray
import torch
from ray import tune

from crackcore import checkpoint, faults
from crackcore.config import TrainConfig, TrialParams, trial_config
from crackcore.train import HISTORY_COLUMNS, fit

# a checkpoint is written here, then copied by Ray to the trial's storage: in memory where the
# node has /dev/shm, so the training thread does not wait on a disk write for a file that lives a moment
SCRATCH = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None


def within_resources(cfg: TrainConfig, cpus: float, gpus: float) -> TrainConfig:
    """`cfg` for a Ray task or trial holding `cpus` CPUs and `gpus` GPUs: torch threads = its
    CPUs (Ray sets OMP_NUM_THREADS=1), GPU-resident data planned against its share of a GPU."""
    return cfg.replace(num_threads=max(1, int(cpus)), gpu_share=min(1.0, gpus) if gpus > 0 else 1.0)


def train_trial(params: dict[str, Any], data_ref: Any, train: TrainConfig, backbone_ref: Any, max_epochs: int,
                cpus: float, gpus: float, checkpoint_epochs: tuple[int, ...]) -> None:
    started = time.time()  # the slot's time before the first epoch (data fetch, model build) is start-up
    if torch.cuda.is_available():  # a reused worker: the last trial's cached blocks would shrink free memory
        torch.cuda.empty_cache()
    # data and ImageNet backbone travel once per node through the object store (data zero-copy):
    # a weights path resolved on the driver need not exist on the node running this trial
    data, weights = ray.get([data_ref[0], backbone_ref[0]])
    cfg = within_resources(trial_config(train, TrialParams(**params), max_epochs), cpus, gpus)
    node_id = ray.get_runtime_context().get_node_id()
    resume_state = None
    if saved := tune.get_checkpoint():
        with saved.as_directory() as d:
            resume_state = checkpoint.load(Path(d))
    last_epoch = checkpoint.epoch_of(resume_state) if resume_state else 0

    def on_epoch(row: dict[str, Any], capture) -> None:
        nonlocal last_epoch
        faults.trial_fault(row["epoch"], tune.get_context().get_trial_id())
        due = row["epoch"] in checkpoint_epochs  # tune.search.checkpoint_epochs: which and why
        with tempfile.TemporaryDirectory(dir=SCRATCH) as d:
            t = time.perf_counter()
            size = checkpoint.save(capture(), Path(d)) if due else 0
            tune.report({**row, "node_id": node_id, "pid": os.getpid(), "diverged": False, "wall_time": time.time(),
                         "trial_start": started, "checkpoint_bytes": size, "checkpoint_seconds": time.perf_counter() - t},
                        checkpoint=tune.Checkpoint.from_directory(d) if due else None)
        last_epoch = row["epoch"]

    try:
        fit(cfg, data, weights=weights, on_epoch=on_epoch, resume_state=resume_state, log=None)
    except FloatingPointError:
        # Divergence is deterministic (same seed, same checkpoint): a Ray retry would diverge
        # again. Report it as the worst result instead: ASHA stops the trial, Optuna records the
        # value and TPE learns to avoid the region; `diverged` marks the row (trials.parquet: DIVERGED).
        tune.report({**{k: float("nan") for k in HISTORY_COLUMNS}, "epoch": last_epoch + 1, "val_acc": 0.0,
                     **({"val_shift_acc": 0.0} if cfg.val_shift else {}), "node_id": node_id, "pid": os.getpid(), "diverged": True, "wall_time": time.time()})
