"""Image files and the pixel contract: which files are images, how one becomes a uint8
[3, S, S] tensor, the class order and ImageNet normalisation, where decoded caches live and
how many threads read files, and the two guards every reader shares: one pixel limit (a
decompression bomb is refused from its header, before any decode) and file names that are not
UTF-8. A leaf: data, neardup, synthetic, bench, calibrate and predict share it."""
from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image, ImageOps
from torchvision.io import ImageReadMode, decode_image

CLASSES = ("Negative", "Positive")  # label = index: Negative (no crack) = 0, Positive (crack) = 1
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}
PIL_SUFFIXES = {".bmp", ".tif", ".tiff"}  # torchvision.io decodes the others
TENSOR_SUFFIX = ".pt"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


CACHE_ENV = "CRACK_CACHE"
# One pixel limit for every decode path (PIL's own default, about 0.27 GB as RGB: a 48-Mpx phone
# photo passes, a 48 KB PNG of 20000x20000 px does not), checked from the header by open_image.
# PIL's guard stays as a backstop for any other PIL reader (it refuses twice this); its warning
# for 1-2x is silenced, as open_image refuses those itself with a clearer line.
MAX_PIXELS = 89_478_485
Image.MAX_IMAGE_PIXELS = MAX_PIXELS
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


class ImageTooLargeError(ValueError):
    """An image's header declares more pixels than MAX_PIXELS (a decompression bomb or a huge scan)."""


def readable_name(path: str | Path) -> str:
    """A file name as it can be printed and stored: bytes that are not UTF-8 as \\xNN."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def utf8_name(path: str | Path) -> bool:
    """Whether a path is valid UTF-8: parquet (Arrow) and JSON cannot store one that is not."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def open_image(path: Path) -> Any:
    """A PIL image with only its header read; ImageTooLargeError when it declares more than
    MAX_PIXELS. Every reader of image files goes through it (or read_rgb / decode_file)."""
    try:
        im = Image.open(path)
    except Image.DecompressionBombError as exc:  # over twice the limit: PIL's backstop refused it first
        pixels = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"{int(pixels[1]) / 1e6:.0f} Mpx" if pixels else f"over {2 * MAX_PIXELS / 1e6:.0f} Mpx"
    else:
        if im.width * im.height <= MAX_PIXELS:
            return im
        size = f"{im.width}x{im.height} px"
        im.close()
    raise ImageTooLargeError(f"{readable_name(Path(path).name)}: {size}, over the {MAX_PIXELS / 1e6:.1f}-Mpx limit "
                             "(crackcore.images.MAX_PIXELS); a decompression bomb, or downscale or split it")


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "crackcore"))


def io_workers() -> int:
    """Threads for decoding/hashing many files (PIL and torchvision release the GIL)."""
    return max(1, min(16, os.cpu_count() or 1))


def read_rgb(path: Path, exif: bool = False) -> torch.Tensor:
    """An image file -> uint8 [3, H, W] at its own size; grayscale/RGBA/palette become RGB.
    torchvision decodes JPEG/PNG/WebP, PIL decodes BMP/TIFF, each only after the header passed
    the pixel limit. 16-bit images are scaled to 8 bits: a plain cast would wrap them. `exif`:
    turn the image as its EXIF Orientation tag says (photos from phones; the training patches
    are used as stored)."""
    with open_image(path) as im:
        if path.suffix.lower() in PIL_SUFFIXES:
            return pil_rgb(ImageOps.exif_transpose(im) if exif else im)
    img = decode_image(str(path), mode=ImageReadMode.RGB, apply_exif_orientation=exif)
    return img if img.dtype == torch.uint8 else TF.to_dtype(img, torch.uint8, scale=True)


def pil_rgb(im: Any) -> torch.Tensor:
    """A PIL image -> uint8 [3, H, W]. 16-bit grayscale (modes I;16*, or I holding 0-65535) is
    scaled to 8 bits: PIL's convert() would clip it to white."""
    if im.mode.startswith("I"):
        gray = torch.from_numpy((np.asarray(im).astype(np.int64) >> 8).clip(0, 255).astype(np.uint8))
        return gray.expand(3, -1, -1).contiguous()
    if im.mode == "F":  # float grayscale (TIFF): 0..1 as saved tensors are, else 0..255
        f = np.asarray(im, dtype=np.float64)
        f = f * 255 if f.size and f.max() <= 1 else f
        return torch.from_numpy(f.round().clip(0, 255).astype(np.uint8)).expand(3, -1, -1).contiguous()
    return TF.pil_to_tensor(im.convert("RGB"))


def decode_file(path: Path, image_size: int, exif: bool = False) -> torch.Tensor:
    """One file -> uint8 [3, S, S]. Grayscale/RGBA become RGB; other sizes are resized on
    the shorter side and centre-cropped (the dataset's patches are square). `exif`: as read_rgb."""
    if path.suffix.lower() == TENSOR_SUFFIX:
        img = torch.load(path, weights_only=True, map_location="cpu")
        if not isinstance(img, torch.Tensor):
            raise ValueError(f"holds a {type(img).__name__}, not an image tensor")
        if img.ndim == 2:
            img = img.unsqueeze(0)
        if img.ndim == 3 and img.shape[0] not in (1, 3) and img.shape[-1] in (1, 3):
            img = img.permute(2, 0, 1)  # HWC -> CHW
        if img.ndim != 3 or img.shape[0] not in (1, 3):
            raise ValueError(f"tensor shape {tuple(img.shape)} is not [3,H,W], [1,H,W], [H,W] or [H,W,3]")
        if img.dtype != torch.uint8:
            # saved tensors hold uint8 0-255 or floats 0-1; anything else would be clamped or wrapped
            lo, hi = (0.0, 1.0) if img.is_floating_point() else (0, 255)
            if img.numel() and not (lo <= img.min().item() and img.max().item() <= hi):
                raise ValueError(f"{img.dtype} values span {img.min().item():g}..{img.max().item():g}, outside {lo:g}..{hi:g}; "
                                 "save uint8 0-255 or float 0-1 images")
            img = (img * 255).round() if img.is_floating_point() else img
        img = img.to(torch.uint8).expand(3, -1, -1)  # a grayscale [1,H,W] repeated as RGB
    else:
        img = read_rgb(path, exif)
    if tuple(img.shape[1:]) != (image_size, image_size):
        img = TF.center_crop(TF.resize(img, [image_size], antialias=True), [image_size, image_size])
    return img.contiguous()

