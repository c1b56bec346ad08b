"""Augmentation policies: the per-batch form (training) has the per-image semantics."""
from __future__ import annotations

import math

import pytest
import torch

from crackcore.augment import POLICIES, apply_params, batch_augment, per_image_transform, reference_apply, sample_params
from crackcore.config import AUGMENT_POLICIES


@pytest.fixture(scope="module")
def batch() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(16, 3, 32, 32, generator=g)
    return x


@pytest.mark.parametrize("policy", AUGMENT_POLICIES)
def test_both_forms_keep_shape_and_range(policy: str, batch: torch.Tensor) -> None:
    out = batch_augment(batch, policy, torch.Generator().manual_seed(1))
    assert out.shape == batch.shape and out.min() >= 0 and out.max() <= 1
    one = per_image_transform(policy, 32)(batch[0])
    assert one.shape == (3, 32, 32) and one.min() >= 0 and one.max() <= 1


@pytest.mark.parametrize("policy", ["flip", "flip_rotate", "color"])
def test_batch_form_equals_torchvision_per_image(policy: str, batch: torch.Tensor) -> None:
    params = sample_params(policy, len(batch), 32, torch.Generator().manual_seed(2))
    out = apply_params(batch, params)
    for i in range(len(batch)):
        assert torch.allclose(out[i], reference_apply(batch[i], params, i), atol=1e-5), i


@pytest.mark.parametrize("policy", AUGMENT_POLICIES)
def test_uint8_batches_give_the_float_result_and_stay_untouched(policy: str) -> None:
    # training feeds uint8 straight from the cache; flips/rotations then move bytes before the
    # float conversion, which must not change a single value
    x_u8 = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(6))
    before = x_u8.clone()
    from_u8 = batch_augment(x_u8, policy, torch.Generator().manual_seed(7))
    from_float = batch_augment(x_u8.float() / 255, policy, torch.Generator().manual_seed(7))
    assert from_u8.dtype == torch.float32 and torch.equal(from_u8, from_float)
    assert torch.equal(x_u8, before)


def test_strong_crop_is_resized_crops_bilinear_upsampling(batch: torch.Tensor) -> None:
    params = sample_params("strong", len(batch), 32, torch.Generator().manual_seed(3))
    # boxes are whole pixels, as torchvision's. Inside, every pixel is the same bilinear sample;
    # on the outermost ring roi_align reads the pixels just outside the box where resized_crop
    # repeats the box's edge.
    assert torch.equal(params["crop"], params["crop"].round())
    crop = {"crop": params["crop"]}
    out = apply_params(batch, crop)
    for i in range(len(batch)):
        ref = reference_apply(batch[i], crop, i)
        assert torch.allclose(out[i, :, 1:-1, 1:-1], ref[:, 1:-1, 1:-1], atol=1e-5), i
        assert (out[i] - ref).abs().mean() < 0.01, i
    # and the whole policy (crop, flips, rotation, colour) stays close to the per-image form
    params["crop"] = crop["crop"]
    full = apply_params(batch, params)
    assert sum((full[i] - reference_apply(batch[i], params, i)).abs().mean() for i in range(len(batch))) / len(batch) < 0.01


def test_random_parameters_have_the_intended_distribution() -> None:
    p = sample_params("flip_rotate", 20000, 32, torch.Generator().manual_seed(4))
    assert abs(p["hflip"].float().mean() - 0.5) < 0.02 and abs(p["vflip"].float().mean() - 0.5) < 0.02
    counts = torch.bincount(p["rot90"], minlength=4).float() / 20000
    assert (counts - 0.25).abs().max() < 0.02
    for policy in ("color", "strong"):  # each factor ~ U(1 - b, 1 + b), as ColorJitter draws it
        c = sample_params(policy, 20000, 32, torch.Generator().manual_seed(5))
        for name in ("brightness", "contrast", "saturation"):
            b, f = getattr(POLICIES[policy], name), c[name].double()
            assert 1 - b <= f.min() < 1 - 0.95 * b and 1 + 0.95 * b < f.max() <= 1 + b, (policy, name)
            assert abs(f.mean() - 1) < 0.01 * b + 0.002 and abs(f.std() - b / 3 ** 0.5) < 0.02 * b, (policy, name)
    c = sample_params("color", 20000, 32, torch.Generator().manual_seed(5))
    # ColorJitter draws its order per image: every sample has its own uniform permutation
    orders = c["color_order"]
    assert orders.shape == (20000, 3) and torch.equal(orders.sort(1).values, torch.arange(3).expand(20000, 3))
    _, counts = torch.unique(orders, dim=0, return_counts=True)
    assert len(counts) == 6 and (counts.float() / 20000 - 1 / 6).abs().max() < 0.02


def test_crop_boxes_follow_random_resized_crop() -> None:
    # same distribution as T.RandomResizedCrop.get_params: area, aspect ratio and position
    import torchvision.transforms.v2 as T

    n, size, policy = 20000, 64, POLICIES["strong"]
    boxes = sample_params("strong", n, size, torch.Generator().manual_seed(8))["crop"]
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert boxes.min() >= 0 and boxes[:, 2:].max() <= size
    torch.manual_seed(9)
    img = torch.zeros(3, size, size)
    ref = torch.tensor([T.RandomResizedCrop.get_params(img, list(policy.crop_scale), list(policy.crop_ratio))
                        for _ in range(n)], dtype=torch.float32)  # (top, left, height, width)
    for ours, theirs in [((w * h) / size**2, ref[:, 2] * ref[:, 3] / size**2), ((w / h).log(), (ref[:, 3] / ref[:, 2]).log()),
                         (boxes[:, 0] / size, ref[:, 1] / size), (boxes[:, 1] / size, ref[:, 0] / size)]:
        assert abs(ours.mean() - theirs.mean()) < 0.01 and abs(ours.std() - theirs.std()) < 0.01
    assert (w * h / size**2).mean() < 0.77  # clamping oversized boxes instead gave 0.786


def test_none_is_identity_and_unknown_policy_is_an_error(batch: torch.Tensor) -> None:
    assert torch.equal(batch_augment(batch, "none"), batch)
    with pytest.raises(ValueError, match="unknown augment policy 'mixup'"):
        batch_augment(batch, "mixup")


# --------------------------------------------------------------------------- shift-aware policies


def _scene(n: int = 1, size: int = 32) -> torch.Tensor:
    """Smooth concrete-like texture with a dark vertical crack 4 px wide: float [n,3,S,S]."""
    g = torch.Generator().manual_seed(11)
    x = torch.nn.functional.interpolate(0.5 + 0.15 * torch.randn(n, 3, 8, 8, generator=g), size=size, mode="bicubic",
                                        align_corners=False)
    x[..., size // 2 - 2:size // 2 + 2] = 0.1
    return x.clamp(0, 1)


def _stats(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per image: brightness, fine detail, red-blue balance, colourfulness, dark (crack) area."""
    return {"mean": x.mean((1, 2, 3)), "detail": (x[..., 1:] - x[..., :-1]).abs().mean((1, 2, 3)),
            "red_blue": (x[:, 0] - x[:, 2]).mean((1, 2)), "colour": (x[:, 0] - x[:, 1]).abs().mean((1, 2)),
            "dark": (x.mean(1) < 0.25).float().mean((1, 2))}


def test_photometric_batch_form_equals_torchvision_per_image() -> None:
    x = _scene(16)
    params = sample_params("photometric", 16, 32, torch.Generator().manual_seed(12))
    for key in ("blur_sigma", "noise_sigma", "cast", "gray", "jpeg_quality"):  # every step drawn for some, not all
        assert 0 < (params[key] != 0).sum() < 16, key
    out = apply_params(x, params)
    for i in range(16):
        assert torch.allclose(out[i], reference_apply(x[i], params, i), atol=1e-5), i
    untouched = [i for i in range(16) if not any(params[k][i] for k in ("blur_sigma", "noise_sigma", "cast", "gray",
                                                                          "jpeg_quality"))]
    assert all(torch.equal(out[i], x[i]) for i in untouched)


def test_scale_windows_follow_the_documented_zoom_and_resized_crop() -> None:
    n, size = 20000, 32
    boxes = sample_params("scale", n, size, torch.Generator().manual_seed(13))["rescale"]
    side = boxes[:, 2] - boxes[:, 0]
    assert torch.equal(side, boxes[:, 3] - boxes[:, 1]) and torch.equal(boxes, boxes.round())
    # side = S / z with z ~ U(0.5, 1.5): E[side] = S ln 3, between S / 1.5 and 2 S
    assert abs(side.mean() / size - math.log(3)) < 0.01 and side.min() >= round(size / 1.5) and side.max() <= 2 * size
    zoom_in = side <= size
    assert abs(zoom_in.float().mean() - 0.5) < 0.02
    assert (boxes[zoom_in, :2] >= 0).all() and (boxes[zoom_in, 2:] <= size).all()  # inside the image
    assert (boxes[~zoom_in, :2] <= 0).all() and (boxes[~zoom_in, 2:] >= size).all()  # holding all of it
    assert (boxes >= -(size // 2)).all() and (boxes <= size + size // 2).all()  # within the reflect padding
    x = _scene(16)
    params = sample_params("scale", 16, size, torch.Generator().manual_seed(14))
    out = apply_params(x, params)
    for i in range(16):
        ref = reference_apply(x[i], params, i)
        assert (out[i] - ref).abs().mean() < 0.01, i  # roi_align's averaging vs an antialiased resize
        if params["rescale"][i, 2] - params["rescale"][i, 0] <= size:  # zooming in: one bilinear sample, exact inside
            assert torch.allclose(out[i, :, 1:-1, 1:-1], ref[:, 1:-1, 1:-1], atol=1e-5), i


@pytest.fixture
def one_thread():
    # small per-image ops: on a busy 2-core machine two torch threads waiting on each other are 10x slower
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("policy", ["scale", "photometric", "domain"])
def test_shift_policies_batch_and_per_image_forms_agree_in_distribution(policy: str, one_thread) -> None:
    n = 300
    x = _scene(1)
    torch.manual_seed(15)  # the per-image form draws from torch's global RNG, as torchvision's transforms do
    transform = per_image_transform(policy, 32)
    per_image = torch.stack([transform(x[0]) for _ in range(n)])
    batch = batch_augment(x.expand(n, -1, -1, -1).contiguous(), policy, torch.Generator().manual_seed(16))
    a, b = _stats(per_image), _stats(batch)
    moved = [k for k in a if a[k].std() > 1e-4]
    assert "dark" in moved if policy != "photometric" else "detail" in moved  # the policy does something
    for k in moved:  # two-sample z on each statistic's mean, and similar spread
        z = (a[k].mean() - b[k].mean()) / (a[k].var() / n + b[k].var() / n).sqrt()
        assert abs(z) < 4, (policy, k, float(z))
        assert 0.7 < a[k].std() / b[k].std() < 1.4, (policy, k)
