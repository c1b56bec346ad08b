"""`python -m crackcore.predict --model results/<study>/model.pt INPUT... --out OUT`

Apply a trained model to new images. Patch-sized images (both sides <= 1.5 tiles, or smaller
than one tile) are classified as one image, decoded like training data (shorter side resized,
centre-cropped square: an elongated patch loses its ends, with a warning): OUT.parquet, and
accuracy/precision/recall with 95 % CIs when the inputs sit in Positive/ Negative/ folders.
Larger photos (the dataset's patches came from 4032x3024 photos) are tiled with 227-px
windows (the last row/column shifted to end at the border, so every pixel is covered and
no tile is padded): OUT_tiles.parquet, OUT_photos.parquet and a heat-map PNG per photo in
OUT_heatmaps/. Image size, normalisation, temperature and the decision threshold (a crack when
prob_crack >= it; 0.5 unless `python -m crackcore.calibrate` fitted one) come from model.pt, or
from model.onnx (python -m crackcore.export), which runs on onnxruntime with the same outputs.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torchvision.transforms.v2.functional as TF

from crackcore.classifier import DEFAULT_THRESHOLD, Classifier, load_classifier, temperature_of, threshold_of
from crackcore.devices import resolve_device
from crackcore.exceptions import DataError, ModelFileError
from crackcore.images import IMAGE_SUFFIXES, TENSOR_SUFFIX, decode_file, read_rgb, readable_name, utf8_name
from crackcore.metrics import binary_metrics, format_accuracy, wilson_interval
from crackcore.outputs import write_bytes, write_parquet
from crackcore.shift import capped_rows, parse_shifts, run_suite, shift_frame, suite_cells
from crackcore.progress import track
from crackcore.sites import PATCH_MAX_SIDE, TILE, image_size_of
from crackcore.sources import FOLDER_LABEL, warn_bad_names

HEATMAP_MAX_SIDE = 1600  # px, the heat-map PNG is downscaled to this


def describe_threshold(meta: dict[str, Any]) -> str:
    c = meta.get("calibration")
    where = f"calibrated on {c.get('site_name', c.get('site'))}, k={c.get('k')}" if c else "default"
    return f"decision threshold {threshold_of(meta):.3g} ({where})"


def true_label(path: Path) -> int | None:
    """The label a class folder in `path` gives (any layout crackcore.sources reads), else None.
    Pass the path below the input folder: a 'crack' folder above it is no label."""
    return next((FOLDER_LABEL[p.lower()] for p in reversed(path.parts[:-1]) if p.lower() in FOLDER_LABEL), None)


def predict_patches(model: Classifier, meta: dict[str, Any], paths: list[Path], batch_size: int = 128,
                    progress: bool = True, labels: dict[Path, int | None] | None = None
                    ) -> tuple[pd.DataFrame, list[tuple[Path, str]]]:
    rows, failed = [], []
    threshold = threshold_of(meta)
    for start in track(range(0, len(paths), batch_size), "patches", unit="batches",
                       enabled=progress and len(paths) > batch_size):
        imgs, ok = [], []
        for p in paths[start:start + batch_size]:
            try:
                imgs.append(decode_file(p, meta["image_size"], exif=True))
                ok.append(p)
            except Exception as exc:
                failed.append((p, str(exc).splitlines()[0][:200]))
        if ok:
            prob = model.prob_crack(torch.stack(imgs))
            rows += [{"path": str(p), "prob_crack": float(q), "pred_label": int(q >= threshold),
                      "true_label": (labels or {}).get(p, true_label(Path(p.parent.name, p.name)))} for p, q in zip(ok, prob)]
    df = pd.DataFrame(rows, columns=["path", "prob_crack", "pred_label", "true_label"])
    return df.astype({"true_label": "Int64"}), failed


def window_starts(length: int, tile: int, stride: int) -> list[int]:
    starts = list(range(0, max(1, length - tile + 1), stride))
    if starts[-1] + tile < length:
        starts.append(length - tile)  # the edge window ends exactly at the border
    return starts


def predict_photo(model: Classifier, meta: dict[str, Any], path: Path, tile: int = TILE, stride: int = TILE,
                  batch_size: int = 128) -> tuple[pd.DataFrame, torch.Tensor]:
    """Per-tile probabilities of one photo, and the decoded photo (uint8 [3,H,W]) turned upright
    as its EXIF orientation says (phones store the sensor's orientation and a tag)."""
    photo = read_rgb(path, exif=True)
    _, h, w = photo.shape
    boxes = [(x, y) for y in window_starts(h, tile, stride) for x in window_starts(w, tile, stride)]
    probs = []
    for start in range(0, len(boxes), batch_size):
        crops = [photo[:, y:y + tile, x:x + tile] for x, y in boxes[start:start + batch_size]]
        probs.append(model.prob_crack(TF.resize(torch.stack(crops), [meta["image_size"]] * 2, antialias=True)))
    tiles = pd.DataFrame([{"photo": str(path), "x": x, "y": y, "w": tile, "h": tile} for x, y in boxes])
    return tiles.assign(prob_crack=np.concatenate(probs)), photo


def photo_summary(tiles: pd.DataFrame, height: int, width: int, threshold: float = DEFAULT_THRESHOLD) -> dict[str, Any]:
    covered = np.zeros((height, width), dtype=bool)
    for t in tiles[tiles["prob_crack"] >= threshold].itertuples():
        covered[t.y:t.y + t.h, t.x:t.x + t.w] = True
    return {"photo": tiles["photo"].iloc[0], "width": width, "height": height, "tiles": len(tiles),
            "crack_tiles": int((tiles["prob_crack"] >= threshold).sum()), "crack_area_fraction": float(covered.mean()),
            "max_prob_crack": float(tiles["prob_crack"].max())}


def heatmap_png(photo: torch.Tensor, tiles: pd.DataFrame, threshold: float = DEFAULT_THRESHOLD) -> bytes:
    """The photo with crack tiles (prob >= threshold) tinted red by probability, and a colour bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _, h, w = photo.shape
    scale = min(1.0, HEATMAP_MAX_SIDE / max(h, w))
    small = TF.resize(photo, [max(1, int(h * scale)), max(1, int(w * scale))], antialias=True)
    heat = np.zeros(small.shape[1:], dtype=np.float32)
    for t in tiles.itertuples():  # overlapping tiles: a pixel shows its most confident tile
        y0, y1, x0, x1 = (int(v * scale) for v in (t.y, t.y + t.h, t.x, t.x + t.w))
        heat[y0:y1, x0:x1] = np.maximum(heat[y0:y1, x0:x1], t.prob_crack)
    fig, ax = plt.subplots(figsize=(10, 10 * small.shape[1] / small.shape[2] + 0.5), dpi=100)
    ax.imshow(small.permute(1, 2, 0).numpy())
    im = ax.imshow(np.ma.masked_less(heat, threshold), cmap="Reds", vmin=threshold, vmax=1.0, alpha=0.55,
                   interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.035, pad=0.02, label=f"crack probability (tiles >= {threshold:.3g})")
    ax.set_title(f"{Path(tiles['photo'].iloc[0]).name}: {int((tiles['prob_crack'] >= threshold).sum())} of {len(tiles)} "
                 f"tiles flagged as crack")
    ax.axis("off")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def collect_inputs(inputs: list[str]) -> tuple[list[Path], dict[Path, int | None], list[str]]:
    """The image files of the inputs, their labels from class folders below each input folder,
    and what could not be read. Files whose names are not UTF-8 are skipped, with one line."""
    files, labels, problems, bad_names = [], {}, [], []
    for item in inputs:
        p = Path(item).expanduser()
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES | {TENSOR_SUFFIX})
            bad_names += [f for f in found if not utf8_name(f)]
            found = [f for f in found if utf8_name(f)]
            if not found:
                problems.append(f"{readable_name(p)} holds no images")
            files += found
            labels.update({f: true_label(f.relative_to(p)) for f in found})
        elif p.is_file():
            (files if utf8_name(p) else bad_names).append(p)
        else:
            problems.append(f"{readable_name(p)} does not exist")
    warn_bad_names(bad_names, "the inputs")
    return files, labels, problems


def print_labelled_metrics(df: pd.DataFrame) -> None:
    labelled = df.dropna(subset=["true_label"])
    if labelled.empty:
        return
    m = binary_metrics(labelled["true_label"].astype(int), labelled["pred_label"], labelled["prob_crack"])
    print(f"labelled images: accuracy {format_accuracy(m['accuracy'], m['n'], m['ci95_low'], m['ci95_high'])}")
    for name, k, total in (("precision", m["tp"], m["tp"] + m["fp"]), ("recall", m["tp"], m["tp"] + m["fn"])):
        if total:
            print(f"  {name} {format_accuracy(k / total, total, *wilson_interval(k, total))}")


def heatmap_names(photos: list[Path]) -> dict[Path, str]:
    """`<stem>_heatmap.png` per photo; photos sharing a stem (a/IMG_1.jpg, b/IMG_1.jpg) get a
    hash of their path too, so no heat map overwrites another."""
    stems = Counter(f.stem for f in photos)
    return {f: f"{f.stem}_heatmap.png" if stems[f.stem] == 1 else
            f"{f.stem}-{hashlib.blake2b(str(f.resolve()).encode(), digest_size=4).hexdigest()}_heatmap.png"
            for f in photos}


def run_shifts(model: Classifier, meta: dict[str, Any], files: list[Path], labels: dict[Path, int | None],
               names: list[str], max_images: int | None, batch_size: int, out: Path) -> int:
    """The shift suite (crackcore.shift) on labelled patches: a table on stdout and OUT_shifts.parquet."""
    labelled = [f for f in files if labels.get(f) is not None]
    if not labelled:
        raise DataError(f"--shifts needs labelled images: none of the {len(files)} input(s) sits in a class folder "
                        "(Positive/ Negative/, crack/ no_crack/, ...); pass such a folder")
    if len(labelled) < len(files):
        print(f"warning: --shifts scores the {len(labelled)} labelled image(s); {len(files) - len(labelled)} without "
              "a class folder are left out", file=sys.stderr)
    y = np.array([labels[f] for f in labelled])
    imgs, ok = [], []
    for i in capped_rows(y, max_images, seed=0):
        try:
            imgs.append(decode_file(labelled[i], meta["image_size"]))
            ok.append(i)
        except Exception as exc:
            print(f"skipped unreadable image {labelled[i]}: {str(exc).splitlines()[0][:200]}", file=sys.stderr)
    if not ok:
        raise DataError("no labelled image could be decoded; nothing to score")
    suite = run_suite(lambda x: torch.from_numpy(model.prob_crack(x)), torch.stack(imgs), y[ok],
                      cells=suite_cells(names), max_images=None, batch_size=batch_size,
                      # onnxruntime takes its batches from host memory; meta["device"] names its provider
                      device=meta["device"] if meta["runtime"] == "pytorch" else "cpu")
    table = shift_frame(suite)
    write_parquet(table, out.with_name(out.name + "_shifts.parquet"))
    wide = table.assign(cell=[f"{100 * a:.1f} [{100 * lo:.1f}-{100 * hi:.1f}]" for a, lo, hi in
                              zip(table["accuracy"], table["ci95_low"], table["ci95_high"])])
    print(f"shift suite on {suite['n_per_cell']} labelled images ({meta['image_size']} px): accuracy % [95 % CI] "
          f"by severity (0 = clean {100 * suite['clean']['accuracy']:.1f} %)")
    print(wide[wide["severity"] > 0].pivot(index="shift", columns="severity", values="cell").reindex(names).to_string())
    print(f"mean over {len(suite['cells'])} shifted cells {100 * suite['mean_accuracy']:.2f} %  "
          f"({suite['seconds']:.1f}s) -> {out}_shifts.parquet")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m crackcore.predict", description=__doc__.split("\n\n")[1])
    p.add_argument("inputs", nargs="+", help="image files or folders (searched recursively)")
    p.add_argument("--model", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path, help="output prefix: OUT.parquet, OUT_tiles.parquet, ...")
    p.add_argument("--tile", type=int, default=TILE)
    p.add_argument("--stride", type=int, help="window step in px (default: the tile size)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--device", default="auto")
    p.add_argument("--shifts", nargs="?", const="all", metavar="NAME,NAME",
                   help="instead of predicting, run the shift suite on the labelled inputs: accuracy under each shift "
                        "x severity, with n and 95 %% CI (all shifts, or a comma list: scale_down, gaussian_blur, ...)")
    p.add_argument("--shift-max-images", type=int, help="score a stratified seeded subset of this many images")
    return p


def check_flags(a: argparse.Namespace) -> int:
    """Every flag checked before the model is loaded; returns the window stride."""
    if a.shift_max_images is not None and a.shift_max_images < 2:
        raise ModelFileError(f"--shift-max-images must be >= 2 (got {a.shift_max_images})")
    stride = a.tile if a.stride is None else a.stride  # 0 is a mistake, not "the tile size"
    if a.tile < 16 or not 0 < stride <= a.tile:
        raise ModelFileError(f"--stride must be in 1..--tile ({a.tile}) and --tile >= 16; got stride {stride}")
    if a.batch_size < 1:
        raise ModelFileError(f"--batch-size must be >= 1 (got {a.batch_size})")
    if a.out.name in ("", ".", ".."):
        raise ModelFileError(f"--out {a.out} names a folder; pass a file prefix such as {a.out / 'wall'} "
                             "(writes wall.parquet, ...)")
    return stride


def sort_inputs(files: list[Path], tile: int) -> tuple[list[Path], list[Path], list[tuple[Path, str]]]:
    """(patches, photos to tile, unreadable files with why) by each image's size."""
    patches, photos, failed = [], [], []
    for f in files:
        try:
            w, h = image_size_of(f)
        except Exception as exc:
            failed.append((f, str(exc).splitlines()[0][:200]))
            continue
        is_photo = w >= tile and h >= tile and max(w, h) > PATCH_MAX_SIDE * tile
        (photos if is_photo else patches).append(f)
        if not is_photo and max(w, h) > PATCH_MAX_SIDE * min(w, h):
            print(f"warning: {f} is {w}x{h}, too small to tile: only its centre {min(w, h)}x{min(w, h)} is classified",
                  file=sys.stderr)
    return patches, photos, failed


def write_patches(model: Classifier, meta: dict[str, Any], patches: list[Path], labels: dict[Path, int | None],
                  a: argparse.Namespace) -> tuple[int, list[tuple[Path, str]]]:
    """OUT.parquet for the patches; returns (patches classified, unreadable ones)."""
    start = time.perf_counter()
    df, failed = predict_patches(model, meta, patches, a.batch_size, labels=labels)
    seconds = time.perf_counter() - start
    if not len(df):  # none readable: keep any earlier OUT.parquet
        return 0, failed
    write_parquet(df, a.out.with_name(a.out.name + ".parquet"))
    print(f"patches: {int(df['pred_label'].sum())} crack, {int((df['pred_label'] == 0).sum())} no crack "
          f"({len(df) / seconds:.0f} patches/s, decoding included) -> {a.out}.parquet")
    print_labelled_metrics(df)
    return len(df), failed


def write_photos(model: Classifier, meta: dict[str, Any], photos: list[Path], stride: int,
                 a: argparse.Namespace) -> tuple[int, list[tuple[Path, str]]]:
    """OUT_tiles.parquet, OUT_photos.parquet and a heat map per photo; returns (photos done, unreadable ones)."""
    all_tiles, summaries, failed, tile_seconds = [], [], [], 0.0
    heat_dir = a.out.with_name(a.out.name + "_heatmaps")
    heat_names = heatmap_names(photos)
    threshold = threshold_of(meta)
    for f in track(photos, "photos", unit="photos", enabled=len(photos) >= 3):
        try:
            start = time.perf_counter()
            tiles, photo = predict_photo(model, meta, f, a.tile, stride, a.batch_size)
            tile_seconds += time.perf_counter() - start
        except Exception as exc:
            failed.append((f, str(exc).splitlines()[0][:200]))
            continue
        all_tiles.append(tiles)
        summaries.append({**photo_summary(tiles, photo.shape[1], photo.shape[2], threshold), "heatmap": heat_names[f]})
        write_bytes(heatmap_png(photo, tiles, threshold), heat_dir / heat_names[f])
    if not all_tiles:
        return 0, failed
    summary = pd.DataFrame(summaries)
    write_parquet(pd.concat(all_tiles, ignore_index=True), a.out.with_name(a.out.name + "_tiles.parquet"))
    write_parquet(summary, a.out.with_name(a.out.name + "_photos.parquet"))
    print(summary[["photo", "tiles", "crack_tiles", "crack_area_fraction", "max_prob_crack"]].to_string(index=False))
    n_tiles = int(summary["tiles"].sum())
    print(f"{n_tiles} tiles in {tile_seconds:.2f} s ({n_tiles / tile_seconds:.0f} tiles/s, decoding included, "
          "heat maps not)")
    print(f"photos -> {a.out}_tiles.parquet, {a.out}_photos.parquet, heat maps in {heat_dir}/")
    return len(summary), failed


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    shifts = parse_shifts(a.shifts) if a.shifts is not None else None  # an unknown name fails before any work
    stride = check_flags(a)
    model = load_classifier(a.model, resolve_device(a.device))
    meta = model.meta
    files, labels, problems = collect_inputs(a.inputs)
    for problem in problems:
        print(f"warning: {problem}", file=sys.stderr)
    if not files:
        raise FileNotFoundError("no images found in the inputs; pass image files or folders of .jpg/.png")
    if shifts is not None:
        return run_shifts(model, meta, files, labels, shifts, a.shift_max_images, a.batch_size, a.out)
    patches, photos, failed = sort_inputs(files, a.tile)
    print(f"model {a.model} ({meta['image_size']} px, temperature {temperature_of(meta):.2f}, "
          f"{describe_threshold(meta)}, {meta['device']}): {len(patches)} patch(es), {len(photos)} photo(s)")
    done_patches, bad_patches = write_patches(model, meta, patches, labels, a)  # no patches: nothing written
    done_photos, bad_photos = write_photos(model, meta, photos, stride, a)  # no photos: nothing written
    processed, failed = done_patches + done_photos, failed + bad_patches + bad_photos
    for f, why in failed:
        print(f"skipped unreadable image {f}: {why}", file=sys.stderr)
    if failed:
        print(f"{len(failed)} file(s) skipped, {processed} processed", file=sys.stderr)
    return 0 if processed else 1


if __name__ == "__main__":
    from crackcore.cli import run_main

    sys.exit(run_main(main))
