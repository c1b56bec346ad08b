"""A trained model behind one small interface, whichever runtime runs it: `model.pt` on PyTorch
or `model.onnx` (written by crackcore.export) on onnxruntime. predict and bench ask a
`Classifier` for `prob_crack(batch_u8)` and read its `meta`; they never see the runtime.

The ONNX contract (what a field app needs and nothing else): input `image`, uint8 RGB
[B, 3, S, S] with pixel values 0-255 (B dynamic, S fixed at export); the graph itself scales to
0-1 and normalises with the model's mean/std, so the app only decodes and resizes. Outputs
`logits` float32 [B, 2] (class order in the metadata: Negative, Positive) and `prob_crack`
float32 [B] = sigmoid((z_crack - z_no_crack) / temperature). A tile is a crack when
prob_crack >= the metadata's `threshold`. The model's metadata_props hold all of it as text.
"""
from __future__ import annotations

import copy
import json
import re
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from crackcore.exceptions import ModelFileError
from crackcore.model import CrackResNet
from crackcore.outputs import MODEL_FORMAT
from crackcore.devices import available_cpus, resolve_device

ONNX_FORMAT = f"{MODEL_FORMAT}-onnx"  # metadata_props["format"] of the ONNX files crackcore.export writes
ONNX_VERSION = 1
DEFAULT_THRESHOLD = 0.5  # model.pt without a calibrated "threshold"
INPUT_NAME, OUTPUT_NAMES = "image", ("logits", "prob_crack")
HINT = "pass the model.pt a study or python -m crackcore.fit wrote, or a model.onnx from python -m crackcore.export"


def threshold_of(meta: dict[str, Any]) -> float:
    """The probability of a crack at or above which an image (a tile) is labelled crack."""
    return DEFAULT_THRESHOLD if meta.get("threshold") is None else float(meta["threshold"])


def temperature_of(meta: dict[str, Any]) -> float:
    """The temperature prob_crack is scaled by (1: none was fitted)."""
    return float(meta.get("temperature") or 1.0)


class FieldModel(nn.Module):
    """The network with its input contract built in: uint8 RGB [B,3,S,S] -> (logits [B,2],
    prob_crack [B]). What PyTorch runs in predict and what crackcore.export traces, so both
    runtimes run the same computation."""

    def __init__(self, net: nn.Module, mean: list[float], std: list[float], temperature: float):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        self.temperature = float(temperature)

    def normalise(self, image: torch.Tensor) -> torch.Tensor:
        """uint8 RGB -> the float input the network was trained on."""
        return (image.float() / 255 - self.mean) / self.std

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.net(self.normalise(image)).float()
        return logits, torch.sigmoid((logits[:, 1] - logits[:, 0]) / self.temperature)


class Classifier(ABC):
    """What predict needs of a model: `meta` (image_size, classes, temperature, threshold, ...,
    and `device`, the runtime in words or a torch.device) and the scores of a uint8 batch."""

    meta: dict[str, Any]

    @abstractmethod
    def run(self, batch_u8: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """uint8 [B,3,S,S] at meta["image_size"] -> (logits float32 [B,2], prob_crack float32 [B])."""

    def check_batch(self, batch_u8: torch.Tensor) -> None:
        size = self.meta["image_size"]
        if batch_u8.dtype != torch.uint8 or batch_u8.ndim != 4 or tuple(batch_u8.shape[1:]) != (3, size, size):
            raise ModelFileError(f"this model takes uint8 [batch, 3, {size}, {size}] images; got {batch_u8.dtype} "
                                 f"{list(batch_u8.shape)} (decode with crackcore.images.decode_file(path, {size}))")

    def prob_crack(self, batch_u8: torch.Tensor) -> np.ndarray:
        """uint8 [B,3,S,S] at the model's image size -> prob_crack (temperature-scaled if saved)."""
        return self.run(batch_u8)[1].astype(np.float64)


class TorchClassifier(Classifier):
    def __init__(self, net: CrackResNet, meta: dict[str, Any], device: torch.device):
        self.meta = {**meta, "device": device, "runtime": "pytorch"}
        self.field = FieldModel(net, meta["mean"], meta["std"], temperature_of(meta)).to(device).eval()

    @torch.inference_mode()
    def run(self, batch_u8: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        self.check_batch(batch_u8)
        logits, prob = self.field(batch_u8.to(self.meta["device"]))
        return logits.cpu().numpy(), prob.cpu().numpy()


class OnnxClassifier(Classifier):
    """`source`: an .onnx file, or its bytes (crackcore.export checks a model before writing it)."""

    def __init__(self, source: Path | bytes, device: torch.device | None = None, name: str | None = None,
                 threads: int | None = None):
        import onnxruntime as ort

        path = name or ("<exported model>" if isinstance(source, bytes) else str(source))  # for messages
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or available_cpus()  # not every core of a shared or pinned machine
        opts.log_severity_level = 3  # its warnings are not the user's problem; failures still raise
        cuda = device is not None and device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers()
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(source if isinstance(source, bytes) else str(source), opts,
                                                providers=providers)
        except Exception as exc:  # not an ONNX file, or one onnxruntime cannot run
            raise ModelFileError(f"{path} is not a crackcore ONNX model (onnxruntime cannot load it: "
                                 f"{ort_reason(exc)}); {HINT}") from None
        self.meta = {**onnx_meta(path, self.session.get_modelmeta().custom_metadata_map),
                     "device": f"onnxruntime {self.session.get_providers()[0].removesuffix('ExecutionProvider')}",
                     "runtime": "onnxruntime"}
        check_graph(path, self.session, self.meta["image_size"])

    def run(self, batch_u8: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        self.check_batch(batch_u8)
        logits, prob = self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: np.ascontiguousarray(batch_u8.cpu().numpy())})
        return logits, prob


def ort_reason(exc: Exception) -> str:
    """onnxruntime's load error without its status code, file path and C++ source location."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text)
    if re.search(r"\.cc:\d+ ", text):  # "Load model from P failed:/src/x.cc:256 onnxruntime::F(...) reason"
        text = text.rsplit(") ", 1)[-1]
    return re.sub(r"^Load model from .* failed:\s*", "", text)[:120]


def to_onnx(field: FieldModel, image_size: int, metadata: dict[str, str]) -> bytes:
    """The serialized ONNX model of `field` (on the CPU, eval mode) with a dynamic batch
    dimension and `metadata` as its metadata_props."""
    import onnx

    field = copy.deepcopy(field).cpu().eval()  # the caller's module stays on its device
    example = torch.zeros(2, 3, image_size, image_size, dtype=torch.uint8)  # 2: a batch of 1 would be specialised
    program = torch.onnx.export(field, (example,), dynamo=True, input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
                                dynamic_shapes=({0: torch.export.Dim("batch", min=1)},), verbose=False)
    proto = program.model_proto
    onnx.helper.set_model_props(proto, metadata)
    proto.doc_string = __doc__.split("\n\n")[1]
    return proto.SerializeToString()


def onnx_metadata(meta: dict[str, Any], source_sha256: str, source_name: str) -> dict[str, str]:
    """metadata_props of an exported model (all values text, JSON where not a plain string)."""
    return {"format": ONNX_FORMAT, "version": str(ONNX_VERSION),
            "input": f"{INPUT_NAME}: uint8 RGB [batch, 3, {meta['image_size']}, {meta['image_size']}], 0-255, "
                     "normalised inside the graph",
            "outputs": "logits: float32 [batch, 2] in class order; prob_crack: float32 [batch] = "
                       "sigmoid((logits[:,1] - logits[:,0]) / temperature); crack when prob_crack >= threshold",
            "image_size": str(meta["image_size"]), "resize": "shorter side to image_size, centre crop (antialiased)",
            "mean": json.dumps(list(meta["mean"])), "std": json.dumps(list(meta["std"])),
            "classes": json.dumps(list(meta["classes"])), "arch": str(meta.get("arch", "resnet18")),
            "temperature": repr(temperature_of(meta)), "threshold": repr(threshold_of(meta)),
            "source_model": source_name, "source_sha256": source_sha256,
            "config": json.dumps(meta.get("config") or {}, sort_keys=True, default=str),
            "weights": json.dumps(meta.get("weights") or {}, sort_keys=True, default=str),
            "adaptation": json.dumps(meta.get("adaptation") or {}, sort_keys=True, default=str),
            # crackcore.calibrate's record (site, k, figures): predict names where the threshold came from
            **({"calibration": json.dumps(meta["calibration"], sort_keys=True, default=str)}
               if meta.get("calibration") else {})}


def onnx_meta(path: str | Path, props: dict[str, str]) -> dict[str, Any]:
    """The metadata_props of one of our ONNX files as the meta dict model.pt gives."""
    if props.get("format") != ONNX_FORMAT:
        raise ModelFileError(f"{path} is not a crackcore ONNX model (no '{ONNX_FORMAT}' format tag in its metadata, so "
                             f"its input size and normalisation are unknown); {HINT}")
    if props.get("version") != str(ONNX_VERSION):
        raise ModelFileError(f"{path} is a crackcore ONNX model of version {props.get('version')}, this crackcore reads "
                             f"version {ONNX_VERSION}; export it again with python -m crackcore.export")
    try:
        return {"format": ONNX_FORMAT, "version": ONNX_VERSION, "image_size": int(props["image_size"]),
                "mean": json.loads(props["mean"]), "std": json.loads(props["std"]),
                "classes": json.loads(props["classes"]), "arch": props.get("arch"),
                "temperature": float(props["temperature"]), "threshold": float(props["threshold"]),
                "config": json.loads(props["config"]), "weights": json.loads(props.get("weights", "{}")),
                "source_sha256": props["source_sha256"], "source_model": props.get("source_model"),
                **({"calibration": json.loads(props["calibration"])} if "calibration" in props else {})}
    except (KeyError, ValueError) as exc:
        raise ModelFileError(f"{path} has damaged crackcore metadata ({type(exc).__name__}: {exc}); export it again "
                             "with python -m crackcore.export") from None


def check_graph(path: str | Path, session: Any, image_size: int) -> None:
    """The graph takes what its metadata says: uint8 [batch, 3, S, S] at the metadata's S."""
    inputs, outputs = session.get_inputs(), [o.name for o in session.get_outputs()]
    shape = inputs[0].shape if len(inputs) == 1 else None
    if len(inputs) != 1 or inputs[0].name != INPUT_NAME or inputs[0].type != "tensor(uint8)" or len(shape) != 4 \
            or not set(OUTPUT_NAMES) <= set(outputs):
        got = ", ".join(f"{i.name} {i.type} {i.shape}" for i in inputs)
        raise ModelFileError(f"{path} does not have the crackcore ONNX interface (input '{INPUT_NAME}' uint8 "
                             f"[batch,3,S,S] -> {', '.join(OUTPUT_NAMES)}; it has {got} -> {', '.join(outputs)}); "
                             "export it again with python -m crackcore.export")
    if shape[1:] != [3, image_size, image_size]:
        raise ModelFileError(f"{path} was exported for input {shape[1:]} but its metadata says {image_size} px "
                             f"([3, {image_size}, {image_size}]); export it again from its model.pt with "
                             "python -m crackcore.export")


def model_file_in(folder: Path) -> str:
    """The fix for `--model FOLDER`: the model files in it, else where one usually is."""
    found = sorted((p.name for p in folder.glob("*") if p.suffix in (".pt", ".onnx") and p.is_file()),
                   key=lambda n: (not n.startswith("model."), n))
    return " or ".join(str(folder / n) for n in found[:3]) if found else f"{folder / 'model.pt'} (or model.onnx)"


def load_torch_meta(path: Path) -> dict[str, Any]:
    """model.pt's payload (state_dict included), checked to be ours."""
    try:
        meta = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelFileError(f"{path} is not a crackcore model (torch.load failed: {type(exc).__name__}: "
                             f"{str(exc).splitlines()[0][:80]}); {HINT}") from None
    if not isinstance(meta, dict) or meta.get("format") != MODEL_FORMAT:
        raise ModelFileError(f"{path} is not a crackcore model (no '{MODEL_FORMAT}' format tag); {HINT}")
    return meta


def load_classifier(path: str | Path, device: torch.device | None = None) -> Classifier:
    """model.pt (PyTorch) or *.onnx (onnxruntime), each checked to be ours, its decision threshold too."""
    path = Path(path)
    if path.is_dir():
        raise ModelFileError(f"--model {path} is a folder; pass the model file in it, e.g. {model_file_in(path)}")
    if not path.is_file():
        raise ModelFileError(f"model file {path} does not exist; {HINT}")
    device = device or resolve_device("auto")
    if path.suffix.lower() == ".onnx":
        model: Classifier = OnnxClassifier(path, device)
    else:
        meta = load_torch_meta(path)
        net = CrackResNet(freeze_depth=0)
        try:
            net.load_state_dict(meta.pop("state_dict"))
        except (RuntimeError, KeyError, TypeError) as exc:  # damaged or foreign tensors
            raise ModelFileError(f"{path} holds damaged weights ({str(exc).splitlines()[0][:100]}); {HINT}") from None
        model = TorchClassifier(net, meta, device)
    threshold = model.meta.setdefault("threshold", DEFAULT_THRESHOLD)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold <= 1:
        raise ModelFileError(f"{path} holds a decision threshold {threshold!r} that is not a probability in 0..1; "
                             "re-run python -m crackcore.calibrate for it")
    return model
