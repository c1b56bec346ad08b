"""The embedded synthetic set: real JPEGs, deterministic, cached, and positives carry cracks."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from crackcore.synthetic import make_synthetic_dataset


def test_layout_determinism_and_cache(tmp_path: Path) -> None:
    a = make_synthetic_dataset(tmp_path / "a", n_per_class=12, image_size=64, seed=3)
    b = make_synthetic_dataset(tmp_path / "b", n_per_class=12, image_size=64, seed=3)
    c = make_synthetic_dataset(tmp_path / "c", n_per_class=12, image_size=64, seed=4)
    files = sorted(p.relative_to(a) for p in a.rglob("*.jpg"))
    assert len(files) == 24 and {f.parts[0] for f in files} == {"Positive", "Negative"}
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert any((a / f).read_bytes() != (c / f).read_bytes() for f in files)
    with Image.open(a / files[0]) as im:
        assert im.size == (64, 64) and im.mode == "RGB"
    mtime = (a / files[0]).stat().st_mtime_ns
    assert make_synthetic_dataset(tmp_path / "a", n_per_class=12, image_size=64, seed=3) == a
    assert (a / files[0]).stat().st_mtime_ns == mtime
    with pytest.raises(FileExistsError):
        make_synthetic_dataset(tmp_path / "a", n_per_class=13, image_size=64, seed=3)


def test_positives_have_thin_dark_structures(tmp_path: Path) -> None:
    root = make_synthetic_dataset(tmp_path / "s", n_per_class=30, image_size=227, seed=0)

    def dark_tail(name: str) -> float:
        # how far the darkest 0.5 % of pixels fall below the image's median tone
        return float(np.mean([np.median(a := np.asarray(Image.open(p).convert("L"), float)) - np.percentile(a, 0.5)
                              for p in sorted((root / name).iterdir())]))

    assert dark_tail("Positive") > dark_tail("Negative") + 15
