"""crackcore.sources: class-folder layouts of real crack datasets on real images, their errors,
and NAME=PATH data sources."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pandas as pd
import pytest

from crackcore.exceptions import ConfigError, DataError
from crackcore.sources import check_root, discover, parse_sources


def legacy_discover(root: Path) -> tuple[pd.DataFrame, dict[str, int]]:
    """discover() as it was before layouts (Positive/Negative only), the reference for that layout."""
    rows, skipped = [], 0
    for label, name in enumerate(("Negative", "Positive")):
        for p in sorted((root / name).rglob("*")):
            if not p.is_file() or p.name.startswith("."):
                continue
            if p.suffix.lower() in {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".pt"}:
                rows.append((p.relative_to(root).as_posix(), label, p.stat().st_size))
            else:
                skipped += 1
    return pd.DataFrame(rows, columns=["path", "label", "bytes"]), {"skipped_non_image": skipped, "skipped_non_utf8_name": 0}


def build(root: Path, crack_data: Path, folders: dict[str, int], per_folder: int = 3) -> dict[str, int]:
    """Copy distinct real images into each class folder (label 1 from Positive/, 0 from Negative/);
    returns {expected relative path: label}."""
    taken = {0: 0, 1: 0}
    expected = {}
    for folder, label in folders.items():
        files = sorted((crack_data / ("Positive" if label else "Negative")).iterdir())
        (root / folder).mkdir(parents=True)
        for f in files[taken[label]:taken[label] + per_folder]:
            shutil.copy(f, root / folder / f.name)
            expected[f"{folder}/{f.name}"] = label
        taken[label] += per_folder
    return expected


LAYOUTS = {
    "crack/no_crack": {"crack": 1, "no_crack": 0},
    "mixed case": {"Cracked": 1, "UnCracked": 0},
    "nocrack": {"crack": 1, "NoCrack": 0},
    "no-crack": {"crack": 1, "no-crack": 0},
    "SDNET flat": {"CD": 1, "UD": 0, "CW": 1, "UW": 0},
    "SDNET nested": {"D/CD": 1, "D/UD": 0, "W/CW": 1, "W/UW": 0},
}


@pytest.mark.parametrize("folders", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_layouts_give_the_right_labels_and_paths(crack_data: Path, tmp_path: Path, folders: dict[str, int]) -> None:
    root = tmp_path / "data"
    expected = build(root, crack_data, folders)
    samples, skipped = discover(root)
    assert check_root(root) == root and skipped == {"skipped_non_image": 0, "skipped_non_utf8_name": 0}
    assert list(samples.columns) == ["path", "label", "bytes"] and len(samples) == 3 * len(folders)
    # no-crack rows first, each class folder in path order, as Negative/ then Positive/ always were
    assert list(samples["path"]) == sorted(expected, key=lambda p: (expected[p], p))
    assert dict(zip(samples["path"], samples["label"])) == expected
    assert list(samples["bytes"]) == [(root / p).stat().st_size for p in samples["path"]]
    for p, label in zip(samples["path"], samples["label"]):  # label 1 exactly for the bytes of a Positive/ file
        assert (root / p).read_bytes() == (crack_data / ("Positive" if label else "Negative") / Path(p).name).read_bytes()


def test_positive_negative_is_unchanged_on_the_real_sample(crack_data: Path, tmp_path: Path) -> None:
    samples, skipped = discover(crack_data)
    reference, ref_skipped = legacy_discover(crack_data)
    pd.testing.assert_frame_equal(samples, reference)
    assert skipped == ref_skipped
    if crack_data.name == "concrete-crack-sample":
        assert samples["label"].value_counts().to_dict() == {0: 3000, 1: 3000}
        assert samples["path"].iloc[0] == "Negative/00019.jpg" and samples["path"].iloc[3000] == "Positive/00038.jpg"
    # sub-folders, a hidden file and a non-image file, as legacy handled them
    root = tmp_path / "pn"
    build(root, crack_data, {"Positive": 1, "Negative": 0, "Positive/batch2": 1})
    (root / "Negative" / "notes.txt").write_text("inspection notes")
    (root / "Negative" / ".DS_Store").write_bytes(b"\0")
    (root / "Positive" / "Thumbs.db").write_bytes(b"\0")
    samples, skipped = discover(root)
    reference, ref_skipped = legacy_discover(root)
    pd.testing.assert_frame_equal(samples, reference)
    assert skipped == ref_skipped == {"skipped_non_image": 2, "skipped_non_utf8_name": 0} and len(samples) == 9


def test_root_class_folders_win_over_nested_ones(crack_data: Path, tmp_path: Path) -> None:
    expected = build(tmp_path, crack_data, {"crack": 1, "no_crack": 0})
    build(tmp_path / "old", crack_data, {"Positive": 1}, per_folder=2)
    samples, _ = discover(tmp_path)
    assert dict(zip(samples["path"], samples["label"])) == expected


def test_errors_name_the_problem_and_the_fix(crack_data: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=f"data folder {tmp_path / 'nope'} does not exist; pass --data PATH"):
        discover(tmp_path / "nope")
    (tmp_path / "file.jpg").write_bytes(b"x")
    with pytest.raises(DataError, match="is not a folder; pass the folder that holds Positive/ and Negative/"):
        check_root(tmp_path / "file.jpg")

    odd = tmp_path / "odd"
    for name in ["images", "labels", *[f"f{i:02d}" for i in range(10)], ".git"]:
        (odd / name / "x").mkdir(parents=True)
    for fn in (discover, check_root):
        with pytest.raises(DataError) as err:
            fn(odd)
        assert str(err.value) == (
            f"no class folders in {odd} (sub-folders: f00/, f01/, f02/, f03/, f04/, f05/, f06/, f07/, f08/, f09/, ... "
            "(2 more)); --data must hold a crack and a no-crack folder in one of these layouts (names in any case): "
            "Positive/Negative, crack/no_crack (or nocrack, no-crack), cracked/uncracked, or SDNET2018's "
            "CD,CW,CP/UD,UW,UP (directly or under D/, W/, P/)")
    with pytest.raises(DataError, match=r"\(sub-folders: none\)"):
        discover(tmp_path / "odd" / "images" / "x")

    only_crack = tmp_path / "only_crack"
    build(only_crack, crack_data, {"crack": 1, "CD": 1})
    with pytest.raises(DataError) as err:
        check_root(only_crack)
    assert str(err.value) == (f"{only_crack} has no no-crack class folder (found only CD, crack); add one named "
                              "Negative, no_crack, nocrack, no-crack, uncracked, UD, UW, UP (any case) or fix --data")
    only_ok = tmp_path / "only_ok"
    build(only_ok, crack_data, {"D/UD": 0})
    with pytest.raises(DataError, match=r"has no crack class folder \(found only D/UD\); add one named Positive, "):
        discover(only_ok)

    pn = tmp_path / "pn"
    build(pn, crack_data, {"Negative": 0})
    with pytest.raises(DataError) as err:
        discover(pn)
    assert str(err.value) == (f"class folder {pn / 'Positive'} is missing; the data folder must hold Positive/ (crack) "
                              "and Negative/ (no crack) sub-folders")

    empty = tmp_path / "empty"
    build(empty, crack_data, {"W/CW": 1})
    (empty / "W" / "UW").mkdir()
    (empty / "W" / "UW" / "notes.txt").write_text("no images")
    for fn in (discover, check_root):
        with pytest.raises(DataError) as err:
            fn(empty)
        assert str(err.value) == f"class folder {empty / 'W' / 'UW'} has no images (.jpg/.png/.pt); add images or fix --data"


def test_parse_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    got = parse_sources(["data/concrete/", "masonry=~/sets/brick", "q.w-1=rel/../quay"])
    assert list(got.items()) == [("concrete", str(tmp_path / "data" / "concrete")),
                                 ("masonry", str(tmp_path / "home" / "sets" / "brick")),
                                 ("q.w-1", str(tmp_path / "quay"))]
    assert parse_sources(["a=/x=y"]) == {"a": "/x=y"} and parse_sources([]) == {}
    cases = [
        (["a/concrete", "b/concrete"], f"data source name 'concrete' is given twice ({tmp_path / 'a' / 'concrete'} "
                                       f"and {tmp_path / 'b' / 'concrete'}); name one of them with NAME=PATH"),
        (["masonry="], "data source 'masonry=' has no path; write NAME=PATH"),
        (["-x=/d"], "data source name '-x' (from '-x=/d') must start with a letter or digit and hold only letters, "
                    "digits, '.', '_' and '-'; write NAME=PATH"),
        (["=/d"], "data source name '' (from '=/d') must start"),
        (["my set=/d"], "data source name 'my set'"),
        (["/"], "data source name '' (from '/') must start"),
    ]
    for specs, message in cases:
        with pytest.raises(ConfigError) as err:
            parse_sources(specs)
        assert str(err.value).startswith(message), specs


def test_a_folder_of_whole_datasets_is_not_merged_into_one(tmp_path: Path, crack_data: Path) -> None:
    for name in ("concrete", "masonry"):
        for cls in ("Positive", "Negative"):
            (tmp_path / name / cls).mkdir(parents=True)
            shutil.copy(next((crack_data / cls).glob("*.jpg")), tmp_path / name / cls)
    with pytest.raises(DataError, match=r"no class folders in .* \(sub-folders: concrete/, masonry/\)"):
        discover(tmp_path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any folder; run as a user to see this fault")
def test_an_unreadable_class_folder_is_named_as_unreadable_not_empty(tmp_path: Path) -> None:
    for cls in ("Positive", "Negative"):
        (tmp_path / cls).mkdir()
        (tmp_path / cls / "a.jpg").write_bytes(b"x")
    (tmp_path / "Positive").chmod(0)
    try:
        with pytest.raises(DataError, match="cannot be read"):
            check_root(tmp_path)
    finally:
        (tmp_path / "Positive").chmod(0o755)
