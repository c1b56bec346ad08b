"""Near-duplicate groups: planted re-saves land in one split under the grouped strategy, and
the random strategy does not guarantee it."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from PIL import Image, ImageEnhance

import crackcore.neardup as nd
from crackcore.config import TrainConfig
from crackcore.data import add_content_hashes, discover, prepare_data


@pytest.fixture(scope="module")
def planted(crack_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, set[str]]]:
    """40 real images per class, 4 of them with near-duplicate re-saves and one byte copy."""
    root = tmp_path_factory.mktemp("planted")
    families: dict[str, set[str]] = {}
    for name in ("Positive", "Negative"):
        (root / name).mkdir()
        for i, src in enumerate(sorted((crack_data / name).iterdir())[:40]):
            shutil.copy(src, root / name / src.name)
            if i < 4:
                im = Image.open(src).convert("RGB")
                family = {f"{name}/{src.name}"}
                for k, (quality, brightness) in enumerate(((60, 1.0), (85, 1.03), (95, 0.98))):
                    out = root / name / f"{src.stem}_resave{k}.jpg"
                    ImageEnhance.Brightness(im).enhance(brightness).save(out, quality=quality)
                    family.add(f"{name}/{out.name}")
                shutil.copy(src, root / name / f"{src.stem}_copy.jpg")
                family.add(f"{name}/{src.stem}_copy.jpg")
                families[f"{name}/{src.name}"] = family
    return root, families


def test_groups_hold_each_family_and_nothing_else(planted) -> None:
    root, families = planted
    samples, _ = discover(root)
    samples = add_content_hashes(root, samples)
    groups = samples.assign(group=nd.near_duplicate_groups(root, samples)).set_index("path")["group"]
    for family in families.values():
        assert groups.loc[sorted(family)].nunique() == 1, family
    in_family = set().union(*families.values())
    singles = groups.drop(index=sorted(in_family))
    assert singles.is_unique and not set(singles) & set(groups.loc[sorted(in_family)])
    report = nd.group_report(samples.assign(group=groups.to_numpy()))
    assert report["multi_image_groups"] == 8 and report["images_in_multi_groups"] == 40
    assert report["groups"] == 8 + 72 and report["cross_class_groups"] == 0


def test_grouped_split_keeps_families_together_random_does_not(planted) -> None:
    root, families = planted
    straddled, leaked = False, 0
    for seed in range(12):
        grouped = prepare_data(TrainConfig(data=str(root), image_size=32, split_strategy="grouped", split_seed=seed))
        split = grouped.samples.set_index("path")["split"]
        assert all(split.loc[sorted(f)].nunique() == 1 for f in families.values())
        near_groups = grouped.samples.set_index("path")["group"]
        assert nd.near_duplicate_leaks(grouped.samples, near_groups) == 0
        rnd = prepare_data(TrainConfig(data=str(root), image_size=32, split_strategy="random", split_seed=seed))
        rsplit = rnd.samples.set_index("path")["split"]
        straddled |= any(rsplit.loc[sorted(f)].nunique() > 1 for f in families.values())
        # by hand: random-split test images whose family also has a member in train
        by_hand = sum(1 for f in families.values() for p in f
                      if rsplit[p] == "test" and any(rsplit[q] == "train" for q in f))
        assert nd.near_duplicate_leaks(rnd.samples, near_groups) == by_hand
        leaked += by_hand
    assert straddled, "a random split should put some re-saved copies in different splits"
    assert leaked > 0, "some random-split test image should have a near-duplicate in train"


def test_signatures_are_cached(planted, monkeypatch) -> None:
    root, _ = planted
    samples = add_content_hashes(root, discover(root)[0])
    first = nd.near_duplicate_groups(root, samples)

    def boom(path):
        raise AssertionError(f"recomputed {path}")

    monkeypatch.setattr(nd, "_signature", boom)
    assert nd.near_duplicate_groups(root, samples).equals(first)


def test_16_bit_images_get_their_own_signature_not_a_white_one(crack_data: Path, tmp_path: Path) -> None:
    import numpy as np

    sigs = []
    for src in sorted((crack_data / "Positive").iterdir())[:3]:
        gray = np.asarray(Image.open(src).convert("L"))
        Image.fromarray(gray).save(tmp_path / f"{src.stem}-8.png")
        Image.fromarray(gray.astype(np.uint16) * 257).save(tmp_path / f"{src.stem}-16.png")
        sig8, sig16 = nd._signature(tmp_path / f"{src.stem}-8.png"), nd._signature(tmp_path / f"{src.stem}-16.png")
        assert sig16 == sig8  # the same picture, the same pHash and thumbnail
        sigs.append(sig16[0])
    assert len(set(sigs)) == 3
