"""`python -m crackcore.bench --data PATH`: is the data path fast enough to never starve the model?

Measured in one run on the current device, same model, batch size and image size throughout:
  model_only     training steps on a batch already on the device (the ceiling)
  pipeline       crackcore's training epoch over real images: decoded-once uint8 cache ->
                 batch gather -> augmentation per batch on the device -> step
  pil_baseline   the usual torchvision ImageFolder + PIL + per-image transforms DataLoader
  eval           crackcore's evaluate() over the val split
  loader_only    each data path alone, no model: how fast a model it could keep fed
and, with --study, trials/hour of a fixed small tuning study (tune/run.py in a subprocess, one
row per packing level). Prints a table and one JSON line (also written with --json-out).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from crackcore.config import TrainConfig
from crackcore.data import IMAGENET_MEAN, IMAGENET_STD, BatchLoader, normalize, prepare_data
from crackcore.model import build_model, trainable_parameters
from crackcore.train import (autocast_dtype, available_cpus, evaluate, make_scheduler, model_inputs, precision_name,
                             resolve_device, train_one_epoch, training_step)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _model_and_opt(cfg: TrainConfig, device: torch.device, steps_per_epoch: int):
    model, _ = build_model(cfg.freeze_depth, "random")
    model.to(device)
    channels_last = cfg.channels_last
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    step_model = torch.compile(model) if cfg.compile else model
    opt = torch.optim.SGD(trainable_parameters(model), lr=0.01, momentum=0.9)
    return model, step_model, opt, make_scheduler(opt, cfg, steps_per_epoch), channels_last


def _dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    return autocast_dtype(device) if cfg.amp else None


def bench_model_only(cfg: TrainConfig, device: torch.device, steps: int, warmup: int) -> float:
    """Images/s of forward+backward+step on one fixed batch already on the device."""
    _, model, opt, _, channels_last = _model_and_opt(cfg, device, steps)
    x = normalize(torch.rand(cfg.batch_size, 3, cfg.image_size, cfg.image_size, device=device))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 2, (cfg.batch_size,), device=device)
    model.train()
    loss_fn = nn.CrossEntropyLoss()
    dtype = _dtype(cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    for i in range(warmup + steps):
        if i == warmup:
            _sync(device)
            start = time.perf_counter()
        training_step(model, opt, x, y, loss_fn, dtype, scaler)
    _sync(device)
    return steps * cfg.batch_size / (time.perf_counter() - start)


def bench_pipeline(cfg: TrainConfig, data, device: torch.device) -> tuple[float, float]:
    """crackcore's real training epoch and evaluation; the first epoch warms up."""
    model, step_model, opt, _, channels_last = _model_and_opt(cfg, device, 1)
    loader = BatchLoader(data, "train", cfg.batch_size, device, shuffle=True, seed=0, drop_last=True)
    sched = make_scheduler(opt, cfg.replace(epochs=2), len(loader))
    gen = torch.Generator().manual_seed(0)
    scaler = torch.amp.GradScaler(device.type, enabled=_dtype(cfg, device) == torch.float16)
    result = {}
    for epoch in (1, 2):
        loader.set_epoch(epoch)
        result = train_one_epoch(step_model, opt, sched, loader, cfg.augment_policy, gen, amp=cfg.amp,
                                 channels_last=channels_last, scaler=scaler)
    val = evaluate(step_model, BatchLoader(data, "val", 256, device, shuffle=False), data,
                   channels_last=channels_last)
    return result["img_s"], val["img_s"]


def pil_loader(cfg: TrainConfig, root: Path, paths: list[str], device: torch.device,
               workers: int) -> torch.utils.data.DataLoader:
    """ImageFolder-style loading: PIL decode + per-image transforms in DataLoader workers."""
    from PIL import Image
    from torchvision import transforms as T

    tf = T.Compose([T.Resize(cfg.image_size), T.CenterCrop(cfg.image_size), T.RandomHorizontalFlip(),
                    T.RandomVerticalFlip(), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

    class Files(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(paths)

        def __getitem__(self, i: int):
            with Image.open(root / paths[i]) as im:
                return tf(im.convert("RGB")), int(paths[i].startswith("Positive"))

    return torch.utils.data.DataLoader(Files(), batch_size=cfg.batch_size, shuffle=True, num_workers=workers,
                                       pin_memory=device.type == "cuda", drop_last=True, persistent_workers=False)


def _timed_epoch(batches, device: torch.device, step) -> float:
    """Images/s over one pass, the first batch (worker start-up, caches) not counted."""
    seen, start = 0, None
    for i, (x, y) in enumerate(batches):
        if i == 1:
            _sync(device)
            start, seen = time.perf_counter(), 0
        step(x, y)
        seen += len(y)
    _sync(device)
    return seen / (time.perf_counter() - start)


def bench_pil_baseline(cfg: TrainConfig, root: Path, paths: list[str], device: torch.device, workers: int) -> float:
    """Training steps fed by the PIL DataLoader."""
    loader = pil_loader(cfg, root, paths, device, workers)
    _, model, opt, _, channels_last = _model_and_opt(cfg, device, len(loader))
    model.train()
    loss_fn = nn.CrossEntropyLoss()
    dtype = _dtype(cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        training_step(model, opt, x, y, loss_fn, dtype, scaler)

    return _timed_epoch(loader, device, step)


def bench_loaders_only(cfg: TrainConfig, data, root: Path, paths: list[str], device: torch.device,
                       workers: int) -> tuple[float, float]:
    """Images/s each data path delivers to the device with no model at all: crackcore's
    (cache -> gather -> augment + normalise on the device) and the PIL DataLoader's. Where the
    model is slower than both (a 2-core CPU), end-to-end figures cannot tell them apart; this
    says how fast a model each could keep fed (a GPU)."""
    loader = BatchLoader(data, "train", cfg.batch_size, device, shuffle=True, seed=0, drop_last=True)
    gen = torch.Generator().manual_seed(0)
    ours = _timed_epoch(((x, y) for x, y, _ in loader), device,
                        lambda x, y: model_inputs(x, cfg.augment_policy, gen))
    pil = _timed_epoch(pil_loader(cfg, root, paths, device, workers), device,
                       lambda x, y: (x.to(device, non_blocking=True), y.to(device, non_blocking=True)))
    return ours, pil


def bench_study(data: str | None, packing: list[float], quick: bool, cpus_per_trial: float, subset: int,
                image_size: int) -> list[dict[str, Any]]:
    """trials/hour of one fixed small study per packing level (GPUs per trial)."""
    run_py = Path(__file__).resolve().parents[1] / "tune" / "run.py"
    rows = []
    for gpus in packing:
        with tempfile.TemporaryDirectory() as storage:
            cmd = [sys.executable, str(run_py), "--storage-path", storage, "--study-name", "bench",
                   "--num-samples", "4" if quick else "8", "--max-epochs", "2", "--grace-period", "2",
                   "--final-epochs", "1", "--cpus-per-trial", str(cpus_per_trial), "--seed", "0"]
            cmd += ["--image-size", str(32 if quick else image_size), "--subset", str(60 if quick else subset)]
            cmd += ["--data", data] if data else []
            if gpus:
                cmd += ["--gpus-per-trial", str(gpus)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"bench study failed: {proc.stderr[-1500:]}")
            study = json.loads((Path(storage) / "bench" / "study.json").read_text())
        rows.append({"gpus_per_trial": gpus, "trials": study["trials"], "max_parallel_trials": study["max_parallel_trials"],
                     "search_seconds": round(study["search_seconds"], 1),
                     "trials_per_hour": round(study["trials"] * 3600 / study["search_seconds"], 1)})
    return rows


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m crackcore.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=os.environ.get("CRACK_DATA"), help="Positive/ Negative/ folder (default synthetic)")
    p.add_argument("--image-size", type=int, help="default 64 on CPU, 227 on GPU")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--subset", type=int, help="images per class (default all)")
    p.add_argument("--augment-policy", default="flip_rotate")
    p.add_argument("--device", default="auto")
    p.add_argument("--steps", type=int, default=30, help="model-only timed steps")
    p.add_argument("--workers", type=int, default=None, help="PIL baseline DataLoader workers (default: CPUs)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (all measurements)")
    p.add_argument("--no-amp", action="store_true")
    p.add_argument("--study", action="store_true", help="also measure trials/hour of a small study")
    p.add_argument("--packing", default="", help="GPUs per trial to compare, e.g. 1,0.5,0.25 (GPU only)")
    p.add_argument("--study-subset", type=int, default=300, help="images per class in the --study runs")
    p.add_argument("--quick", action="store_true", help="tiny sizes for CI; measures nothing meaningful")
    p.add_argument("--json-out", type=Path)
    a = p.parse_args(argv)
    device = resolve_device(a.device)
    size = a.image_size or (32 if a.quick else (227 if device.type == "cuda" else 64))
    subset = a.subset or (40 if a.quick else None)
    steps = 3 if a.quick else a.steps
    if device.type == "cpu":
        torch.set_num_threads(available_cpus())
    cfg = TrainConfig(data=a.data, image_size=size, subset=subset, batch_size=16 if a.quick else a.batch_size,
                      augment_policy=a.augment_policy, amp=not a.no_amp, compile=a.compile, weights="random",
                      synthetic_per_class=60 if a.quick else 400)
    t0 = time.perf_counter()
    data = prepare_data(cfg, progress=True)
    prepare_s = time.perf_counter() - t0
    n_train = len(data.indices("train"))

    model_only = bench_model_only(cfg, device, steps, warmup=1 if a.quick else 5)
    pipeline, eval_img_s = bench_pipeline(cfg, data, device)
    train_paths = data.samples.loc[data.samples["split"] == "train", "path"].tolist()
    workers = a.workers if a.workers is not None else (0 if a.quick else available_cpus())
    pil = bench_pil_baseline(cfg, Path(data.source["root"]), train_paths, device, workers)
    loader_only, pil_loader_only = bench_loaders_only(cfg, data, Path(data.source["root"]), train_paths, device, workers)
    out: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({available_cpus()} threads)",
        "image_size": size, "batch_size": cfg.batch_size, "augment_policy": a.augment_policy, "train_images": n_train,
        "data_kind": data.source["kind"], "train_precision": precision_name(_dtype(cfg, device)), "channels_last": cfg.channels_last, "compile": a.compile,
        "prepare_seconds": round(prepare_s, 2),
        "model_only_img_s": round(model_only, 1), "pipeline_img_s": round(pipeline, 1),
        "pipeline_over_model_only": round(pipeline / model_only, 3),
        "pil_baseline_img_s": round(pil, 1), "pil_workers": workers,
        "speedup_over_pil_baseline": round(pipeline / pil, 2),
        "loader_only_img_s": round(loader_only, 1), "pil_loader_only_img_s": round(pil_loader_only, 1),
        "loader_speedup_over_pil": round(loader_only / pil_loader_only, 1), "eval_img_s": round(eval_img_s, 1),
        "peak_memory_mb": round(peak_memory_mb(device), 1), "quick": a.quick,
    }
    if a.study:
        packing = [float(x) for x in a.packing.split(",") if x] if device.type == "cuda" else [0.0]
        out["study"] = bench_study(a.data, packing or [0.0], a.quick, cpus_per_trial=1, subset=a.study_subset,
                                   image_size=size)
    width = max(len(k) for k in out)
    for k, v in out.items():
        print(f"{k:<{width}}  {v}")
    line = json.dumps(out)
    print(line)
    if a.json_out:
        from crackcore.errors import write_text

        write_text(line + "\n", a.json_out)
    return 0


if __name__ == "__main__":
    from crackcore.cli import run_main

    sys.exit(run_main(main))
