"""A training run's checkpoint in one place: what `capture` takes from a run after an epoch,
what `restore` puts back so the next epoch is the one an uninterrupted run would train, and
the file it travels in (a Ray Tune trial's checkpoint folder)."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

STATE_FILE = "state.pt"


def capture(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, scaler: torch.amp.GradScaler,
            aug_gen: torch.Generator, history: list[dict[str, Any]], epoch: int, config: dict[str, Any]) -> dict[str, Any]:
    # a snapshot, not live references: the caller may keep it while training goes on
    return copy.deepcopy({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                          "scheduler": scheduler.state_dict(), "grad_scaler": scaler.state_dict(),
                          "aug_rng": aug_gen.get_state(), "torch_rng": torch.get_rng_state(),
                          "history": list(history), "epoch": epoch, "config": config})


def restore(state: dict[str, Any], model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
            scaler: torch.amp.GradScaler, aug_gen: torch.Generator) -> tuple[list[dict[str, Any]], int]:
    """Load a captured state into a freshly built run; returns (history so far, next epoch)."""
    model.load_state_dict(state["model"])
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


def save(state: dict[str, Any], folder: Path) -> None:
    torch.save(state, Path(folder) / STATE_FILE)


def load(folder: Path) -> dict[str, Any]:
    return torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=True)
