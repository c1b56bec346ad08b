"""Named augmentation policies, in two forms with the same semantics:

* `per_image_transform(policy)`: torchvision transforms v2, for `CrackDataset` / DataLoaders;
* `batch_augment(x, policy)`: the same random operations drawn per sample but applied to a
  whole batch on the training device, which is what training uses, so augmentation never
  makes the CPU the bottleneck.

Both are built from one table, POLICIES. Cracks have no preferred orientation, so flips and
90-degree rotations are label-preserving; colour jitter mimics lighting and concrete tone;
`strong` adds a random resized crop (zoom 0.6-1 of the area). The shift-aware policies model
what changes between cameras and sites (crackcore.shift tests the same changes): `scale`
zooms 0.5-1.5x (a drone further away or closer), `photometric` blurs, adds sensor noise,
casts colour, removes colour and JPEG-compresses, each with a probability; `domain` is both
plus flips. Spatial sizes (blur sigma) are stated at 64 px and scale with the image size.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF
from torchvision.ops import roi_align

from crackcore.config import AUGMENT_POLICIES
from crackcore.shift import REFERENCE_SIZE, colour_cast, per_sample_conv, scaled


@dataclass(frozen=True)
class Policy:
    flip: bool = False
    rot90: bool = False
    brightness: float = 0.0  # factor ~ U(1-b, 1+b)
    contrast: float = 0.0
    saturation: float = 0.0
    crop_scale: tuple[float, float] | None = None  # area fraction for RandomResizedCrop
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    rescale: tuple[float, float] | None = None  # zoom z ~ U(lo, hi): a window of side S/z resized to S
    blur_p: float = 0.0  # Gaussian blur, sigma ~ U(blur_sigma) px at 64 px
    blur_sigma: tuple[float, float] = (0.3, 1.5)
    noise_p: float = 0.0  # Gaussian noise, sigma ~ U(noise_sigma) of full scale, clipped
    noise_sigma: tuple[float, float] = (0.01, 0.06)
    cast_p: float = 0.0  # white balance: red gain 1+a, blue gain 1-a, a ~ U(-cast, cast)
    cast: float = 0.2
    gray_p: float = 0.0  # grayscale
    jpeg_p: float = 0.0  # JPEG round trip, quality ~ U{jpeg_quality}
    jpeg_quality: tuple[int, int] = (15, 75)


PHOTOMETRIC = dict(blur_p=0.3, noise_p=0.3, cast_p=0.3, gray_p=0.1, jpeg_p=0.3)
POLICIES: dict[str, Policy] = {
    "none": Policy(),
    "flip": Policy(flip=True),
    "flip_rotate": Policy(flip=True, rot90=True),
    "color": Policy(flip=True, brightness=0.3, contrast=0.3, saturation=0.2),
    "strong": Policy(flip=True, rot90=True, brightness=0.4, contrast=0.4, saturation=0.3, crop_scale=(0.6, 1.0)),
    "scale": Policy(rescale=(0.5, 1.5)),
    "photometric": Policy(**PHOTOMETRIC),
    "domain": Policy(flip=True, rescale=(0.5, 1.5), **PHOTOMETRIC),
}
assert tuple(POLICIES) == AUGMENT_POLICIES


def get_policy(name: str) -> Policy:
    if name not in POLICIES:
        raise ValueError(f"unknown augment policy {name!r}; use one of {', '.join(POLICIES)}")
    return POLICIES[name]


# --------------------------------------------------------------------------- per image


class RandomRot90(T.Transform):
    """Rotate by k*90 degrees, k uniform in 0..3 (exact, no interpolation, no borders)."""

    def make_params(self, flat_inputs: list) -> dict:
        return {"k": int(torch.randint(0, 4, ()).item())}

    def transform(self, inpt: torch.Tensor, params: dict) -> torch.Tensor:
        return torch.rot90(inpt, params["k"], dims=(-2, -1))


class DrawnParams(T.Transform):
    """The policy's random parameters `keys` drawn for one image (sample_params with torch's global
    RNG, as torchvision transforms draw) and applied with torchvision's per-image functionals
    (reference_apply): the per-image form of the steps torchvision has no random transform for."""

    def __init__(self, policy: str, image_size: int, keys: tuple[str, ...]):
        super().__init__()
        self.policy, self.image_size, self.keys = policy, image_size, keys

    def make_params(self, flat_inputs: list) -> dict:
        return {"drawn": {k: v for k, v in sample_params(self.policy, 1, self.image_size).items() if k in self.keys}}

    def transform(self, inpt: torch.Tensor, params: dict) -> torch.Tensor:
        return reference_apply(inpt, params["drawn"], 0)


def per_image_transform(policy: str, image_size: int) -> T.Transform:
    """Transform for one float [3,H,W] image in [0,1] (before normalisation)."""
    p = get_policy(policy)
    steps: list[T.Transform] = []
    if p.rescale:
        steps.append(DrawnParams(policy, image_size, ("rescale",)))
    if p.crop_scale:
        steps.append(T.RandomResizedCrop(image_size, scale=p.crop_scale, ratio=p.crop_ratio, antialias=True))
    if p.flip:
        steps += [T.RandomHorizontalFlip(), T.RandomVerticalFlip()]
    if p.rot90:
        steps.append(RandomRot90())
    if p.brightness or p.contrast or p.saturation:
        steps.append(T.ColorJitter(brightness=p.brightness or None, contrast=p.contrast or None,
                                   saturation=p.saturation or None))
    if p.blur_p:
        steps.append(T.RandomApply([T.GaussianBlur(blur_kernel_size(p, image_size),
                                                   sigma=tuple(scaled(s, image_size) for s in p.blur_sigma))],
                                   p=p.blur_p))
    if p.noise_p or p.cast_p:  # torchvision's GaussianNoise has one sigma, and there is no white balance
        steps.append(DrawnParams(policy, image_size, ("noise_sigma", "noise_seed", "cast")))
    if p.gray_p:
        steps.append(T.RandomGrayscale(p.gray_p))
    if p.jpeg_p:
        steps.append(T.RandomApply([T.ToDtype(torch.uint8, scale=True), T.JPEG(list(p.jpeg_quality)),
                                    T.ToDtype(torch.float32, scale=True)], p=p.jpeg_p))
    return T.Compose(steps) if steps else T.Identity()


def blur_kernel_size(p: Policy, image_size: int) -> int:
    """Odd, 3 sigma either side of the largest sigma (as cv2 and PIL size theirs), below the image size."""
    k = 2 * math.ceil(3 * p.blur_sigma[1] * image_size / REFERENCE_SIZE) + 1
    return min(k, image_size - 1 if image_size % 2 == 0 else image_size)


# --------------------------------------------------------------------------- per batch


def sample_params(policy: str, batch: int, image_size: int, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Draw one set of random parameters per sample (on the CPU: tiny tensors)."""
    p = get_policy(policy)
    g = generator
    out: dict[str, torch.Tensor] = {}
    if p.crop_scale:
        out["crop"] = _crop_boxes(p, batch, image_size, g)
    if p.flip:
        out["hflip"] = torch.rand(batch, generator=g) < 0.5
        out["vflip"] = torch.rand(batch, generator=g) < 0.5
    if p.rot90:
        out["rot90"] = torch.randint(0, 4, (batch,), generator=g)
    for name in ("brightness", "contrast", "saturation"):
        amount = getattr(p, name)
        if amount:
            lo = max(0.0, 1 - amount)
            out[name] = lo + (1 + amount - lo) * torch.rand(batch, generator=g)
    if "brightness" in out or "contrast" in out or "saturation" in out:
        # ColorJitter applies its operations in an order drawn per image: one permutation per row
        out["color_order"] = torch.argsort(torch.rand(batch, 3, generator=g), dim=1)
    if p.rescale:
        out["rescale"] = _rescale_boxes(p, batch, image_size, g)
    if p.blur_p:  # sigma 0 = not blurred
        on = torch.rand(batch, generator=g) < p.blur_p
        sigma = p.blur_sigma[0] + (p.blur_sigma[1] - p.blur_sigma[0]) * torch.rand(batch, generator=g)
        out["blur_sigma"] = torch.where(on, scaled(sigma, image_size), torch.zeros(()))
        out["blur_kernel"] = torch.tensor(blur_kernel_size(p, image_size))
    if p.noise_p:  # one seed for the batch's noise, so it can be drawn on the device
        on = torch.rand(batch, generator=g) < p.noise_p
        sigma = p.noise_sigma[0] + (p.noise_sigma[1] - p.noise_sigma[0]) * torch.rand(batch, generator=g)
        out["noise_sigma"] = torch.where(on, sigma, torch.zeros(()))
        out["noise_seed"] = torch.randint(0, 2**62, (1,), generator=g)
    if p.cast_p:  # a = 0: no cast
        on = torch.rand(batch, generator=g) < p.cast_p
        out["cast"] = torch.where(on, p.cast * (2 * torch.rand(batch, generator=g) - 1), torch.zeros(()))
    if p.gray_p:
        out["gray"] = torch.rand(batch, generator=g) < p.gray_p
    if p.jpeg_p:  # quality 0 = not compressed
        on = torch.rand(batch, generator=g) < p.jpeg_p
        q = torch.randint(p.jpeg_quality[0], p.jpeg_quality[1] + 1, (batch,), generator=g)
        out["jpeg_quality"] = torch.where(on, q, torch.zeros((), dtype=q.dtype))
    return out


def rescale_padding(size: int) -> int:
    """Reflect padding around the image that zoomed-out windows may reach into (z >= 0.5 needs
    at most S/2 a side when the window is centred; off-centre windows are kept inside it)."""
    return size // 2


def _rescale_boxes(p: Policy, batch: int, size: int, g: torch.Generator | None) -> torch.Tensor:
    """Square windows [x0, y0, x1, y1] (whole pixels, image coordinates) of side L = round(S/z),
    z ~ U(rescale): zooming in (L <= S) the window lies inside the image, zooming out it holds
    the whole image and reaches into the reflect padding; its position is uniform over the
    places allowed."""
    pad = rescale_padding(size)
    z = p.rescale[0] + (p.rescale[1] - p.rescale[0]) * torch.rand(batch, generator=g)
    side = (size / z).round().clamp(1, size + 2 * pad)
    lo = torch.where(side <= size, torch.zeros(()), (size - side).clamp(min=-pad))
    hi = torch.where(side <= size, size - side, torch.minimum(torch.zeros(()), size + pad - side))
    x0 = lo + torch.floor(torch.rand(batch, generator=g) * (hi - lo + 1))
    y0 = lo + torch.floor(torch.rand(batch, generator=g) * (hi - lo + 1))
    return torch.stack([x0, y0, x0 + side, y0 + side], dim=1)


def _crop_boxes(p: Policy, batch: int, size: int, g: torch.Generator | None, attempts: int = 10) -> torch.Tensor:
    """RandomResizedCrop.get_params for a batch of square images: up to `attempts` draws of
    (area, log-ratio) per sample, whole-pixel width/height, the first draw that fits the image
    (rejection, not clamping: clamping would keep boxes torchvision never makes); a sample with
    no fitting draw takes the whole image, torchvision's fallback for a square image. Boxes are
    [x0, y0, x1, y1] in whole pixels."""
    area = size**2 * (p.crop_scale[0] + (p.crop_scale[1] - p.crop_scale[0]) * torch.rand(batch, attempts, generator=g))
    lo, hi = math.log(p.crop_ratio[0]), math.log(p.crop_ratio[1])
    ratio = torch.exp(lo + (hi - lo) * torch.rand(batch, attempts, generator=g))
    w = torch.sqrt(area * ratio).round()
    h = torch.sqrt(area / ratio).round()
    fits = (w > 0) & (w <= size) & (h > 0) & (h <= size)
    first = fits.int().argmax(dim=1, keepdim=True)  # index of the first fitting draw
    found = fits.any(dim=1)
    w = torch.where(found, w.gather(1, first)[:, 0], torch.tensor(float(size)))
    h = torch.where(found, h.gather(1, first)[:, 0], torch.tensor(float(size)))
    # torch.randint(0, size - h + 1) per sample, as torchvision draws the offset
    y0 = torch.floor(torch.rand(batch, generator=g) * (size - h + 1))
    x0 = torch.floor(torch.rand(batch, generator=g) * (size - w + 1))
    return torch.stack([x0, y0, x0 + w, y0 + h], dim=1)


def _grayscale(x: torch.Tensor) -> torch.Tensor:
    # ITU-R 601-2 luma, as torchvision's rgb_to_grayscale
    return (0.2989 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def _blend(x: torch.Tensor, other: torch.Tensor | None, factor: torch.Tensor) -> torch.Tensor:
    """torchvision's _blend, factor * x + (1 - factor) * other, as one lerp (other=None: black)."""
    f = factor.view(-1, 1, 1, 1)
    return (x * f if other is None else torch.lerp(other.expand_as(x), x, f)).clamp_(0, 1)


def _by_group(x: torch.Tensor, codes: torch.Tensor, fn) -> torch.Tensor:
    """Apply fn(part, rows, code) to the samples of each distinct `codes` row. `codes` lives on
    the CPU (no device sync to group); each group is gathered and scattered back once."""
    groups, inverse = torch.unique(codes, dim=0, return_inverse=True)
    if len(groups) == 1:
        return fn(x, None, groups[0])
    out = None
    for j, code in enumerate(groups):
        rows = torch.nonzero(inverse == j).squeeze(1).to(x.device, non_blocking=True)
        part = fn(x.index_select(0, rows), rows, code)
        out = torch.empty((len(x), *part.shape[1:]), dtype=part.dtype, device=x.device) if out is None else out
        out.index_copy_(0, rows, part)
    return out


def _dihedral(x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """Flips then rot90: each sample gets one of the 8 symmetries of the square; exact for any dtype."""
    zeros = torch.zeros(len(x), dtype=torch.long)
    code = (params.get("hflip", zeros).long() + 2 * params.get("vflip", zeros).long()
            + 4 * params.get("rot90", zeros).long())
    if not code.any():
        return x

    def move(part: torch.Tensor, rows: torch.Tensor | None, c: torch.Tensor) -> torch.Tensor:
        c = int(c)
        flips = [d for d, on in ((-1, c & 1), (-2, c & 2)) if on]
        if flips:
            part = part.flip(flips)
        return torch.rot90(part, c >> 2, dims=(-2, -1)) if c >> 2 else part

    return _by_group(x, code, move)


def _color(x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """Brightness, contrast, saturation blends in each sample's own order (as ColorJitter)."""
    if "color_order" not in params:
        return x
    factors = {k: params[k].to(x.device, non_blocking=True) for k in ("brightness", "contrast", "saturation") if k in params}

    def jitter(part: torch.Tensor, rows: torch.Tensor | None, order: torch.Tensor) -> torch.Tensor:
        f = factors if rows is None else {k: v.index_select(0, rows) for k, v in factors.items()}
        for op in order.tolist():
            if op == 0 and "brightness" in f:
                part = _blend(part, None, f["brightness"])
            elif op == 1 and "contrast" in f:
                mean = _grayscale(part).mean(dim=(-3, -2, -1), keepdim=True)
                part = _blend(part, mean, f["contrast"])
            elif op == 2 and "saturation" in f:
                part = _blend(part, _grayscale(part), f["saturation"])
        return part

    return _by_group(x, params["color_order"], jitter)


def apply_params(x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """Apply drawn parameters to a [B,3,S,S] batch, in the order of per_image_transform: crop,
    flips, rot90, colour. Takes float in [0,1], or uint8 (returned as float in [0,1]): without
    a crop the flips and rotations then move uint8 pixels, a quarter of the bytes, before the
    conversion, which is exact because they only move pixels."""
    moved = False
    if "rescale" in params:  # reflect-pad (uint8: a quarter of the bytes), then as a crop
        pad = rescale_padding(x.shape[-1])
        x = _resize_windows(TF.pad(x, [pad] * 4, padding_mode="reflect"), params["rescale"] + pad, x.shape[-1])
    if x.dtype == torch.uint8:
        if "crop" not in params:
            x, moved = _dihedral(x, params), True
        x = x.float().div_(255)
    if "crop" in params:
        # One bilinear sample at each output pixel's centre: a crop box is never larger than the
        # output, so this is resized_crop's bilinear upsampling (more samples per bin would blur,
        # and cost 3x on a CPU)
        x = _roi_resize(x, params["crop"], x.shape[-1], sampling_ratio=1)
    if not moved:
        x = _dihedral(x, params)
    return _photometric(_color(x, params), params)


def _resize_windows(x: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Each sample's square window resized to size x size in one roi_align: adaptive sampling
    averages ceil(L/S) x ceil(L/S) bilinear samples per output pixel, so a zoomed-out (larger)
    window is low-passed before it is shrunk, as an antialiased resize is."""
    x = x.float().div_(255) if x.dtype == torch.uint8 else x
    return _roi_resize(x, boxes, size, sampling_ratio=0)


def _roi_resize(x: torch.Tensor, boxes: torch.Tensor, size: int, sampling_ratio: int) -> torch.Tensor:
    """Sample i's box [x0, y0, x1, y1] of float `x` resized to size x size (roi_align, pixel-aligned)."""
    rois = torch.cat([torch.arange(len(x), dtype=x.dtype)[:, None], boxes.to(x.dtype)], 1)
    return roi_align(x, rois.to(x.device, non_blocking=True), output_size=(size, size), spatial_scale=1.0,
                     sampling_ratio=sampling_ratio, aligned=True)


def gaussian_kernels(sigma: torch.Tensor, k: int) -> torch.Tensor:
    """[B,k,k] Gaussian kernels of per-sample sigma (px), torchvision's gaussian_blur kernel."""
    d = torch.arange(k, dtype=torch.float32) - k // 2
    one = torch.softmax(-0.5 * (d / sigma.view(-1, 1)) ** 2, dim=1)
    return one[:, :, None] * one[:, None, :]


def _photometric(x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """Camera order: blur (optics), noise (sensor), colour cast (white balance), grayscale, JPEG
    (storage). Only the samples a step drew are touched; float [B,3,S,S] in [0,1] in and out."""
    if "blur_sigma" in params and (on := params["blur_sigma"] > 0).any():
        rows = torch.nonzero(on).squeeze(1)
        k = int(params["blur_kernel"])
        rows_d = rows.to(x.device, non_blocking=True)
        x = x.index_copy(0, rows_d, per_sample_conv(x.index_select(0, rows_d), gaussian_kernels(params["blur_sigma"][rows], k)))
    if "noise_sigma" in params and (params["noise_sigma"] > 0).any():
        noise = torch.randn(x.shape, generator=torch.Generator(x.device).manual_seed(int(params["noise_seed"])),
                            device=x.device)
        x = (x + noise * params["noise_sigma"].to(x.device).view(-1, 1, 1, 1)).clamp_(0, 1)
    if "cast" in params and params["cast"].any():
        x = colour_cast(x, 1 + params["cast"], 1 - params["cast"])
    if "gray" in params and params["gray"].any():
        x = torch.where(params["gray"].to(x.device).view(-1, 1, 1, 1), TF.rgb_to_grayscale(x, 3), x)
    if "jpeg_quality" in params and params["jpeg_quality"].any():
        x = x.clone()
        for i in torch.nonzero(params["jpeg_quality"]).squeeze(1).tolist():  # torchvision's JPEG: per image, on the CPU
            x[i] = _jpeg(x[i], int(params["jpeg_quality"][i]))
    return x


def _jpeg(img: torch.Tensor, quality: int) -> torch.Tensor:
    u8 = TF.to_dtype(img.cpu(), torch.uint8, scale=True)
    return TF.to_dtype(TF.jpeg(u8, quality), torch.float32, scale=True).to(img.device)


def batch_augment(x: torch.Tensor, policy: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """Augment a [B,3,S,S] batch (uint8, or float in [0,1]) on whatever device it lives on;
    returns float in [0,1]; an unknown policy is a ValueError (get_policy)."""
    return apply_params(x, sample_params(policy, x.shape[0], x.shape[-1], generator) if policy != "none" else {})


def reference_apply(img: torch.Tensor, params: dict[str, torch.Tensor], i: int) -> torch.Tensor:
    """Apply sample i's parameters to one image with torchvision's per-image functionals.
    The tests use it to show the batch form equals the per-image semantics."""
    size = img.shape[-1]
    if "rescale" in params:
        pad = rescale_padding(size)
        x0, y0, x1, y1 = (int(v) + pad for v in params["rescale"][i].tolist())
        img = TF.resized_crop(TF.pad(img, [pad] * 4, padding_mode="reflect"), top=y0, left=x0, height=y1 - y0,
                              width=x1 - x0, size=[size, size], antialias=True)
    if "crop" in params:
        x0, y0, x1, y1 = params["crop"][i].tolist()
        img = TF.resized_crop(img, top=int(y0), left=int(x0), height=int(y1 - y0), width=int(x1 - x0),
                              size=[size, size], antialias=False)
    if "hflip" in params and params["hflip"][i]:
        img = TF.horizontal_flip(img)
    if "vflip" in params and params["vflip"][i]:
        img = TF.vertical_flip(img)
    if "rot90" in params:
        img = TF.rotate(img, 90.0 * int(params["rot90"][i]))
    if "color_order" in params:
        for op in params["color_order"][i].tolist():
            if op == 0 and "brightness" in params:
                img = TF.adjust_brightness(img, float(params["brightness"][i]))
            elif op == 1 and "contrast" in params:
                img = TF.adjust_contrast(img, float(params["contrast"][i]))
            elif op == 2 and "saturation" in params:
                img = TF.adjust_saturation(img, float(params["saturation"][i]))
    if "blur_sigma" in params and params["blur_sigma"][i] > 0:
        sigma = float(params["blur_sigma"][i])
        k = int(params["blur_kernel"])
        img = TF.gaussian_blur(img, [k, k], [sigma, sigma])
    if "noise_sigma" in params and params["noise_sigma"][i] > 0:  # the batch's noise, row i
        noise = torch.randn((len(params["noise_sigma"]), *img.shape),
                            generator=torch.Generator().manual_seed(int(params["noise_seed"])))[i]
        img = (img + noise * float(params["noise_sigma"][i])).clamp(0, 1)
    if "cast" in params and params["cast"][i]:
        img = colour_cast(img[None], 1 + float(params["cast"][i]), 1 - float(params["cast"][i]))[0]
    if "gray" in params and params["gray"][i]:
        img = TF.rgb_to_grayscale(img, 3)
    if "jpeg_quality" in params and params["jpeg_quality"][i]:
        img = _jpeg(img, int(params["jpeg_quality"][i]))
    return img
