"""Freezing semantics and where ImageNet weights come from."""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import torch
import torchvision

import crackcore.model as cm
from crackcore.model import STAGES, WeightsError, build_model, load_backbone, resolve_weights, trainable_parameters


def stage_of(name: str) -> str | None:
    if name.startswith(("conv1.", "bn1.")):
        return "stem"
    head = name.split(".")[0]
    return head if head in STAGES else None


@pytest.mark.parametrize("depth", range(6))
def test_freeze_depth_fixes_exactly_the_first_stages(depth: int) -> None:
    torch.manual_seed(0)
    model, _ = build_model(depth, "random")
    frozen = set(STAGES[:depth])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(trainable_parameters(model), lr=0.1, momentum=0.9, weight_decay=1e-4)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 2, (8,))
    model(x)  # straight from build_model, before any .train()/.eval()
    model.train()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    after = model.state_dict()
    assert model.fc.out_features == 2
    for name, value in after.items():
        if name.endswith("num_batches_tracked"):
            continue
        unchanged = torch.equal(before[name], value)
        # frozen stages: parameters AND BatchNorm running stats stay fixed (eval-mode BN)
        assert unchanged == (stage_of(name) in frozen), name


def _write_weights(path: Path) -> str:
    torch.save(torchvision.models.resnet18().state_dict(), path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_resolution_order_and_recorded_hash(tmp_path: Path, monkeypatch) -> None:
    explicit, env = tmp_path / "explicit.pth", tmp_path / "env.pth"
    h_explicit, h_env = _write_weights(explicit), _write_weights(env)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub-home"))
    monkeypatch.setenv("CRACK_WEIGHTS", str(env))
    info = resolve_weights(str(explicit))
    assert (info.source, info.sha256, info.official) == ("path", h_explicit, False)
    info = resolve_weights("auto")
    assert (info.source, info.sha256) == ("env", h_env)
    monkeypatch.delenv("CRACK_WEIGHTS")
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    cache.mkdir(parents=True)
    h_cache = _write_weights(cache / "resnet18-test.pth")
    monkeypatch.setattr(cm, "WEIGHTS_FILENAME", "resnet18-test.pth")
    info = resolve_weights("imagenet")
    assert (info.source, info.sha256) == ("hub_cache", h_cache)
    model, _ = build_model(3, str(explicit))
    state = torch.load(explicit, weights_only=True)
    assert torch.equal(model.layer2[0].conv1.weight, state["layer2.0.conv1.weight"])


def test_a_loaded_backbone_builds_the_model_without_the_file(tmp_path: Path) -> None:
    # what a trial on another Ray node does: the file was read on the driver only
    path = tmp_path / "w.pth"
    _write_weights(path)
    info = resolve_weights(str(path))
    backbone = load_backbone(info)
    assert backbone is not None and not any(k.startswith("fc.") for k in backbone)
    path.unlink()
    model, used = build_model(1, weights_info=info, backbone=backbone)
    assert used is info and torch.equal(model.layer3[1].bn2.running_mean, backbone["layer3.1.bn2.running_mean"])
    assert load_backbone(resolve_weights("random")) is None


def test_corrupt_download_is_detected_by_the_name_hash(tmp_path: Path) -> None:
    bad = tmp_path / "resnet18-f37072fd.pth"
    _write_weights(bad)  # right name, wrong content
    with pytest.raises(WeightsError, match="is corrupt"):
        resolve_weights(str(bad))


def test_missing_weights_auto_is_random_and_loud_imagenet_is_an_error(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-home"))
    monkeypatch.setenv("CRACK_WEIGHTS_URL", "http://127.0.0.1:9/resnet18.pth")
    monkeypatch.delenv("CRACK_OFFLINE", raising=False)
    info = resolve_weights("auto")
    assert info.source == "random" and info.sha256 is None
    assert "NO IMAGENET WEIGHTS" in capsys.readouterr().err
    with pytest.raises(WeightsError, match="ImageNet weights required"):
        resolve_weights("imagenet")


def test_a_file_that_is_not_resnet18_is_rejected(tmp_path: Path) -> None:
    other = tmp_path / "other.pth"
    torch.save(torchvision.models.resnet34().state_dict(), other)
    with pytest.raises(WeightsError, match="not a resnet18 state_dict"):
        build_model(0, str(other))
    with pytest.raises(WeightsError, match="does not exist"):
        resolve_weights(str(tmp_path / "missing.pth"))


def test_saved_state_dict_loads_into_plain_torchvision() -> None:
    model, _ = build_model(2, "random")
    plain = torchvision.models.resnet18(num_classes=2)
    plain.load_state_dict(model.state_dict())


def test_a_weights_file_that_is_a_jpeg_is_one_clear_error(crack_data: Path, tmp_path: Path) -> None:
    jpeg = tmp_path / "photo.jpg"
    shutil.copy(next((crack_data / "Positive").glob("*.jpg")), jpeg)
    with pytest.raises(WeightsError, match="is not a PyTorch weights file"):
        build_model(0, jpeg)
