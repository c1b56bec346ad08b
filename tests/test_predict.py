"""Inspection: a model fine-tuned here marks the crack tiles of a mosaic photo built from
real test-split patches, and folder mode reproduces evaluate()'s accuracy."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from crackcore.config import TrainConfig
from crackcore.data import prepare_data
from crackcore.outputs import write_run_outputs
from crackcore.classifier import load_classifier
from crackcore.predict import main, photo_summary, predict_photo
from crackcore.train import fit

ROWS, COLS = 4, 5
CRACK_CELLS = {(0, 1), (1, 3), (2, 0), (2, 2), (3, 4), (1, 1)}


@pytest.fixture(scope="module")
def run(crack_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    cfg = TrainConfig(data=str(crack_data), image_size=48, subset=600, epochs=3, lr=0.05, batch_size=64,
                      weights="random", augment_policy="flip_rotate")
    data = prepare_data(cfg)
    result = fit(cfg, data, evaluate_test=True, log=None)
    out = tmp_path_factory.mktemp("run")
    write_run_outputs(out, result, data, cfg)
    return out, {"test": result.test, "root": Path(data.source["root"])}


@pytest.fixture(scope="module")
def mosaic(run, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out, info = run
    split = pd.read_parquet(out / "split.parquet")
    test = split[split["split"] == "test"]
    pos = iter(test.loc[test["label"] == 1, "path"])
    neg = iter(test.loc[test["label"] == 0, "path"])
    photo = Image.new("RGB", (COLS * 227, ROWS * 227))
    for r in range(ROWS):
        for c in range(COLS):
            rel = next(pos) if (r, c) in CRACK_CELLS else next(neg)
            photo.paste(Image.open(info["root"] / rel).convert("RGB"), (c * 227, r * 227))
    path = tmp_path_factory.mktemp("photos") / "wall.png"
    photo.save(path)
    return path


def test_mosaic_crack_tiles_are_found(run, mosaic: Path) -> None:
    model = load_classifier(run[0] / "model.pt")
    meta = model.meta
    start = time.perf_counter()
    tiles, photo = predict_photo(model, meta, mosaic, tile=227, stride=227)
    seconds = time.perf_counter() - start
    assert len(tiles) == ROWS * COLS and set(tiles["w"]) == {227}
    truth = tiles.apply(lambda t: (t.y // 227, t.x // 227) in CRACK_CELLS, axis=1)
    accuracy = float(((tiles["prob_crack"] >= 0.5) == truth).mean())
    print(f"\nmosaic tile accuracy {accuracy:.3f} ({len(tiles)} tiles), {len(tiles) / seconds:.0f} tiles/s on CPU")
    assert accuracy >= 0.9
    summary = photo_summary(tiles, photo.shape[1], photo.shape[2])
    # non-overlapping tiles cover the photo exactly: the crack area is the share of crack tiles
    assert summary["tiles"] == 20 and summary["crack_tiles"] == int((tiles["prob_crack"] >= 0.5).sum())
    assert summary["crack_area_fraction"] == pytest.approx(summary["crack_tiles"] / 20)


def test_edge_tiles_cover_an_odd_sized_photo(run, mosaic: Path, tmp_path: Path) -> None:
    odd = tmp_path / "odd.jpg"
    Image.open(mosaic).crop((0, 0, 1000, 700)).save(odd)
    model = load_classifier(run[0] / "model.pt")
    meta = model.meta
    tiles, _ = predict_photo(model, meta, odd, tile=227, stride=200)
    assert (tiles["x"] + tiles["w"]).max() == 1000 and (tiles["y"] + tiles["h"]).max() == 700
    assert tiles["x"].min() == 0 and tiles["y"].min() == 0


def test_cli_photo_outputs(run, mosaic: Path, tmp_path: Path) -> None:
    out = tmp_path / "inspect"
    assert main(["--model", str(run[0] / "model.pt"), str(mosaic), "--out", str(out)]) == 0
    assert len(pd.read_parquet(tmp_path / "inspect_tiles.parquet")) == 20
    assert len(pd.read_parquet(tmp_path / "inspect_photos.parquet")) == 1
    with Image.open(tmp_path / "inspect_heatmaps" / "wall_heatmap.png") as im:
        assert im.size[0] > 300
    # two photos with one file name in different folders: two heat maps, named in the summary
    for d in ("north", "south"):
        (tmp_path / d).mkdir()
        shutil.copy(mosaic, tmp_path / d / "wall.jpg")
    assert main(["--model", str(run[0] / "model.pt"), str(tmp_path / "north"), str(tmp_path / "south"),
                 "--out", str(tmp_path / "two")]) == 0
    names = pd.read_parquet(tmp_path / "two_photos.parquet")["heatmap"]
    assert names.is_unique and sorted(p.name for p in (tmp_path / "two_heatmaps").iterdir()) == sorted(names)


def test_folder_mode_reproduces_evaluate(run, tmp_path: Path, capsys) -> None:
    out, info = run
    split = pd.read_parquet(out / "split.parquet")
    labelled = tmp_path / "labelled"
    for rel in split.loc[split["split"] == "test", "path"]:
        (labelled / Path(rel).parent).mkdir(parents=True, exist_ok=True)
        shutil.copy(info["root"] / rel, labelled / rel)
    assert main(["--model", str(out / "model.pt"), str(labelled), "--out", str(tmp_path / "folder")]) == 0
    df = pd.read_parquet(tmp_path / "folder.parquet")
    assert len(df) == info["test"]["n"]
    correct = int((df["pred_label"] == df["true_label"]).sum())
    assert correct == info["test"]["n"] - info["test"]["errors"]
    assert "labelled images: accuracy" in capsys.readouterr().out
    # the temperature fitted at training time (final_metrics.json, model.pt) is what predict applies
    temperature = json.loads((out / "final_metrics.json").read_text())["temperature"]
    assert torch.load(out / "model.pt", weights_only=True)["temperature"] == temperature
    logits = pd.read_parquet(out / "predictions.parquet").set_index("path")["logit_crack"]
    served = df.assign(path=[str(Path(p).relative_to(labelled)) for p in df["path"]]).set_index("path")["prob_crack"]
    expected = 1 / (1 + np.exp(-logits.loc[served.index] / temperature))
    assert np.allclose(served.to_numpy(), expected.to_numpy(), atol=1e-4)


def test_bad_inputs(run, tmp_path: Path, capsys) -> None:
    model_path = run[0] / "model.pt"
    foreign, corrupt = tmp_path / "foreign.pt", tmp_path / "corrupt.pt"
    torch.save({"foo": 1}, foreign)
    corrupt.write_bytes(np.random.default_rng(0).bytes(1000))
    from crackcore.cli import run_main

    img = next((Path(run[1]["root"]) / "Positive").iterdir())
    for bad in (foreign, corrupt):
        assert run_main(main, ["--model", str(bad), str(img), "--out", str(tmp_path / "x")]) == 1
        assert "is not a crackcore model" in capsys.readouterr().err
    damaged = tmp_path / "damaged.pt"
    payload = torch.load(model_path, weights_only=True)
    torch.save({**payload, "state_dict": {k: v[:1] if v.ndim else v for k, v in payload["state_dict"].items()}}, damaged)
    for bad, message in ((damaged, "holds damaged weights"), (run[0], "is a folder; pass the model file in it")):
        assert run_main(main, ["--model", str(bad), str(img), "--out", str(tmp_path / "x")]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    folder = tmp_path / "mixed"
    folder.mkdir()
    shutil.copy(img, folder / "good.jpg")
    (folder / "broken.jpg").write_bytes(b"not a jpeg at all")
    assert main(["--model", str(model_path), str(folder), "--out", str(tmp_path / "mixed")]) == 0
    assert len(pd.read_parquet(tmp_path / "mixed.parquet")) == 1
    assert "skipped unreadable image" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert run_main(main, ["--model", str(model_path), str(tmp_path / "empty"), "--out", str(tmp_path / "e")]) == 1
    assert "no images found" in capsys.readouterr().err


def test_16_bit_patches_score_like_8_bit_and_bad_flags_are_one_line(run, tmp_path: Path, capsys) -> None:
    from PIL import Image

    from crackcore.cli import run_main

    model_path = run[0] / "model.pt"
    src = next((Path(run[1]["root"]) / "Positive").iterdir())
    gray = np.asarray(Image.open(src).convert("L"))
    folder = tmp_path / "mixed-depth"
    folder.mkdir()
    Image.fromarray(gray).save(folder / "gray8.png")
    Image.fromarray(gray.astype(np.uint16) * 257).save(folder / "gray16.png")
    assert main(["--model", str(model_path), str(folder), "--out", str(tmp_path / "depth")]) == 0
    df = pd.read_parquet(tmp_path / "depth.parquet").set_index("path")
    assert len(df) == 2 and df["prob_crack"].nunique() == 1, df["prob_crack"]
    capsys.readouterr()
    for flags, message in ((["--batch-size", "0"], "--batch-size must be >= 1"), (["--out", f"{tmp_path}/.."], "names a folder"),
                           (["--stride", "0"], "--stride must be in 1..")):
        args = ["--model", str(model_path), str(src), "--out", str(tmp_path / "x"), *flags]
        assert run_main(main, args) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    # nothing readable: exit 1 and an earlier result is kept, not replaced by an empty table
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "a.jpg").write_bytes(b"not a jpeg")
    before = (tmp_path / "depth.parquet").read_bytes()
    assert main(["--model", str(model_path), str(tmp_path / "broken"), "--out", str(tmp_path / "depth")]) == 1
    assert (tmp_path / "depth.parquet").read_bytes() == before
