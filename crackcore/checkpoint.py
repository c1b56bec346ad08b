"""A training run's checkpoint in one place: what `capture` takes from a run after an epoch,
what `restore` puts back so the next epoch is the one an uninterrupted run would train, and
the file it travels in (a Ray Tune trial's checkpoint folder).

A checkpoint holds only what a resume cannot rebuild: the trained parameters, the BatchNorm
buffers of the trained stages, optimizer / scheduler / scaler and RNG states, the history.
Frozen stages are left out: a resumed run rebuilds them from the weights it starts from (the
ImageNet backbone, or the same seeded random init), so a freeze depth 5 checkpoint holds the
head alone (kilobytes, not the ~90 MB of the whole model and its momentum)."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from crackcore.exceptions import CheckpointError

STATE_FILE = "state.pt"


def trained_state(model: Any) -> dict[str, torch.Tensor]:
    """The model's state_dict without its frozen stages (model: a model.CrackResNet)."""
    frozen = {id(t) for m in model.frozen_modules() for t in (*m.parameters(), *m.buffers())}
    return {k: v.detach() for k, v in model.state_dict(keep_vars=True).items() if id(v) not in frozen}


def capture(model: Any, optimizer: torch.optim.Optimizer, scheduler: Any, scaler: torch.amp.GradScaler,
            aug_gen: torch.Generator, history: list[dict[str, Any]], epoch: int, config: dict[str, Any],
            weights_sha256: str | None) -> dict[str, Any]:
    # a snapshot, not live references: the caller may keep it while training goes on
    return copy.deepcopy({"model": trained_state(model), "freeze_depth": model.freeze_depth,
                          "weights_sha256": weights_sha256,  # what the frozen stages are rebuilt from
                          "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                          "grad_scaler": scaler.state_dict(), "aug_rng": aug_gen.get_state(),
                          "torch_rng": torch.get_rng_state(), "history": list(history), "epoch": epoch,
                          "config": config})


def restore(state: dict[str, Any], model: Any, optimizer: torch.optim.Optimizer, scheduler: Any,
            scaler: torch.amp.GradScaler, aug_gen: torch.Generator,
            weights_sha256: str | None) -> tuple[list[dict[str, Any]], int]:
    """Load a captured state into a freshly built run; returns (history so far, next epoch)."""
    if "freeze_depth" not in state:  # written before checkpoints left frozen stages out: the whole model
        model.load_state_dict(state["model"])
    elif state["freeze_depth"] != model.freeze_depth:
        raise CheckpointError(f"the checkpoint was written with freeze_depth {state['freeze_depth']}, this run "
                              f"freezes {model.freeze_depth}; resume it with its own settings or start afresh")
    elif set(state["model"]) != set(trained_state(model)):
        raise CheckpointError("the checkpoint does not fit this model (its tensors differ); it was written by "
                              "another model or version: start afresh")
    elif state["weights_sha256"] != weights_sha256:
        raise CheckpointError(f"the checkpoint's frozen stages came from weights {state['weights_sha256'] or 'random'}, "
                              f"this run has {weights_sha256 or 'random'}; resume with the same --weights")
    else:
        model.load_state_dict(state["model"], strict=False)  # frozen stages stay as built
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    aug_gen.set_state(state["aug_rng"])
    if state.get("grad_scaler"):
        scaler.load_state_dict(state["grad_scaler"])
    torch.set_rng_state(state["torch_rng"])
    return list(state["history"]), epoch_of(state) + 1


def epoch_of(state: dict[str, Any]) -> int:
    """The last epoch a captured state has trained."""
    return int(state["epoch"])


def save(state: dict[str, Any], folder: Path) -> int:
    """Write the state into `folder`; returns its bytes."""
    torch.save(state, Path(folder) / STATE_FILE)
    return (Path(folder) / STATE_FILE).stat().st_size


def load(folder: Path) -> dict[str, Any]:
    return torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=True)
