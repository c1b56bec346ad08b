"""crackcore.data: discovery, duplicates, deterministic splits, the decode cache, bad input."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from crackcore.config import TrainConfig
from crackcore.data import CrackDataset, prepare_data
from crackcore.exceptions import DataError
from crackcore.images import decode_file, read_rgb

REPO = Path(__file__).resolve().parents[1]


def copy_sample(src: Path, dst: Path, per_class: int, start: int = 0) -> Path:
    for name in ("Positive", "Negative"):
        (dst / name).mkdir(parents=True, exist_ok=True)
        for f in sorted((src / name).iterdir())[start:start + per_class]:
            shutil.copy(f, dst / name / f.name)
    return dst


@pytest.fixture
def small_root(crack_data: Path, tmp_path: Path) -> Path:
    return copy_sample(crack_data, tmp_path / "data", 40)


def cfg(root: Path, **kw) -> TrainConfig:
    return TrainConfig(data=str(root), image_size=32, **kw)


def split_of(data) -> dict[str, str]:
    return dict(zip(data.samples["path"], data.samples["split"]))


def test_split_is_deterministic_disjoint_and_seeded(crack_data: Path) -> None:
    a = prepare_data(cfg(crack_data, subset=150))
    b = prepare_data(cfg(crack_data, subset=150))
    assert split_of(a) == split_of(b)
    rows = [set(a.indices(split).tolist()) for split in ("train", "val", "test")]
    assert all(rows) and not (rows[0] & rows[1] or rows[0] & rows[2] or rows[1] & rows[2])  # disjoint
    assert set().union(*rows) == set(range(len(a.samples)))  # and every image in one of them
    c = prepare_data(cfg(crack_data, subset=150, split_seed=1))
    assert split_of(c) != split_of(a)
    assert (a.samples.groupby("label").size() == 150).all()


def test_full_sample_split_is_stratified(crack_data: Path) -> None:
    data = prepare_data(cfg(crack_data))
    n = len(data.samples)
    for split, frac in zip(("train", "val", "test"), (0.70, 0.15, 0.15)):
        part = data.samples[data.samples["split"] == split]
        assert abs(len(part) / n - frac) < 0.03, split
        assert abs(part["label"].mean() - 0.5) < 0.05, split


def test_adding_files_never_moves_existing_ones(crack_data: Path, tmp_path: Path) -> None:
    root = copy_sample(crack_data, tmp_path / "grow", 60)
    before = split_of(prepare_data(cfg(root)))
    copy_sample(crack_data, root, 20, start=60)
    after = split_of(prepare_data(cfg(root)))
    assert len(after) == len(before) + 40
    assert all(after[p] == s for p, s in before.items())


def test_byte_identical_copies_share_a_split(small_root: Path) -> None:
    originals = sorted((small_root / "Positive").iterdir())[:6]
    for i, f in enumerate(originals):
        for k in range(2):
            shutil.copy(f, small_root / "Positive" / f"copy{k}_{i}.jpg")
    for seed in range(5):
        data = prepare_data(cfg(small_root, split_seed=seed))
        assert data.source["exact_duplicate_files"] == 12
        per_group = data.samples.groupby("content_hash")["split"].nunique()
        assert (per_group == 1).all()


def test_decode_cache_is_reused_and_keyed_by_size(small_root: Path) -> None:
    cache = Path(os.environ["CRACK_CACHE"]) / "images"
    prepare_data(cfg(small_root))
    files = {p: p.stat().st_mtime_ns for p in cache.glob("*.npy")}
    prepare_data(cfg(small_root))
    assert {p: p.stat().st_mtime_ns for p in cache.glob("*.npy")} == files  # nothing re-decoded
    prepare_data(TrainConfig(data=str(small_root), image_size=40))
    assert len(list(cache.glob("*.npy"))) == len(files) + 1


# --------------------------------------------------------------------------- bad input


def test_missing_root_and_class_folders(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        prepare_data(cfg(tmp_path / "nope"))
    (tmp_path / "d" / "Positive").mkdir(parents=True)
    with pytest.raises(DataError, match="Negative is missing"):
        prepare_data(cfg(tmp_path / "d"))
    (tmp_path / "d" / "Negative").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "d" / "Positive" / "a.jpg")
    with pytest.raises(DataError, match="Negative has no images"):
        prepare_data(cfg(tmp_path / "d"))


@pytest.mark.parametrize("split_strategy", ["random", "grouped"])  # grouped hashes every image first
def test_corrupt_and_non_image_files_are_skipped_and_counted(small_root: Path, capsys, split_strategy: str) -> None:
    good = sorted((small_root / "Positive").iterdir())[0].read_bytes()
    (small_root / "Positive" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (small_root / "Negative" / "text.jpg").write_text("not an image")
    (small_root / "Negative" / "notes.txt").write_text("inspection notes")
    (small_root / "Positive" / "Thumbs.db").write_bytes(b"\0" * 10)
    data = prepare_data(cfg(small_root, split_strategy=split_strategy))
    assert data.source["skipped_unreadable"] == 2 and data.source["skipped_non_image"] == 2
    assert len(data.samples) == 80 and not data.samples["path"].str.contains("truncated|text").any()
    err = capsys.readouterr().err
    assert "skipped 2 unreadable image file(s)" in err and "skipped 2 non-image file(s)" in err


def test_a_class_with_only_unreadable_files_is_an_error(tmp_path: Path, crack_data: Path) -> None:
    root = copy_sample(crack_data, tmp_path / "d", 5)
    for f in (root / "Negative").iterdir():
        f.write_bytes(b"garbage")
    with pytest.raises(DataError, match="no readable Negative images"):
        prepare_data(cfg(root))


def test_grayscale_and_odd_sized_images_become_rgb_squares(tmp_path: Path, crack_data: Path) -> None:
    src = sorted((crack_data / "Positive").iterdir())[0]
    Image.open(src).convert("L").save(tmp_path / "gray.jpg")
    Image.open(src).resize((300, 200)).save(tmp_path / "odd.png")
    for name in ("gray.jpg", "odd.png"):
        img = decode_file(tmp_path / name, 48)
        assert img.shape == (3, 48, 48) and img.dtype == torch.uint8
    gray = decode_file(tmp_path / "gray.jpg", 48)
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])


def test_16_bit_bmp_and_tiff_images_decode_like_their_8_bit_original(tmp_path: Path, crack_data: Path) -> None:
    src = sorted((crack_data / "Negative").iterdir())[0]
    gray8 = np.asarray(Image.open(src).convert("L"))
    Image.fromarray(gray8).save(tmp_path / "gray8.png")
    Image.fromarray(gray8.astype(np.uint16) * 257).save(tmp_path / "gray16.png")  # PIL mode I;16
    Image.fromarray(gray8.astype(np.uint16) * 257).save(tmp_path / "gray16.tif")
    Image.open(src).save(tmp_path / "rgb.bmp")
    Image.open(src).save(tmp_path / "rgb.tiff")
    reference = decode_file(tmp_path / "gray8.png", 64)
    Image.fromarray(gray8.astype(np.float32) / 255).save(tmp_path / "float.tif")  # PIL mode F, 0..1
    for name in ("gray16.png", "gray16.tif", "float.tif"):  # scaled to 8 bits, not wrapped or clipped
        assert torch.equal(decode_file(tmp_path / name, 64), reference), name
    rgb = read_rgb(tmp_path / "rgb.bmp")
    assert rgb.dtype == torch.uint8 and torch.equal(rgb, torch.from_numpy(np.asarray(Image.open(src).convert("RGB"))).permute(2, 0, 1))
    assert torch.equal(read_rgb(tmp_path / "rgb.tiff"), rgb)


def test_saved_tensor_folder_loads_like_jpegs(tmp_path: Path, crack_data: Path) -> None:
    jpg_root = copy_sample(crack_data, tmp_path / "jpg", 20)
    pt_root = tmp_path / "pt"
    kinds = {}
    for i, f in enumerate(sorted(jpg_root.rglob("*.jpg"))):
        img = decode_file(f, 227)
        kinds[f"{f.parent.name}/{f.stem}"] = kind = i % 3  # uint8 CHW, float CHW in 0..1, grayscale HW
        tensor = img if kind == 0 else (img.float() / 255 if kind == 1 else img.float().mean(0) / 255)
        out = pt_root / f.parent.name / (f.stem + ".pt")
        out.parent.mkdir(parents=True, exist_ok=True)
        torch.save(tensor, out)
    a, b = prepare_data(cfg(jpg_root)), prepare_data(cfg(pt_root))
    assert b.images.shape == a.images.shape
    key = lambda p: p.rsplit(".", 1)[0]
    a_rows = {key(p): i for i, p in enumerate(a.samples["path"])}
    b_rows = {key(p): i for i, p in enumerate(b.samples["path"])}
    assert a_rows.keys() == b_rows.keys()
    for k, kind in kinds.items():
        assert a.samples.at[a_rows[k], "label"] == b.samples.at[b_rows[k], "label"]
        jpg, pt = a.images[a_rows[k]].astype(np.int16), b.images[b_rows[k]].astype(np.int16)
        if kind == 0:  # the uint8 tensor saved from a decoded JPEG gives the same pixels
            assert np.array_equal(jpg, pt)
        elif kind == 1:  # float 0..1: the same pixels after rounding
            assert np.abs(jpg - pt).max() <= 1
        else:  # grayscale: every channel is the JPEG's channel mean (the resize may move it a level)
            assert np.abs(jpg.mean(0) - pt).max() <= 1.5 and np.array_equal(pt[0], pt[1])
        assert b.images[b_rows[k]].shape == (3, 32, 32)


@pytest.mark.parametrize("tensor", [torch.full((3, 8, 8), 200.0), torch.full((3, 8, 8), 300, dtype=torch.int32),
                                    torch.full((3, 8, 8), -0.5)], ids=["float-0-255", "int-over-255", "negative"])
def test_saved_tensor_out_of_range_is_refused_not_clamped(tmp_path: Path, tensor: torch.Tensor) -> None:
    torch.save(tensor, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="outside"):
        decode_file(tmp_path / "x.pt", 8)


def test_crack_dataset_serves_normalised_images(small_root: Path) -> None:
    ds = CrackDataset.from_folder(small_root, split="train", image_size=32, augment_policy="flip")
    x, y = ds[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y in (0, 1)
    plain = CrackDataset(ds.data, split="train", augment_policy="none")
    for i in (0, len(plain) - 1):  # the cached pixels, ImageNet-normalised, with the split's label
        row = int(plain.rows[i])
        pixels = torch.from_numpy(np.array(ds.data.images[row])).float() / 255
        expected = (pixels - torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
        x, y = plain[i]
        assert torch.allclose(x, expected, atol=1e-6) and y == int(ds.data.samples.at[row, "label"])
    assert ds.sample_id(0).startswith(("Positive/", "Negative/"))
    assert len(ds) == len(ds.data.indices("train"))


def test_cli_error_is_one_line_and_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "crackcore.fit", "--data", "/nonexistent", "--epochs", "1",
                           "--out", str(out)], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 1 and not out.exists()
    assert proc.stderr.strip().splitlines()[-1].startswith("error: data folder /nonexistent does not exist")
    assert "Traceback" not in proc.stderr
