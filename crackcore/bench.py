"""`python -m crackcore.bench --data PATH`: is the data path fast enough to never starve the model?

Measured in one run on the current device, same model, batch size and image size throughout:
  model_only     training steps on a batch already on the device (the ceiling)
  pipeline       crackcore's training epoch over real images: decoded-once uint8 cache ->
                 batch gather -> augmentation per batch on the device -> step
  pil_baseline   the usual torchvision ImageFolder + PIL + per-image transforms DataLoader
  eval           crackcore's evaluate() over the val split
  loader_only    each data path alone, no model: how fast a model it could keep fed
model_only, pipeline and pil_baseline run in --rounds interleaved rounds and report their best;
every round's figure is in the JSON line (`round_img_s`).
and, with --study, trials/hour of a fixed small tuning study (tune/run.py in a subprocess, one
row per packing level). Prints a table and one JSON line (also written with --json-out).
With --inference, only serving speed instead: img/s of PyTorch (as crackcore.predict runs
model.pt) vs onnxruntime (model.onnx from crackcore.export) on the CPU at batch 1 and 64, uint8
input to prob_crack, same random-init model; no data needed.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import torch
from PIL import Image
from torch import nn
from torchvision import transforms as T

from crackcore.augment import per_image_transform
from crackcore.classifier import Classifier, OnnxClassifier, TorchClassifier, onnx_metadata, to_onnx
from crackcore.config import TrainConfig
from crackcore.data import BatchLoader, discover, normalize, prepare_data
from crackcore.exceptions import ConfigError, DataError
from crackcore.images import CLASSES, IMAGENET_MEAN, IMAGENET_STD, cache_dir, io_workers, open_image
from crackcore.model import build_model, trainable_parameters
from crackcore.outputs import build_folder, write_text
from crackcore.devices import available_cpus, resolve_device
from crackcore.train import (evaluate, make_scheduler, model_inputs, precision_name, train_one_epoch, training_precision,
                             training_step)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _model_and_opt(cfg: TrainConfig, device: torch.device):
    """The model as a step runs it (compiled with cfg.compile), its optimiser and one training step."""
    model, _ = build_model(cfg.freeze_depth, "random")
    model.to(device)
    model = model.to(memory_format=torch.channels_last) if cfg.channels_last else model
    step_model = torch.compile(model) if cfg.compile else model
    opt = torch.optim.SGD(trainable_parameters(model), lr=0.01, momentum=0.9)
    step_model.train()
    loss_fn = nn.CrossEntropyLoss()
    dtype, scaler = training_precision(device, cfg.amp)
    return step_model, opt, lambda x, y: training_step(step_model, opt, x, y, loss_fn, dtype, scaler)


def model_only_bench(cfg: TrainConfig, device: torch.device, steps: int, warmup: int) -> Callable[[], float]:
    """A round = `steps` forward+backward+step on one fixed batch already on the device (the
    ceiling any data path can reach); returns img/s."""
    _, _, step = _model_and_opt(cfg, device)
    x = normalize(torch.rand(cfg.batch_size, 3, cfg.image_size, cfg.image_size, device=device))
    x = x.contiguous(memory_format=torch.channels_last) if cfg.channels_last else x
    y = torch.randint(0, 2, (cfg.batch_size,), device=device)

    def run() -> float:
        _sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            step(x, y)
        _sync(device)
        return steps * cfg.batch_size / (time.perf_counter() - start)

    for _ in range(warmup):
        step(x, y)
    return run


def pipeline_bench(cfg: TrainConfig, data, device: torch.device, rounds: int) -> tuple[Callable[[], float], Callable[[], float]]:
    """A round = one of crackcore's real training epochs (after one warm-up epoch); also returns
    a function timing evaluate() over the val split. Both return img/s."""
    step_model, opt, _ = _model_and_opt(cfg, device)
    loader = BatchLoader(data, "train", cfg.batch_size, device, shuffle=True, seed=0, drop_last=True)
    sched = make_scheduler(opt, cfg.replace(epochs=rounds + 1), len(loader))
    gen = torch.Generator().manual_seed(0)
    _, scaler = training_precision(device, cfg.amp)
    epochs = itertools.count(1)

    def run() -> float:
        loader.epoch = next(epochs)
        return train_one_epoch(step_model, opt, sched, loader, cfg.augment_policy, gen, amp=cfg.amp,
                               channels_last=cfg.channels_last, scaler=scaler)["img_s"]

    def run_eval() -> float:
        return evaluate(step_model, BatchLoader(data, "val", 256, device, shuffle=False), data,
                        channels_last=cfg.channels_last)["img_s"]

    run()
    return run, run_eval


def pil_loader(cfg: TrainConfig, root: Path, paths: list[str], device: torch.device,
               workers: int) -> torch.utils.data.DataLoader:
    """ImageFolder-style loading: PIL decode + per-image transforms in DataLoader workers, with
    the per-image form of the same augmentation policy."""
    tf = T.Compose([T.Resize(cfg.image_size), T.CenterCrop(cfg.image_size), T.ToTensor(),
                    per_image_transform(cfg.augment_policy, cfg.image_size), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

    class Files(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(paths)

        def __getitem__(self, i: int):
            with open_image(root / paths[i]) as im:  # the pixel limit every decode path has
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


def pil_baseline_bench(cfg: TrainConfig, root: Path, paths: list[str], device: torch.device,
                       workers: int) -> Callable[[], float]:
    """A round = one training epoch fed by the PIL DataLoader (fresh workers, as each epoch of a
    trial has; their start-up batch not counted); returns img/s."""
    loader = pil_loader(cfg, root, paths, device, workers)
    _, _, train_step = _model_and_opt(cfg, device)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        train_step(x.contiguous(memory_format=torch.channels_last) if cfg.channels_last else x, y)

    return lambda: _timed_epoch(loader, device, step)


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
            cmd += ["--gpus-per-trial", str(gpus)] if gpus else []
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"bench study failed: {proc.stderr[-1500:]}")
            study = json.loads((Path(storage) / "bench" / "study.json").read_text())
        rows.append({"gpus_per_trial": gpus, "trials": study["trials"], "max_parallel_trials": study["max_parallel_trials"],
                     "search_seconds": round(study["search_seconds"], 1),
                     "trials_per_hour": round(study["trials"] * 3600 / study["search_seconds"], 1),
                     "slot_utilisation": round(study["slot_utilisation"], 3), "slot_seconds": study["slot_seconds"],
                     "checkpoint_bytes_written": study["footprint"]["checkpoint_bytes_written"],
                     "checkpoint_bytes_peak": study["footprint"]["checkpoint_bytes_peak"],
                     "study_folder_bytes": study["footprint"]["bytes_left"]})
    return rows


def replicate_dataset(source: str | Path, count: int, root: Path | None = None) -> Path:
    """A Positive/ Negative/ folder of `count` JPEGs made from `source` for timing at full scale
    (the 40,000-image study) where only a sample is at hand: the originals, then the seven other
    flips/rotations of each image re-encoded (quality 95), so no two files share bytes and each is
    decoded on its own. They are near-duplicates of each other, so accuracies measured on it
    mean nothing. Built next to `root` and renamed into place; an existing matching one is reused."""
    src = Path(source)
    samples, _ = discover(src)
    if count > 8 * len(samples):
        raise DataError(f"cannot replicate {len(samples)} images to {count}: at most 8 variants each "
                        f"({8 * len(samples)}); lower --replicate or use a larger source")
    meta = {"source": str(src.resolve()), "source_files": len(samples), "source_bytes": int(samples["bytes"].sum()),
            "count": count, "variants": "original, then 7 flips/rotations re-encoded as JPEG q95"}
    ops = [None, *Image.Transpose]  # the original, then PIL's 7 flips/rotations
    # classes interleaved, so a partial last round of variants keeps the class balance
    rows = samples.assign(rank=samples.groupby("label").cumcount()).sort_values(["rank", "label"]).to_dict("records")

    def build(tmp: Path) -> None:
        def write(k: int) -> None:
            row, variant = rows[k % len(rows)], k // len(rows)
            name = Path(row["path"])
            dest = tmp / CLASSES[row["label"]] / f"{name.stem}-v{variant}{name.suffix if variant == 0 else '.jpg'}"
            if variant == 0:
                shutil.copyfile(src / row["path"], dest)
            else:
                with open_image(src / row["path"]) as im:
                    im.convert("RGB").transpose(ops[variant]).save(dest, quality=95)

        for name in CLASSES:
            (tmp / name).mkdir()
        with ThreadPoolExecutor(max_workers=io_workers()) as pool:
            list(pool.map(write, range(count)))

    return build_folder(root or cache_dir() / f"replicated-{src.resolve().name}-{count}", "REPLICATED.json", meta,
                        "replica", build)


def inference_bench(image_size: int, batch_sizes: list[int], rounds: int, min_seconds: float,
                    threads: int) -> list[dict[str, Any]]:
    """img/s of one random-init model served by PyTorch and by onnxruntime on the CPU, per batch
    size: uint8 batch in, prob_crack out (what predict asks of either), decoding not included.
    Both runtimes get `threads` threads. Each figure is the best of `rounds` interleaved rounds
    of at least `min_seconds`."""
    torch.set_num_threads(threads)
    net, _ = build_model(0, "random")
    meta = {"image_size": image_size, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "classes": list(CLASSES),
            "temperature": 1.0, "config": {}}
    runtimes: dict[str, Classifier] = {"pytorch": TorchClassifier(net, meta, torch.device("cpu"))}
    runtimes["onnxruntime"] = OnnxClassifier(to_onnx(runtimes["pytorch"].field, image_size,
                                                     onnx_metadata(meta, "none (random init)", "random init")),
                                             threads=threads)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for b in batch_sizes:
        x = torch.randint(0, 256, (b, 3, image_size, image_size), dtype=torch.uint8, generator=gen)

        def timed(clf: Classifier) -> float:
            calls, start = 0, time.perf_counter()
            while calls < 2 or time.perf_counter() - start < min_seconds:
                clf.prob_crack(x)
                calls += 1
            return calls * b / (time.perf_counter() - start)

        for clf in runtimes.values():  # warm-up: first-call allocations, oneDNN/ORT kernel selection
            clf.prob_crack(x)
        img_s = interleaved_rounds({name: (lambda clf=clf: timed(clf)) for name, clf in runtimes.items()}, rounds)
        best = {name: max(v) for name, v in img_s.items()}
        rows.append({"batch_size": b, "pytorch_img_s": round(best["pytorch"], 1),
                     "onnxruntime_img_s": round(best["onnxruntime"], 1),
                     "onnxruntime_over_pytorch": round(best["onnxruntime"] / best["pytorch"], 2),
                     "round_img_s": rounded(img_s)})
    return rows


def interleaved_rounds(benches: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Each bench's figure in every round, the benches interleaved within a round: on a shared
    machine the slower rounds measure the neighbours (timeit's rule, so callers keep the best),
    and interleaving exposes every bench to the same conditions."""
    figures: dict[str, list[float]] = {name: [] for name in benches}
    for _ in range(rounds):
        for name, run in benches.items():
            figures[name].append(run())
    return figures


def rounded(figures: dict[str, list[float]]) -> dict[str, list[float]]:
    return {k: [round(v, 1) for v in vs] for k, vs in figures.items()}


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m crackcore.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=os.environ.get("CRACK_DATA"), help="Positive/ Negative/ folder (default synthetic)")
    p.add_argument("--image-size", type=int, help="default 64 on CPU, 227 on GPU")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--subset", type=int, help="images per class (default all)")
    p.add_argument("--augment-policy", default="flip_rotate")
    p.add_argument("--device", default="auto")
    p.add_argument("--steps", type=int, default=30, help="model-only timed steps per round")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of model-only, pipeline and PIL "
                   "baseline; each figure is its best round")
    p.add_argument("--workers", type=int, default=None, help="PIL baseline DataLoader workers (default: CPUs)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (all measurements)")
    p.add_argument("--no-amp", action="store_true")
    p.add_argument("--study", action="store_true", help="also measure trials/hour of a small study")
    p.add_argument("--packing", default="", help="GPUs per trial to compare, e.g. 1,0.5,0.25 (GPU only)")
    p.add_argument("--study-subset", type=int, default=300, help="images per class in the --study runs")
    p.add_argument("--replicate", type=int, metavar="N",
                   help="bench on --data replicated to N images by flips/rotations (e.g. the sample to the "
                        "full set's 40000; timing only), and print its folder for tune/run.py --data")
    p.add_argument("--inference", action="store_true", help="only serving speed: PyTorch vs onnxruntime img/s "
                   "on the CPU at --inference-batch sizes (no data needed)")
    p.add_argument("--inference-batch", default="1,64", help="batch sizes of --inference")
    p.add_argument("--threads", type=int, help="CPU threads of each runtime in --inference (default: CPUs this "
                   "process may use; on a busy machine 1 thread is the fairer comparison)")
    p.add_argument("--quick", action="store_true", help="tiny sizes for CI; measures nothing meaningful")
    p.add_argument("--json-out", type=Path)
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    if a.inference:
        return main_inference(a)
    if a.replicate is not None:
        if a.replicate < 1:
            p.error(f"--replicate {a.replicate}: give the number of images to make, e.g. 40000")
        if not a.data:
            p.error("--replicate needs --data (the folder to replicate)")
        t0 = time.perf_counter()
        a.data = str(replicate_dataset(a.data, a.replicate))
        print(f"replicated to {a.replicate} images in {time.perf_counter() - t0:.0f}s: {a.data} "
              "(near-duplicates of each other: for timing, not accuracy)", file=sys.stderr)
    out = training_bench(a)
    if a.study:
        packing = [float(x) for x in a.packing.split(",") if x] if resolve_device(a.device).type == "cuda" else [0.0]
        out["study"] = bench_study(a.data, packing or [0.0], a.quick, cpus_per_trial=1, subset=a.study_subset,
                                   image_size=out["image_size"])
    return print_result(out, a.json_out)


def training_bench(a: argparse.Namespace) -> dict[str, Any]:
    """Training img/s of the model alone, our data pipeline and a PIL ImageFolder baseline
    (interleaved rounds, best of each), the loaders alone, eval img/s and peak memory."""
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

    train_paths = data.samples.loc[data.samples["split"] == "train", "path"].tolist()
    workers = a.workers if a.workers is not None else (0 if a.quick else available_cpus())
    rounds = 1 if a.quick else a.rounds
    benches = {"model_only": model_only_bench(cfg, device, steps, warmup=1 if a.quick else 5)}
    benches["pipeline"], run_eval = pipeline_bench(cfg, data, device, rounds)
    benches["pil_baseline"] = pil_baseline_bench(cfg, Path(data.source["root"]), train_paths, device, workers)
    round_img_s = interleaved_rounds(benches, rounds)
    model_only, pipeline, pil = (max(round_img_s[k]) for k in ("model_only", "pipeline", "pil_baseline"))
    eval_img_s = run_eval()
    loader_only, pil_loader_only = bench_loaders_only(cfg, data, Path(data.source["root"]), train_paths, device, workers)
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({available_cpus()} threads)",
        "image_size": size, "batch_size": cfg.batch_size, "augment_policy": a.augment_policy, "train_images": n_train,
        "data_kind": data.source["kind"] + (f" replicated to {a.replicate}" if a.replicate else ""),
        "train_precision": precision_name(training_precision(device, cfg.amp)[0]), "channels_last": cfg.channels_last,
        "compile": a.compile, "prepare_seconds": round(prepare_s, 2),
        "model_only_img_s": round(model_only, 1), "pipeline_img_s": round(pipeline, 1),
        "pipeline_over_model_only": round(pipeline / model_only, 3),
        "pil_baseline_img_s": round(pil, 1), "pil_workers": workers,
        "speedup_over_pil_baseline": round(pipeline / pil, 2),
        "loader_only_img_s": round(loader_only, 1), "pil_loader_only_img_s": round(pil_loader_only, 1),
        "loader_speedup_over_pil": round(loader_only / pil_loader_only, 1), "eval_img_s": round(eval_img_s, 1),
        "peak_memory_mb": round(peak_memory_mb(device), 1), "rounds": rounds,
        "round_img_s": rounded(round_img_s), "quick": a.quick,
    }


def print_result(out: dict[str, Any], json_out: Path | None) -> int:
    width = max(len(k) for k in out)
    for k, v in out.items():
        print(f"{k:<{width}}  {v}")
    line = json.dumps(out)
    print(line)
    if json_out:
        write_text(line + "\n", json_out)
    return 0


def main_inference(a: argparse.Namespace) -> int:
    try:
        batches = [int(b) for b in a.inference_batch.split(",")]
    except ValueError:
        batches = []
    if not batches or min(batches) < 1:
        raise ConfigError(f"--inference-batch {a.inference_batch!r}: give batch sizes >= 1, e.g. 1,64")
    size = a.image_size or (32 if a.quick else 64)
    if a.quick:
        batches = [min(b, 4) for b in batches]
    if a.threads is not None and a.threads < 1:
        raise ConfigError(f"--threads {a.threads}: give at least 1")
    threads = a.threads or available_cpus()
    rows = inference_bench(size, batches, rounds=1 if a.quick else a.rounds, min_seconds=0.0 if a.quick else 3.0,
                           threads=threads)
    out = {"device": f"cpu ({threads} threads of {available_cpus()})", "image_size": size, "weights": "random init",
           "precision": "float32", "inference": rows, "quick": a.quick}
    for r in rows:
        print(f"batch {r['batch_size']:>4}: PyTorch {r['pytorch_img_s']:>8.1f} img/s  onnxruntime "
              f"{r['onnxruntime_img_s']:>8.1f} img/s  ({r['onnxruntime_over_pytorch']:.2f}x)")
    return print_result(out, a.json_out)


if __name__ == "__main__":
    from crackcore.cli import run_main

    sys.exit(run_main(main))
