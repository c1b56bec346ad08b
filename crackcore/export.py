"""`python -m crackcore.export --model results/<study>/model.pt --out model.onnx`

Write the model as ONNX for field apps (onnxruntime, any language): input uint8 RGB
[batch, 3, S, S] 0-255, normalised inside the graph; outputs logits [batch, 2] and prob_crack
[batch] (temperature applied); image size, mean/std, class order, temperature, decision
threshold, the source model's SHA-256 and its training config in the model's metadata_props
(contract: crackcore.classifier). Before the file is written, PyTorch and onnxruntime score the
same real images (--check-images, else the test/val images of the model's own data) and the
export fails when their logits differ by more than --tolerance (1e-4; scaled by the largest
|logit| where that is above 1, as float32 rounding is relative); an earlier --out is then kept.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from crackcore.classifier import (ONNX_FORMAT, OnnxClassifier, TorchClassifier, load_classifier,
                                  onnx_metadata, threshold_of, to_onnx)
from crackcore.config import TrainConfig
from crackcore.exceptions import ModelFileError
from crackcore.hashing import sha256_file
from crackcore.images import IMAGE_SUFFIXES, decode_file
from crackcore.outputs import write_bytes


def spread(items: list[Any], n: int) -> list[Any]:
    """`n` items evenly spaced through `items` (both classes of a sorted Negative/Positive list)."""
    if len(items) <= n:
        return list(items)
    return [items[int(i * len(items) / n)] for i in range(n)]


def images_in(folder: Path) -> list[Path]:
    return sorted(f for f in folder.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)


def data_sources(config: dict[str, Any]) -> dict[str, str | None]:
    """{source name: folder} of the config a model was trained with ({} if it cannot be read)."""
    try:
        names = {f.name for f in dataclasses.fields(TrainConfig)}
        return TrainConfig(**{k: v for k, v in config.items() if k in names}).sources()
    except Exception:  # a config from another crackcore version: no images from it, not a failed export
        return {}


def parity_files(model_path: Path, meta: dict[str, Any], check_images: Path | None, n: int) -> tuple[list[Path], str]:
    """Real images to compare the runtimes on, and where they came from, in words."""
    if check_images is not None:
        if not check_images.is_dir():
            raise ModelFileError(f"--check-images {check_images} is not a folder; pass a folder of images")
        files = images_in(check_images)
        if not files:
            raise ModelFileError(f"--check-images {check_images} holds no images (.jpg, .png, ...)")
        return spread(files, n), f"images from {check_images}"
    sources = {k: Path(v).expanduser() for k, v in data_sources(meta.get("config") or {}).items() if v}
    split_file = model_path.parent / "split.parquet"
    if split_file.is_file() and sources:
        split = pd.read_parquet(split_file, columns=["path", "split", "source"])
        for part in ("test", "val"):
            rows = split[(split["split"] == part) & split["source"].isin(list(sources))]
            files = [sources[s] / p for s, p in zip(rows["source"], rows["path"]) if (sources[s] / p).is_file()]
            if files:
                return spread(files, n), f"{part}-split images of the model's data ({split_file})"
    files = [f for root in sources.values() if root.is_dir() for f in images_in(root)]
    if files:
        return spread(files, n), f"images of the model's data ({', '.join(map(str, sources.values()))})"
    return [], ""


def parity(reference: TorchClassifier, exported: OnnxClassifier, batch: torch.Tensor,
           batch_size: int = 16) -> dict[str, Any]:
    """Both runtimes on the same uint8 batch: the first image alone (batch 1), the rest in
    batches of `batch_size`, so the dynamic batch dimension is exercised too."""
    threshold = threshold_of(reference.meta)
    chunks = [batch[:1]] + [batch[i:i + batch_size] for i in range(1, len(batch), batch_size)]
    d_logit = d_prob = largest = 0.0
    agree = 0
    for chunk in chunks:
        (lt, pt), (lo, po) = reference.run(chunk), exported.run(chunk)
        d_logit = max(d_logit, float(np.abs(lt - lo).max()))
        d_prob = max(d_prob, float(np.abs(pt - po).max()))
        largest = max(largest, float(np.abs(lt).max()))
        agree += int(((pt >= threshold) == (po >= threshold)).sum())
    return {"n": len(batch), "max_abs_logit_diff": d_logit, "max_abs_logit": largest, "max_abs_prob_diff": d_prob,
            "labels_agree": agree, "batch_sizes": sorted({len(c) for c in chunks})}


def export(model_path: Path, out: Path, check_images: Path | None = None, n_images: int = 64,
           tolerance: float = 1e-4) -> dict[str, Any]:
    """Export, check, write; returns the parity figures (raises ModelFileError above tolerance)."""
    if model_path.suffix.lower() == ".onnx":
        raise ModelFileError(f"--model {model_path} is an ONNX model already; pass the model.pt it was exported from")
    reference = load_classifier(model_path, torch.device("cpu"))
    assert isinstance(reference, TorchClassifier)
    meta = reference.meta
    start = time.perf_counter()
    blob = to_onnx(reference.field, meta["image_size"], onnx_metadata(meta, sha256_file(model_path), model_path.name))
    seconds = time.perf_counter() - start
    exported = OnnxClassifier(blob, name=str(out))
    files, where = parity_files(model_path, meta, check_images, n_images)
    imgs, unreadable = [], 0
    for f in files:
        try:
            imgs.append(decode_file(f, meta["image_size"]))  # as predict decodes them
        except Exception:
            unreadable += 1
    if imgs:
        batch = torch.stack(imgs)
    else:  # still a check of the graph, but say plainly it is not one on real images
        where = ("RANDOM PIXELS: no real images found (pass --check-images DIR, e.g. a folder of concrete patches)"
                 + (f"; {unreadable} unreadable" if unreadable else ""))
        batch = torch.randint(0, 256, (n_images, 3, meta["image_size"], meta["image_size"]), dtype=torch.uint8,
                              generator=torch.Generator().manual_seed(0))
    check = parity(reference, exported, batch)
    allowed = tolerance * max(1.0, check["max_abs_logit"])  # float32 rounding grows with the logits
    check.update(images=where, tolerance=tolerance, allowed=allowed, export_seconds=round(seconds, 1), bytes=len(blob))
    print(f"parity on {check['n']} {where}: max |Δ logit| {check['max_abs_logit_diff']:.2e} (logits up to "
          f"{check['max_abs_logit']:.3g}), max |Δ prob_crack| {check['max_abs_prob_diff']:.2e}, labels agree "
          f"{check['labels_agree']}/{check['n']} (batch sizes {check['batch_sizes']}; allowed {allowed:.2g})")
    if not check["max_abs_logit_diff"] <= allowed:  # NaN fails too
        raise ModelFileError(f"onnxruntime's logits differ from PyTorch's by {check['max_abs_logit_diff']:.2e} > "
                             f"{allowed:.2g} (--tolerance {tolerance:g} x max(1, largest |logit|)); {out} not written "
                             "(an earlier one is kept)")
    write_bytes(blob, out)
    return check


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m crackcore.export", description=__doc__.split("\n\n")[1])
    p.add_argument("--model", required=True, type=Path, help="a model.pt from a study or python -m crackcore.fit")
    p.add_argument("--out", type=Path, help="the .onnx file to write (default: next to --model, model.onnx)")
    p.add_argument("--check-images", type=Path, metavar="DIR",
                   help="images to compare PyTorch and onnxruntime on (default: the model's test/val images)")
    p.add_argument("--max-images", type=int, default=64, help="images in the parity check")
    p.add_argument("--tolerance", type=float, default=1e-4, help="largest |Δ logit| accepted, times the largest |logit| "
                   "where that is above 1 (float32 rounding is relative)")
    a = p.parse_args(argv)
    out = a.out or a.model.with_suffix(".onnx")
    if out.is_dir() or out.name in ("", ".", ".."):
        raise ModelFileError(f"--out {out} is a folder; pass a file name in it, e.g. {out / 'model.onnx'}")
    if out.suffix.lower() != ".onnx":
        raise ModelFileError(f"--out {out} must end in .onnx (crackcore.predict runs .onnx files on onnxruntime), "
                             f"e.g. {out.with_suffix('.onnx')}")
    if a.max_images < 1 or not a.tolerance > 0:
        raise ModelFileError(f"--max-images must be >= 1 and --tolerance > 0 (got {a.max_images}, {a.tolerance:g})")
    check = export(a.model, out, a.check_images, a.max_images, a.tolerance)
    print(f"wrote {out} ({check['bytes'] / 2**20:.1f} MiB, {ONNX_FORMAT}, exported in {check['export_seconds']} s): "
          f"python -m crackcore.predict --model {out} IMAGES... --out OUT")
    return 0


if __name__ == "__main__":
    from crackcore.cli import run_main

    sys.exit(run_main(main))
