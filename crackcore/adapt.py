"""`python -m crackcore.adapt --model M --unlabelled SITE_DIR --out DIR [--method bn|tent|self-train]`

Adapt a trained model to a new site from the site's UNLABELLED images: re-estimate its BatchNorm
statistics there (bn, AdaBN), or also take a few entropy-minimisation steps on the BN affine
parameters (tent, Wang et al. ICLR 2021), or also train strong views on the confident
pseudo-labels the bn-adapted model gives the images once (self-train, a fixed teacher); then
estimate the site's crack prior by EM (Saerens, Latinne & Decaestecker 2002) and shift the
decision for it. Writes DIR/model.pt (the crackcore model format: predict, export and calibrate
take it as is) and DIR/adaptation.json.
`--labelled DIR` (never used to adapt) scores the model before and after with 95 % intervals.
"""
from __future__ import annotations

import argparse
import hashlib
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from crackcore.adaptation import (BN_LAYERS, BN_RULE, DEFAULT_BN_LAYERS, METHODS, SELF_EPOCHS, TENT_EPOCHS, adapt_model,
                                  inverted_text, logit_crack, train_prior_of)
from crackcore.classifier import load_torch_meta, temperature_of, threshold_of
from crackcore.exceptions import AdaptationError, ConfigError, DataError, ModelFileError
from crackcore.hashing import sha256_file, unit_hash
from crackcore.images import IMAGE_SUFFIXES, TENSOR_SUFFIX, io_workers
from crackcore.metrics import metrics_with_intervals
from crackcore.model import CrackResNet
from crackcore.outputs import check_replaceable, check_writable, claim_folder, save_torch, write_folder, write_json, write_parquet
from crackcore.sites import F1_INTERVAL, GROUP_BY, METRIC_KEYS, PATCH_MAX_SIDE, TILE, decode_all, image_size_of, site_samples
from crackcore.devices import resolve_device

ADAPTATION_FORMAT = "crackcore-adaptation"
HOLDOUT_RULE = ("--labelled equal to --unlabelled: the photos (--group-by) are split in two by a seeded hash, the "
                "model adapts to the images of one half (labels unused) and is scored on the other half only")


# --------------------------------------------------------------------------- site images


def site_files(root: Path) -> list[Path]:
    """Every image file under `root` (any layout, class folders or none: labels are never read),
    sorted; hidden files and folders skipped."""
    if not root.is_dir():
        raise DataError(f"--unlabelled {root} is not a folder; pass the folder of the site's images")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES | {TENSOR_SUFFIX}
                   and not any(part.startswith(".") for part in p.relative_to(root).parts))
    if not files:
        raise DataError(f"--unlabelled {root} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}); pass the folder "
                        "of the site's image patches")
    return files


def check_patches(root: Path, files: list[Path]) -> None:
    """Patches of any size are used as predict uses them (resized on the shorter side to the
    model's image size and centre-cropped); whole photos are not: predict scores those in
    227-px tiles, so statistics of a photo squeezed to one patch would not be the site's."""
    with ThreadPoolExecutor(max_workers=io_workers()) as pool:
        sizes = list(pool.map(image_size_of, files))
    limit = PATCH_MAX_SIDE * TILE
    big = [(f, s) for f, s in zip(files, sizes) if max(s) >= limit]
    if big:
        f, (w, h) = big[0]
        raise DataError(f"--unlabelled {root}: {len(big)} of {len(files)} images are whole photos, not patches (e.g. "
                        f"{f.relative_to(root)} is {w}x{h} px; patches are under {limit:.0f} px a side); predict "
                        f"scores photos in {TILE}-px tiles, so adapt on tiles of them: cut them into {TILE}-px windows "
                        "(PHOTO__rYcX.jpg) first")


def images_digest(files: list[Path]) -> str:
    """SHA-256 over the sorted SHA-256s of the files: names and order do not matter, bytes do."""
    with ThreadPoolExecutor(max_workers=io_workers()) as pool:
        digests = sorted(pool.map(sha256_file, files))
    return hashlib.sha256("\n".join(digests).encode()).hexdigest()


def holdout_mask(groups: pd.Series, seed: int) -> np.ndarray:
    """True for the images scored (HOLDOUT_RULE), False for those adapted on; whole photos each side."""
    return groups.map(lambda g: unit_hash(seed, f"adapt-holdout:{g}") >= 0.5).to_numpy(bool)


def load_net(meta: dict[str, Any], device: torch.device) -> CrackResNet:
    net = CrackResNet(freeze_depth=int((meta.get("config") or {}).get("freeze_depth") or 0))
    net.load_state_dict(meta["state_dict"])
    return net.to(device).eval()


def check_out(out: Path) -> None:
    check_replaceable(out, "adaptation.json", lambda r: isinstance(r, dict) and r.get("format") == ADAPTATION_FORMAT,
                      "crackcore.adapt")


def check_model(path: Path, meta: dict[str, Any], digest: str) -> None:
    done = meta.get("adaptation")
    if done:
        where = "this site already" if done.get("images_sha256") == digest else f"another site ({done.get('folder')})"
        raise ModelFileError(f"--model {path} is already adapted to {where}; adapting an adapted model compounds the "
                             f"two shifts: adapt from the original model {done.get('source_model')}")
    if meta.get("calibration"):
        raise ModelFileError(f"--model {path} is calibrated (threshold fitted on {meta['calibration'].get('site_name')}) "
                             "and adapting would void that fit; adapt the uncalibrated model, then calibrate the "
                             "adapted model.pt")


def score(z: np.ndarray, temperature: float, threshold: float, labels: np.ndarray, groups: np.ndarray, seed: int
          ) -> dict[str, Any]:
    prob = 1 / (1 + np.exp(-z / temperature))
    m = metrics_with_intervals(labels, (prob >= threshold).astype(int), prob, groups, seed=seed)
    return {**{k: m[k] for k in METRIC_KEYS}, "false_alarm_rate": m["fp"] / max(1, m["fp"] + m["tn"])}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m crackcore.adapt", description=__doc__.split("\n\n")[1])
    p.add_argument("--model", required=True, type=Path, help="a model.pt written by a study or crackcore.fit "
                   "(not adapted, not calibrated)")
    p.add_argument("--unlabelled", required=True, type=Path, help="the site's images (any layout; labels, if any, "
                   "are not read)")
    p.add_argument("--out", required=True, type=Path, help="a new folder, or an earlier adaptation's (replaced)")
    p.add_argument("--method", default="bn", choices=METHODS)
    p.add_argument("--bn-layers", default=DEFAULT_BN_LAYERS, choices=BN_LAYERS, help="which BN layers bn re-estimates "
                   f"(default {DEFAULT_BN_LAYERS}: {BN_RULE[DEFAULT_BN_LAYERS]})")
    p.add_argument("--bn-mix", type=float, default=1.0, help="share of the site's statistics in the new BN statistics "
                   "(bn only; default 1: the site's alone)")
    p.add_argument("--epochs", type=int, help=f"passes over the site (tent {TENT_EPOCHS}, self-train {SELF_EPOCHS})")
    p.add_argument("--no-prior", dest="prior", action="store_false", help="do not correct for the site's EM prior")
    p.add_argument("--labelled", type=Path, help="a labelled folder of the site, NEVER used to adapt: scores before "
                   f"and after with 95 %% intervals; the same folder as --unlabelled: {HOLDOUT_RULE}")
    p.add_argument("--group-by", default=GROUP_BY, help=f"regex naming a file's photo (default {GROUP_BY!r}); '' = "
                   "every image its own photo")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    t0 = time.time()
    if a.epochs is not None and a.epochs < 1:
        raise ConfigError(f"--epochs {a.epochs} must be 1 or more")
    check_out(a.out)
    check_writable(a.out.parent, f"--out {a.out}", "choose another --out")
    with claim_folder(a.out):  # two adaptations started at once to one --out: one goes on
        check_out(a.out)  # again: another run may have written it since
        return run_adaptation(a, t0)


def prior_note(pr: dict[str, Any]) -> str:
    if not pr["requested"]:
        return " (not applied)"
    if pr["ran_away"]:
        return f" (the estimate left {pr['band'][0]}-{pr['band'][1]}: EM ran away, not applied; BN alone)"
    return ""


def run_adaptation(a: argparse.Namespace, t0: float) -> int:
    """The adaptation, with --out claimed."""
    root = a.unlabelled.expanduser().resolve()
    files = site_files(root)
    device = resolve_device(a.device)
    if a.model.suffix.lower() == ".onnx" or a.model.is_dir():
        raise ModelFileError(f"--model {a.model}: adapt changes the weights of a model.pt; pass the model.pt (export "
                             "the adapted one to ONNX afterwards with python -m crackcore.export)")
    if not a.model.is_file():
        raise ModelFileError(f"model file {a.model} does not exist; pass a model.pt a study or crackcore.fit wrote")
    meta = load_torch_meta(a.model)
    size, temperature = int(meta["image_size"]), temperature_of(meta)
    labelled, adapt_files = None, files
    if a.labelled is not None:
        lroot = a.labelled.expanduser().resolve()
        labelled = site_samples(lroot, a.group_by)
        if lroot == root:  # transductive scoring would flatter the method: hold out half the photos
            held = holdout_mask(labelled["group"], a.seed)
            if held.all() or not held.any():
                raise DataError(f"--labelled {lroot} has too few photos to split into an adapt half and a scored "
                                "half; pass a separate labelled folder")
            adapt_files = [lroot / p for p in labelled.loc[~held, "path"]]
            labelled = labelled[held].reset_index(drop=True)
    check_patches(root, adapt_files)
    digest = images_digest(adapt_files)
    check_model(a.model, meta, digest)
    net = load_net(meta, device)
    rel = [f.relative_to(root).as_posix() for f in adapt_files]
    images, _ = decode_all(root, pd.Series(rel), size)  # unreadable files are said and left out
    print(f"adapting {a.model} ({meta.get('weights', {}).get('source', '?')} weights) to {len(images)} unlabelled "
          f"images of {root} by {a.method}", flush=True)
    before_z = None
    if labelled is not None:
        limages, readable = decode_all(lroot, labelled["path"], size)
        labelled = labelled[readable].reset_index(drop=True)
        before_z = logit_crack(net, limages)
    record = adapt_model(net, images, a.method, temperature=temperature, train_prior=train_prior_of(meta),
                         layers=a.bn_layers, mix=a.bn_mix, seed=a.seed, prior=a.prior, epochs=a.epochs)
    if inverted := inverted_text(record):
        raise AdaptationError(f"{inverted}; nothing written: adapt with --method bn (the default) or tent")
    site = {"folder": str(root), "n": len(images), "images_sha256": digest, "source_model": str(a.model.resolve()),
            "source_model_sha256": sha256_file(a.model), "image_size": size,
            "resize": "shorter side to image_size, centre crop (antialiased), as predict does"}
    result = {"format": ADAPTATION_FORMAT, "version": 1, **site, **record}
    columns, preds = {}, None
    if labelled is not None:
        labels, groups = labelled["label"].to_numpy(), labelled["group"].to_numpy()
        after_z = logit_crack(net, limages)
        threshold = threshold_of(meta)
        columns = {"before": score(before_z, temperature, threshold, labels, groups, a.seed),
                   "after": score(after_z, temperature, threshold, labels, groups, a.seed)}
        result["labelled"] = {"folder": str(lroot), "n": len(labelled), "group_by": a.group_by,
                              "split": HOLDOUT_RULE if lroot == root else "every labelled image scored (labels "
                              "unused to adapt; overlap with --unlabelled is transductive, as usual in TTA)",
                              "f1_interval": F1_INTERVAL, "metrics": columns}
        preds = labelled.assign(logit_before=before_z, logit_after=after_z)
    payload = {**meta, "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()},
               "adaptation": {k: v for k, v in result.items() if k not in ("format", "version")}}

    def fill(tmp: Path) -> None:
        save_torch(payload, tmp / "model.pt")
        if preds is not None:
            write_parquet(preds, tmp / "predictions.parquet")
        write_json({**result, "total_seconds": time.time() - t0}, tmp / "adaptation.json")  # last: the marker

    write_folder(a.out, fill)
    pr = record["prior"]
    print(f"{a.method} in {record['seconds']:.1f} s; site crack prior {pr['site_prior']:.3f} (EM, trained under "
          f"{pr['train_prior']:.3f}) -> crack log-odds {pr['logit_offset']:+.3f}{prior_note(pr)}")
    for name, m in columns.items():
        print(f"{name:>6}: n={m['n']} accuracy {100 * m['accuracy']:.1f} % ({100 * m['accuracy_ci95'][0]:.1f}-"
              f"{100 * m['accuracy_ci95'][1]:.1f})  F1 {m['f1']:.3f} ({m['f1_ci95'][0]:.3f}-{m['f1_ci95'][1]:.3f})  "
              f"false alarms {100 * m['false_alarm_rate']:.1f} %")
    print(f"-> {a.out}/model.pt, adaptation.json ({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    from crackcore.cli import run_main

    sys.exit(run_main(main))
