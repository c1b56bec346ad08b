"""The shift test suite: how a model degrades when the camera or the site changes.

A fixed set of shifts, each at 3 severities (0 = the clean image), applied to uint8
[B,3,S,S] batches on whatever device they live on, built from torchvision.transforms.v2
functionals wherever one exists (motion blur and white balance have none: a line-kernel
convolution and per-channel gains). Spatial sizes (blur sigma, motion length) are given at
64 px and scale with the image size, so a severity means the same optical degradation at
64 and at 227 px. Random parts (noise, motion direction) are seeded per cell and batch.

`run_suite(score, images, labels)` scores every cell; `VAL_CELLS` is the cheap subset the
study's `metric = "val_shift_acc"` averages with the clean val accuracy at every epoch.
The model is the caller's (`score`: uint8 batch -> P(crack)), so this module needs none.
"""
from __future__ import annotations

import math
import time
import zlib
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF

from crackcore.exceptions import ConfigError
from crackcore.metrics import wilson_interval

REFERENCE_SIZE = 64  # px at which spatial parameters are stated


@dataclass(frozen=True)
class Shift:
    parameter: str  # what the levels set, with its unit
    levels: tuple[float, float, float]  # severity 1, 2, 3
    effect: str  # what happens to the pixels as severity grows


SHIFTS: dict[str, Shift] = {
    "scale_down": Shift("zoom factor", (0.75, 0.5, 0.35),
                        "downscaled (antialiased) and reflect-padded back to size: thinner crack, wider context"),
    "gaussian_blur": Shift("sigma, px at 64 px", (0.6, 1.2, 2.0), "defocus: less high-frequency energy"),
    "motion_blur": Shift("line length, px at 64 px", (3, 5, 9), "camera shake along a seeded direction per image"),
    "jpeg": Shift("JPEG quality", (50, 20, 8), "compression: 8x8 block artefacts, lost fine detail"),
    "gaussian_noise": Shift("sigma, fraction of full scale", (0.03, 0.06, 0.12), "sensor noise (clipped to 0..255)"),
    "brightness": Shift("factor", (0.7, 0.5, 0.3), "darker (underexposed)"),
    "contrast": Shift("factor", (0.7, 0.5, 0.3), "blended towards the mean grey (haze, flat light)"),
    "colour_cast": Shift("red gain 1+a, blue gain 1-a", (0.1, 0.2, 0.35), "warm white balance (tungsten, low sun)"),
    "grayscale": Shift("saturation factor", (0.6, 0.3, 0.0), "desaturated, 0 = grayscale"),
}
SEVERITIES = (1, 2, 3)
# the cheap subset scored on val every epoch for metric = "val_shift_acc": one geometric, one
# optical, one compression and one photometric shift, at the middle severity
VAL_CELLS = (("scale_down", 2), ("gaussian_blur", 2), ("jpeg", 2), ("contrast", 2))


def parse_shifts(text: str | None) -> list[str]:
    """'all' / None -> every shift; 'a,b' -> those, in the suite's order; an unknown name is a ConfigError."""
    if text is None or text.strip() in ("", "all"):
        return list(SHIFTS)
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in SHIFTS]
    if unknown:
        raise ConfigError(f"unknown shift(s) {', '.join(map(repr, unknown))}; use 'all' or some of {', '.join(SHIFTS)}")
    return [n for n in SHIFTS if n in names]


def scaled(px: float, size: int) -> float:
    """A length stated at REFERENCE_SIZE px, at `size` px."""
    return px * size / REFERENCE_SIZE


def reflect_pad_to(x: torch.Tensor, size: int, left: int | None = None, top: int | None = None) -> torch.Tensor:
    """Reflect-pad a [...,h,w] tensor to size x size (the smaller image at (left, top), default
    centred). Reflection cannot reach further than the image is wide, so a small image is padded
    in steps: the mirrored context tiles outwards."""
    h, w = x.shape[-2:]
    left = (size - w) // 2 if left is None else left
    top = (size - h) // 2 if top is None else top
    right, bottom = size - w - left, size - h - top
    while left or right or top or bottom:
        h, w = x.shape[-2:]
        step = [min(left, w - 1), min(top, h - 1), min(right, w - 1), min(bottom, h - 1)]
        x = TF.pad(x, step, padding_mode="reflect")
        left, top, right, bottom = left - step[0], top - step[1], right - step[2], bottom - step[3]
    return x


def line_kernels(lengths: torch.Tensor, angles: torch.Tensor, k: int) -> torch.Tensor:
    """[B,k,k] motion-blur kernels: a line of each length (px) through the centre at each angle
    (radians), anti-aliased (weight falls off linearly within 1 px of the line), summing to 1."""
    r = torch.arange(k, dtype=torch.float32) - k // 2
    v, u = torch.meshgrid(r, r, indexing="ij")  # v: rows (y), u: columns (x)
    c, s = torch.cos(angles).view(-1, 1, 1), torch.sin(angles).view(-1, 1, 1)
    along, across = (c * u + s * v).abs(), (-s * u + c * v).abs()
    half = (lengths.float().view(-1, 1, 1) - 1) / 2
    w = (1 - across).clamp(min=0) * (1 - (along - half).clamp(min=0)).clamp(min=0)
    return w / w.sum(dim=(1, 2), keepdim=True)


def per_sample_conv(x: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Convolve each sample of a float [B,C,H,W] batch with its own [k,k] kernel (kernels
    [B,k,k]), reflect-padded like torchvision's gaussian_blur: one grouped convolution."""
    b, c, h, w = x.shape
    k = kernels.shape[-1]
    x = F.pad(x, [k // 2] * 4, mode="reflect")
    weight = kernels.to(x.device, x.dtype).repeat_interleave(c, dim=0).unsqueeze(1)  # [B*C,1,k,k]
    return F.conv2d(x.reshape(1, b * c, h + k - 1, w + k - 1), weight, groups=b * c).view(b, c, h, w)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    return x.round_().clamp_(0, 255).to(torch.uint8)


def colour_cast(x: torch.Tensor, red_gain: torch.Tensor | float, blue_gain: torch.Tensor | float) -> torch.Tensor:
    """White balance: red and blue channels scaled (per sample if tensors), green kept; float in [0,1]
    or uint8 in, same dtype out (torchvision has no white-balance functional)."""
    gains = torch.ones(x.shape[0] if isinstance(red_gain, torch.Tensor) else 1, 3, 1, 1, device=x.device)
    gains[:, 0, 0, 0] = torch.as_tensor(red_gain, dtype=torch.float32).to(x.device)
    gains[:, 2, 0, 0] = torch.as_tensor(blue_gain, dtype=torch.float32).to(x.device)
    if x.dtype == torch.uint8:
        return to_uint8(x.float() * gains)
    return (x * gains).clamp_(0, 1)


def _seed(seed: int, *parts: Any) -> int:
    return zlib.crc32(":".join(map(str, (seed, *parts))).encode())


def apply_shift(x: torch.Tensor, name: str, severity: int, seed: int = 0) -> torch.Tensor:
    """A uint8 [B,3,S,S] batch under shift `name` at `severity` (0: x itself), on x's device."""
    if name not in SHIFTS:
        parse_shifts(name)  # the one error message for an unknown name
    if severity == 0:
        return x
    if severity not in SEVERITIES:
        raise ConfigError(f"severity {severity} is unknown; use 0 (clean) or one of {SEVERITIES}")
    level = SHIFTS[name].levels[severity - 1]
    size = x.shape[-1]
    if name == "scale_down":
        return reflect_pad_to(TF.resize(x, [max(1, round(size * level))] * 2, antialias=True), size)
    if name == "gaussian_blur":
        sigma = scaled(level, size)
        return TF.gaussian_blur(x, [2 * math.ceil(3 * sigma) + 1] * 2, [sigma, sigma])
    if name == "motion_blur":
        length = max(1, round(scaled(level, size))) | 1  # odd: the kernel has a centre pixel
        angles = torch.rand(len(x), generator=torch.Generator().manual_seed(_seed(seed, name))) * math.pi
        return to_uint8(per_sample_conv(x.float(), line_kernels(torch.full((len(x),), length), angles, length)))
    if name == "jpeg":  # torchvision encodes and decodes JPEG on the CPU
        return TF.jpeg(x.cpu(), int(level)).to(x.device)
    if name == "gaussian_noise":
        with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
            torch.manual_seed(_seed(seed, name, severity))
            return TF.gaussian_noise(x, sigma=level)
    if name == "brightness":
        return TF.adjust_brightness(x, level)
    if name == "contrast":
        return TF.adjust_contrast(x, level)
    if name == "colour_cast":
        return colour_cast(x, 1 + level, 1 - level)
    if name == "grayscale":
        return TF.adjust_saturation(x, level)
    raise AssertionError(name)  # every SHIFTS entry has a branch above


def suite_cells(names: list[str] | None = None) -> list[tuple[str, int]]:
    return [(n, s) for n in (names or list(SHIFTS)) for s in SEVERITIES]


def capped_rows(labels: np.ndarray, max_images: int | None, seed: int = 0) -> np.ndarray:
    """Positions of at most `max_images` samples, stratified by label (each class keeps its share),
    seeded; all positions when there are fewer."""
    labels = np.asarray(labels)
    n = len(labels)
    if max_images is None or n <= max_images:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    quota = max_images * counts / n  # each class's share, whole images by largest remainder: exactly max_images
    take = np.floor(quota).astype(int)
    take[np.argsort(take - quota)[:max_images - take.sum()]] += 1
    keep = [rng.choice(np.flatnonzero(labels == c), size=k, replace=False) for c, k in zip(classes, take)]
    return np.sort(np.concatenate(keep))


def _cell(correct: int, n: int) -> dict[str, Any]:
    low, high = wilson_interval(correct, n)
    return {"n": n, "accuracy": correct / n if n else float("nan"), "ci95_low": low, "ci95_high": high}


def run_suite(score: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, labels: np.ndarray, *,
              index: np.ndarray | None = None, cells: list[tuple[str, int]] | None = None,
              max_images: int | None = None, seed: int = 0, batch_size: int = 256,
              device: torch.device | str = "cpu", clean: bool = True) -> dict[str, Any]:
    """Accuracy on the clean images and under each (shift, severity) cell, each with n and a
    Wilson 95 % CI. `score(uint8 batch on device) -> P(crack)` per image; predicted crack at
    >= 0.5, as evaluate(). `images`: uint8 [N,3,S,S] (CPU, e.g. the decoded cache); `index`: the
    rows scored (default all), `labels` theirs. At most `max_images` are scored: a stratified,
    seeded subset, the same in every cell, so cells compare paired. `clean=False` skips the
    clean pass (a caller that has it already)."""
    start = time.perf_counter()
    cells = suite_cells() if cells is None else list(cells)
    labels = np.asarray(labels)
    index = np.arange(len(labels)) if index is None else np.asarray(index)
    picked = capped_rows(labels, max_images, seed)
    rows, y = index[picked], torch.as_tensor(labels[picked])
    device = torch.device(device)

    # batches outer, cells inner: each batch is gathered and moved to the device once
    todo = [(None, 0)] * clean + cells  # name None: the clean images
    hits = [0] * len(todo)
    for b in range(0, len(rows), batch_size):
        x = images[torch.as_tensor(rows[b:b + batch_size])].to(device)
        for k, (name, severity) in enumerate(todo):
            prob = score(x if name is None else apply_shift(x, name, severity, _seed(seed, b)))
            hits[k] += int(((torch.as_tensor(prob).cpu() >= 0.5).long() == y[b:b + batch_size]).sum())
    clean_cell = _cell(hits[0], len(rows)) if clean else None
    table = [{"shift": n, "severity": s, "level": SHIFTS[n].levels[s - 1], "parameter": SHIFTS[n].parameter,
              **_cell(h, len(rows))} for (n, s), h in zip(cells, hits[int(clean):])]
    return {"clean": clean_cell, "mean_accuracy": float(np.mean([c["accuracy"] for c in table])) if table else float("nan"),
            "cells": table, "n_per_cell": len(rows), "of_n": len(labels), "max_images": max_images, "seed": seed,
            "image_size": int(images.shape[-1]), "seconds": time.perf_counter() - start}


SHIFT_COLUMNS = ["shift", "severity", "level", "parameter", "n", "accuracy", "ci95_low", "ci95_high"]


def shift_frame(suite: dict[str, Any] | None) -> pd.DataFrame:
    """A shift suite's result (crackcore.shift.run_suite) as a table: the clean row first."""
    if not suite:
        return pd.DataFrame(columns=SHIFT_COLUMNS)
    clean = [{"shift": "clean", "severity": 0, "level": None, "parameter": "", **suite["clean"]}] if suite["clean"] else []
    return pd.DataFrame([*clean, *suite["cells"]], columns=SHIFT_COLUMNS)
