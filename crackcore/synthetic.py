"""The embedded default dataset: procedural concrete-like patches, with and without cracks,
written as real JPEGs in the public dataset's layout (Positive/ Negative/), so the whole
pipeline runs on a fresh machine with no data and no internet. Numbers measured on it say
nothing about real concrete; everything that uses it says so.

Texture: a grey base tone per image, low-frequency shading, fine grain and a few dark pores.
Positives get one thin dark crack: a jagged random walk across much of the patch, 1-4 px
wide (at 227 px), sometimes with a branch. Negatives may get faint distractors (stains, a
short light scratch), so the task is learnable but not trivial.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from crackcore.images import cache_dir
from crackcore.outputs import build_folder

VERSION = 1
MARKER = "SYNTHETIC.json"


def default_synthetic_root(n_per_class: int, image_size: int, seed: int) -> Path:
    return cache_dir() / f"synthetic-n{n_per_class}-s{image_size}-seed{seed}"


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    base = rng.uniform(140, 200)
    coarse = rng.normal(0, 1, (max(2, size // 32),) * 2)
    shading = np.asarray(Image.fromarray(coarse.astype(np.float32)).resize((size, size), Image.BICUBIC))
    img = base + rng.uniform(4, 12) * shading + rng.normal(0, rng.uniform(5, 11), (size, size))
    for _ in range(rng.integers(2, 9)):  # pores
        y, x = rng.integers(0, size, 2)
        r = max(1, int(rng.uniform(0.5, 2.0) * size / 227))
        img[max(0, y - r):y + r, max(0, x - r):x + r] -= rng.uniform(20, 50)
    return img


def _walk(rng: np.random.Generator, size: int, start: np.ndarray, angle: float, length: float) -> list[tuple[float, float]]:
    points = [tuple(start)]
    step = size / 25
    pos = start.astype(float)
    for _ in range(int(length / step)):
        angle += rng.normal(0, 0.35)
        pos = pos + step * np.array([np.cos(angle), np.sin(angle)])
        points.append(tuple(pos))
    return points


def _draw_crack(rng: np.random.Generator, size: int, layer: ImageDraw.ImageDraw) -> None:
    scale = size / 227
    # grown both ways from a point in the central region, so every crack crosses the patch
    start = rng.uniform(0.3 * size, 0.7 * size, 2)
    angle = rng.uniform(0, 2 * np.pi)
    half = rng.uniform(0.3, 0.65) * size
    main = _walk(rng, size, start, angle + np.pi, half)[::-1] + _walk(rng, size, start, angle, half)[1:]
    width = max(1, int(round(rng.uniform(1, 4) * scale)))
    darkness = int(rng.uniform(60, 140))
    layer.line(main, fill=darkness, width=width, joint="curve")
    if rng.random() < 0.5:  # a branch from somewhere along the crack
        origin = np.array(main[rng.integers(1, max(2, len(main) - 1))])
        branch = _walk(rng, size, origin, angle + rng.choice([-1, 1]) * rng.uniform(0.5, 1.2), rng.uniform(0.2, 0.5) * size)
        layer.line(branch, fill=int(darkness * 0.8), width=max(1, width - 1), joint="curve")


def _draw_distractor(rng: np.random.Generator, size: int, layer: ImageDraw.ImageDraw) -> None:
    if rng.random() < 0.5:  # a faint stain
        x, y = rng.uniform(0, size, 2)
        r = rng.uniform(0.1, 0.3) * size
        layer.ellipse([x - r, y - r, x + r, y + r], fill=int(rng.uniform(10, 25)))
    else:  # a short, faint, straight scratch
        start = rng.uniform(0, size, 2)
        end = start + rng.uniform(-0.25, 0.25, 2) * size
        layer.line([tuple(start), tuple(end)], fill=int(rng.uniform(15, 30)), width=1)


def make_image(rng: np.random.Generator, size: int, crack: bool) -> Image.Image:
    img = _texture(rng, size)
    # dark marks are painted into a "darkening" mask, blurred a little like a real photo
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    if crack:
        _draw_crack(rng, size, draw)
    elif rng.random() < 0.6:
        _draw_distractor(rng, size, draw)
    mask = mask.filter(ImageFilter.GaussianBlur(radius=0.6 * size / 227))
    img = img - np.asarray(mask, dtype=np.float32)
    tint = rng.uniform(0.97, 1.03, 3)  # slight colour cast, like real lighting
    return Image.fromarray(np.clip(img[..., None] * tint[None, None, :], 0, 255).astype(np.uint8), "RGB")


def make_synthetic_dataset(root: Path, n_per_class: int = 400, image_size: int = 227, seed: int = 0) -> Path:
    """Write `n_per_class` JPEGs per class under root/Positive and root/Negative (atomically:
    built next to root, then renamed). An existing matching set is reused as is."""
    meta = {"generator": "crackcore.synthetic", "n_per_class": n_per_class, "image_size": image_size, "seed": seed,
            "version": VERSION}

    def build(tmp: Path) -> None:
        rng = np.random.default_rng(seed)
        for name, crack in (("Positive", True), ("Negative", False)):
            (tmp / name).mkdir()
            for i in range(1, n_per_class + 1):
                make_image(rng, image_size, crack).save(tmp / name / f"{i:05d}.jpg", quality=90)

    return build_folder(root, MARKER, meta, "synthetic set", build)
