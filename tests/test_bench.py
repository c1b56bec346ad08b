"""The benchmark runs end to end in its --quick form and prints the documented JSON keys.
Speed itself is never asserted here: the figures come from full runs (see README)."""
from __future__ import annotations

import json
from pathlib import Path

from crackcore.bench import main

KEYS = {"device", "model_only_img_s", "pipeline_img_s", "pipeline_over_model_only", "pil_baseline_img_s",
        "speedup_over_pil_baseline", "eval_img_s", "peak_memory_mb", "loader_only_img_s", "pil_loader_only_img_s",
        "loader_speedup_over_pil"}


def test_quick_bench_prints_json_line(crack_data: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "bench.json"
    assert main(["--quick", "--data", str(crack_data), "--json-out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert KEYS <= set(printed) and printed == json.loads(out.read_text())
    for key in KEYS - {"device"}:
        assert printed[key] > 0, key
    assert abs(printed["pipeline_over_model_only"] - printed["pipeline_img_s"] / printed["model_only_img_s"]) < 0.01


def test_replica_is_distinct_files_of_flipped_and_rotated_images(crack_data: Path, tmp_path: Path) -> None:
    import hashlib
    import shutil

    import numpy as np
    import pytest
    from PIL import Image

    from crackcore.bench import replicate_dataset
    from crackcore.data import DataError, discover

    src = tmp_path / "src"
    for name in ("Negative", "Positive"):
        (src / name).mkdir(parents=True)
        for f in sorted((crack_data / name).iterdir())[:3]:
            shutil.copy(f, src / name / f.name)
    root = replicate_dataset(src, 40, tmp_path / "replica")
    samples, _ = discover(root)
    assert len(samples) == 40 and samples["label"].value_counts().to_dict() == {0: 20, 1: 20}
    digests = {hashlib.sha256((root / p).read_bytes()).hexdigest() for p in samples["path"]}
    assert len(digests) == 40  # no byte-identical copies: each file is decoded on its own
    original = sorted((src / "Positive").iterdir())[0]
    with Image.open(original) as a, Image.open(root / "Positive" / f"{original.stem}-v4.jpg") as b:
        rotated = np.asarray(a.convert("RGB").transpose(Image.Transpose.ROTATE_180), dtype=float)
        assert np.abs(rotated - np.asarray(b, dtype=float)).mean() < 3  # the same image turned, re-encoded
    stamp = (root / "REPLICATED.json").stat().st_mtime_ns
    assert replicate_dataset(src, 40, tmp_path / "replica") == root
    assert (root / "REPLICATED.json").stat().st_mtime_ns == stamp  # reused, not rebuilt
    with pytest.raises(DataError, match="at most 8 variants each"):
        replicate_dataset(src, 49, tmp_path / "too-many")
    assert not (tmp_path / "too-many").exists()
