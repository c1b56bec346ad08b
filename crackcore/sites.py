"""A site's images as the field commands read them: which files are patches and which are
photos to tile, a labelled site folder with each image's photo group, and its patches decoded.
Shared by crackcore.predict, .calibrate and .adapt, so that no command imports another."""
from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import ExifTags

from crackcore.exceptions import DataError
from crackcore.images import TENSOR_SUFFIX, decode_file, io_workers, open_image
from crackcore.sources import discover

TILE = 227
PATCH_MAX_SIDE = 1.5  # in tiles: an image whose sides are all below this is a patch, not a photo
GROUP_BY = r"^(.*)__"  # PHOTO__rYcX.jpg: the windows of one photo
F1_INTERVAL = "percentile bootstrap, 2000 seeded resamples of whole photos (single images where names carry no photo)"
METRIC_KEYS = ("n", "accuracy", "accuracy_ci95", "precision", "precision_ci95", "recall", "recall_ci95", "f1",
               "f1_ci95", "roc_auc", "ece", "tp", "fp", "fn", "tn")


EXIF_TURNED = {5, 6, 7, 8}  # EXIF Orientation values that swap width and height


def image_size_of(path: Path) -> tuple[int, int]:
    """(width, height) as the image is shown (after its EXIF orientation), from the header only;
    ImageTooLargeError over the pixel limit."""
    if path.suffix.lower() == TENSOR_SUFFIX:
        return (0, 0)  # saved tensors are patches
    with open_image(path) as im:
        w, h = im.size  # Pillow's TIFF reader has applied the tag already
        turned = im.format != "TIFF" and im.getexif().get(ExifTags.Base.Orientation) in EXIF_TURNED
        return (h, w) if turned else (w, h)


def site_samples(root: Path, group_by: str) -> pd.DataFrame:
    """path (relative to root), label and photo group of every labelled image of the site."""
    try:
        samples, _ = discover(root)
    except DataError as exc:  # discover speaks of --data
        raise DataError(f"--labelled: {str(exc).replace('--data', '--labelled')}") from None
    names = samples["path"].map(lambda p: Path(p).name)
    photo = names.str.extract(group_by, expand=True).iloc[:, 0] if group_by else pd.Series(np.nan, index=samples.index)
    return samples.assign(group=photo.fillna(samples["path"]))


def decode_all(root: Path, paths: pd.Series, image_size: int) -> tuple[torch.Tensor, np.ndarray]:
    """The images that decode, and a mask of which did; one line for the others (unreadable,
    or over the pixel limit)."""
    def one(p: str) -> torch.Tensor | str:
        try:
            return decode_file(root / p, image_size)
        except Exception as exc:  # an unreadable file is left out, as training leaves it out
            return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"

    with ThreadPoolExecutor(max_workers=io_workers()) as pool:
        decoded = list(pool.map(one, paths))
    ok = np.array([isinstance(d, torch.Tensor) for d in decoded], dtype=bool)
    if not ok.all():
        first = int(np.flatnonzero(~ok)[0])
        print(f"warning: skipped {int((~ok).sum())} unreadable image file(s) of {root}, e.g. {paths.iloc[first]} "
              f"({decoded[first]})", file=sys.stderr)
    if not ok.any():
        raise DataError(f"--labelled {root}: no image could be decoded")
    return torch.stack([d for d in decoded if isinstance(d, torch.Tensor)]), ok
