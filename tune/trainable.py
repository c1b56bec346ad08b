"""The Ray Tune function trainable: one trial = crackcore.fit with per-epoch tune.report.

Everything a trial does, crackcore.fit does without Ray; this layer only adds per-epoch
reports with a checkpoint (model + optimizer + scheduler + RNG state) and resumes from
`tune.get_checkpoint()` when Ray restarts a failed trial."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import ray
import torch
from ray import tune

from crackcore.config import TrainConfig
from crackcore.model import WeightsInfo
from crackcore.train import fit

STATE_FILE = "state.pt"
# Test-only fault injection: the trial raises once when it reaches this epoch (marker files
# in CRACK_FAULT_DIR make it "once"), so tests can check resume-from-checkpoint.
FAULT_EPOCH_ENV, FAULT_DIR_ENV = "CRACK_FAULT_EPOCH", "CRACK_FAULT_DIR"


def trial_config(base: dict[str, Any], params: dict[str, Any], epochs: int, cpus: float, gpus: float) -> TrainConfig:
    return TrainConfig(**{**base, **params, "epochs": epochs, "num_threads": max(1, int(cpus)),
                          "gpu_share": min(1.0, gpus) if gpus > 0 else 1.0})


def _maybe_inject_fault(epoch: int) -> None:
    if os.environ.get(FAULT_EPOCH_ENV) != str(epoch) or not os.environ.get(FAULT_DIR_ENV):
        return
    marker = Path(os.environ[FAULT_DIR_ENV]) / f"{tune.get_context().get_trial_id()}.failed"
    if not marker.exists():
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
        raise RuntimeError(f"injected fault at epoch {epoch} ({FAULT_EPOCH_ENV})")


def train_trial(params: dict[str, Any], data_ref: Any, base: dict[str, Any], weights: dict[str, Any],
                backbone_ref: Any, max_epochs: int, cpus: float, gpus: float) -> None:
    # data and ImageNet backbone travel once per node through the object store (data zero-copy):
    # a weights path resolved on the driver need not exist on the node running this trial
    data, backbone = ray.get([data_ref[0], backbone_ref[0]])
    cfg = trial_config(base, params, max_epochs, cpus, gpus)
    node_id = ray.get_runtime_context().get_node_id()
    resume_state = None
    checkpoint = tune.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            resume_state = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=True)

    def on_epoch(row: dict[str, Any], state_fn) -> None:
        _maybe_inject_fault(row["epoch"])
        with tempfile.TemporaryDirectory() as d:
            torch.save(state_fn(), Path(d) / STATE_FILE)
            tune.report({**row, "node_id": node_id, "pid": os.getpid()}, checkpoint=tune.Checkpoint.from_directory(d))

    fit(cfg, data, on_epoch=on_epoch, resume_state=resume_state, weights_info=WeightsInfo(**weights),
        backbone=backbone, log=None)
