"""Augmentation policies: the per-batch form (training) has the per-image semantics."""
from __future__ import annotations

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


def test_strong_crop_matches_resized_crop_closely(batch: torch.Tensor) -> None:
    params = sample_params("strong", len(batch), 32, torch.Generator().manual_seed(3))
    # resized_crop takes whole-pixel boxes, roi_align sub-pixel ones: give both the same whole-pixel
    # box; bilinear sampling still differs slightly, so compare on smooth images
    params["crop"] = params["crop"].round()
    smooth = torch.nn.functional.interpolate(batch[:, :, ::4, ::4], size=32, mode="bilinear", align_corners=False)
    out = apply_params(smooth, params)
    for i in range(len(batch)):
        assert (out[i] - reference_apply(smooth[i], params, i)).abs().mean() < 0.01


def test_random_parameters_have_the_intended_distribution() -> None:
    p = sample_params("flip_rotate", 20000, 32, torch.Generator().manual_seed(4))
    assert abs(p["hflip"].float().mean() - 0.5) < 0.02 and abs(p["vflip"].float().mean() - 0.5) < 0.02
    counts = torch.bincount(p["rot90"], minlength=4).float() / 20000
    assert (counts - 0.25).abs().max() < 0.02
    c = sample_params("color", 20000, 32, torch.Generator().manual_seed(5))
    b = POLICIES["color"].brightness
    assert c["brightness"].min() >= 1 - b and c["brightness"].max() <= 1 + b


def test_none_is_identity_and_unknown_policy_is_an_error(batch: torch.Tensor) -> None:
    assert torch.equal(batch_augment(batch, "none"), batch)
    with pytest.raises(ValueError, match="unknown augment policy 'mixup'"):
        batch_augment(batch, "mixup")
