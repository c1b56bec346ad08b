"""ResNet-18 with a 2-class head and a freezing depth, and where its ImageNet weights come from.

Weights are looked for in this order: an explicit path, `$CRACK_WEIGHTS`, the torch hub
cache, a download from torchvision's URL. `weights="auto"` falls back to random init with a
loud warning; `weights="imagenet"` makes a missing file an error; `weights="random"` skips
the search. What was used (path + SHA-256, or "random") is recorded in every result.
"""
from __future__ import annotations

import os
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, ResNet

from crackcore.exceptions import WeightsError
from crackcore.hashing import sha256_file

WEIGHTS_FILENAME = "resnet18-f37072fd.pth"
WEIGHTS_URL = "https://download.pytorch.org/models/" + WEIGHTS_FILENAME
WEIGHTS_SHA256 = "f37072fd47e89c5e827621c5baffa7500819f7896bbacec160b1a16c560e07ec"
STAGES = ("stem", "layer1", "layer2", "layer3", "layer4")  # freeze_depth k freezes the first k


@dataclass
class WeightsInfo:
    source: str  # "path" | "env" | "hub_cache" | "download" | "random"
    path: str | None
    sha256: str | None
    official: bool  # byte-identical to torchvision's resnet18-f37072fd.pth

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        if self.source == "random":
            return "random init (no ImageNet weights)"
        return f"{self.path} (sha256 {self.sha256[:12]}…, {'official torchvision' if self.official else 'user file'})"


def _check_file(path: Path, source: str) -> WeightsInfo:
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist; pass a resnet18 .pth, or --weights random")
    digest = sha256_file(path)
    # torchvision names files <arch>-<first 8 hex of sha256>.pth: a mismatch means a corrupt download.
    m = re.fullmatch(r"resnet18-([0-9a-f]{8})\.pth", path.name)
    if m and not digest.startswith(m.group(1)):
        raise WeightsError(f"weights file {path} is corrupt: its SHA-256 {digest[:12]}… does not match the "
                           f"{m.group(1)} in its name; delete it and download again")
    return WeightsInfo(source=source, path=str(path.resolve()), sha256=digest, official=digest == WEIGHTS_SHA256)


def resolve_weights(weights: str | Path | None = "auto", download: bool = True) -> WeightsInfo:
    """Find ImageNet weights (see module doc). Never returns a file it has not hashed."""
    spec = "auto" if weights is None else str(weights)
    if spec == "random":
        return WeightsInfo("random", None, None, False)
    if spec not in ("auto", "imagenet"):
        return _check_file(Path(spec).expanduser(), "path")
    if os.environ.get("CRACK_WEIGHTS"):
        return _check_file(Path(os.environ["CRACK_WEIGHTS"]).expanduser(), "env")
    cached = Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILENAME
    if cached.is_file():
        return _check_file(cached, "hub_cache")
    url = os.environ.get("CRACK_WEIGHTS_URL", WEIGHTS_URL)
    problem = "downloads are disabled"
    if download and os.environ.get("CRACK_OFFLINE") != "1":
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            # check_hash verifies the sha256 prefix in the file name; the .partial file is renamed on success only
            torch.hub.download_url_to_file(url, str(cached), hash_prefix=WEIGHTS_SHA256[:8] if url == WEIGHTS_URL else None,
                                           progress=False)
            return _check_file(cached, "download")
        except Exception as exc:
            problem = f"download from {url} failed ({type(exc).__name__}: {str(exc)[:80]})"
    if spec == "imagenet":
        raise WeightsError(f"ImageNet weights required but none found ({problem}); put {WEIGHTS_FILENAME} in "
                           f"{cached.parent}, or set CRACK_WEIGHTS=/path/to/{WEIGHTS_FILENAME}, or pass --weights PATH")
    print("!" * 78 + f"\n!! NO IMAGENET WEIGHTS: {problem}; no file at $CRACK_WEIGHTS or {cached}.\n"
          "!! Training from RANDOM INIT - expect slower learning; recorded as weights=random.\n" + "!" * 78,
          file=sys.stderr, flush=True)
    return WeightsInfo("random", None, None, False)


class CrackResNet(ResNet):
    """torchvision ResNet-18 (same parameter names, so its state_dict loads into
    `torchvision.models.resnet18(num_classes=2)`) whose first `freeze_depth` stages are frozen:
    no gradients, and their BatchNorm layers stay in eval mode even in `train()`, so frozen
    stages really are fixed feature extractors."""

    def __init__(self, freeze_depth: int = 0, num_classes: int = 2):
        super().__init__(BasicBlock, [2, 2, 2, 2], num_classes=num_classes)  # freeze_depth: TrainConfig checks it
        self.freeze_depth = freeze_depth

    def frozen_modules(self) -> list[nn.Module]:
        stages = [[self.conv1, self.bn1], [self.layer1], [self.layer2], [self.layer3], [self.layer4]]
        return [m for stage in stages[: self.freeze_depth] for m in stage]

    def apply_freeze(self) -> None:
        for m in self.frozen_modules():
            for p in m.parameters():
                p.requires_grad_(False)
        self.train(self.training)  # frozen BatchNorm in eval mode from the start, not from the first .train()

    def train(self, mode: bool = True) -> "CrackResNet":
        super().train(mode)
        for m in self.frozen_modules():
            m.eval()
        return self


def load_backbone(info: WeightsInfo) -> dict[str, torch.Tensor] | None:
    """The ImageNet backbone tensors of a resolved weights file (its `fc` dropped), or None for
    random init. Load once and hand the dict to `build_model(backbone=...)` where the file may
    not exist, e.g. on the other nodes of a Ray cluster."""
    if not info.path:
        return None
    try:
        state = torch.load(info.path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a JPEG, an archive, a truncated file: never retried with weights_only=False
        raise WeightsError(f"{info.path} is not a PyTorch weights file ({type(exc).__name__}); pass torchvision's "
                           f"{WEIGHTS_FILENAME}, or --weights random") from None
    if not isinstance(state, dict):
        raise WeightsError(f"{info.path} is not a state_dict; expected torchvision's {WEIGHTS_FILENAME}")
    backbone = {k: v for k, v in state.items() if not k.startswith("fc.")}
    missing, unexpected = CrackResNet(0).load_state_dict(backbone, strict=False)
    if unexpected or set(missing) != {"fc.weight", "fc.bias"}:
        raise WeightsError(f"{info.path} is not a resnet18 state_dict (missing {missing[:3]}, unexpected "
                           f"{unexpected[:3]}); pass torchvision's {WEIGHTS_FILENAME}")
    return backbone


def build_model(freeze_depth: int = 0, weights: str | Path | None = "auto", weights_info: WeightsInfo | None = None,
                backbone: dict[str, torch.Tensor] | None = None) -> tuple[CrackResNet, WeightsInfo]:
    """ResNet-18, ImageNet backbone when available, fresh 2-class `fc`, first `freeze_depth`
    stages frozen. Pass `weights_info` to reuse an already resolved file (no second search),
    and `backbone` (from `load_backbone`) to skip reading the file."""
    info = weights_info or resolve_weights(weights)
    backbone = load_backbone(info) if backbone is None else backbone
    model = CrackResNet(freeze_depth)
    if backbone is not None:
        model.load_state_dict(backbone, strict=False)  # fc stays freshly initialised
    model.apply_freeze()
    return model, info


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]
