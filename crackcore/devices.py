"""Where a run computes: the torch device a setting names, and the CPUs this process may use.
A leaf: serving (classifier, predict, calibrate, export) and training both need it, and a
field app that loads a model must not import the training floor to get it."""
from __future__ import annotations

import os

import torch

from crackcore.exceptions import ConfigError


def resolve_device(spec: str = "auto") -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={spec} requested but CUDA is not available; use --device cpu or auto")
    return device


def available_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
