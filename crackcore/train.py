"""One epoch of training, one evaluation, and `fit` that runs N epochs of both.

`fit` is what a tuning trial runs (the Ray trainable only adds reporting and checkpoints via
`on_epoch` / `resume_state`) and what the final retrain and the baseline run. No Ray here."""
from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch
from torch import nn

from crackcore import checkpoint
from crackcore.adaptation import adapt_model, inverted_text
from crackcore.config import TrainConfig
from crackcore.exceptions import DivergedError
from crackcore.devices import available_cpus, resolve_device
from crackcore.data import BatchLoader, PreparedData, as_tensor, model_inputs
from crackcore.metrics import binary_metrics, format_accuracy, paired_difference
from crackcore.model import CrackResNet, WeightsInfo, build_model, trainable_parameters
from crackcore.progress import track
from crackcore.shift import VAL_CELLS, run_suite

HISTORY_COLUMNS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "current_lr", "seconds", "train_img_s"]


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The reduced precision `device` runs natively for training, or None for float32.
    CUDA: bf16 (fp16 + GradScaler on GPUs without bf16). CPU: bf16 only with AVX512-BF16 or
    AMX, where oneDNN runs it natively: resnet18 training steps measured 1.3-1.75x faster at
    64 px and 1.8x at 227 px on a 2-core EPYC; elsewhere bf16 is emulated and slower than float32."""
    if device.type == "cuda":
        # including_emulation=False: pre-Ampere GPUs (T4, V100) "support" bf16 only by emulation
        with torch.cuda.device(device):
            return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    try:
        caps = torch.cpu.get_capabilities()
    except (AttributeError, RuntimeError):
        return None
    return torch.bfloat16 if caps.get("avx512_bf16") or caps.get("amx_bf16") else None


def training_precision(device: torch.device, amp: bool) -> tuple[torch.dtype | None, torch.amp.GradScaler]:
    """The autocast dtype training uses on `device` (None: float32) and the GradScaler that goes
    with it (enabled only for float16, on GPUs without bf16)."""
    dtype = autocast_dtype(device) if amp else None
    return dtype, torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


def precision_name(dtype: torch.dtype | None) -> str:
    return f"{str(dtype).removeprefix('torch.')} autocast" if dtype else "float32"


def training_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                  criterion: nn.Module, dtype: torch.dtype | None = None,
                  scaler: torch.amp.GradScaler | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward under autocast `dtype`, backward, optimizer step; returns (logits, loss)."""
    with torch.autocast(x.device.type, dtype=dtype) if dtype else contextlib.nullcontext():
        logits = model(x)
        loss = criterion(logits.float(), y)
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None and scaler.is_enabled():
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    return logits, loss


def train_one_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
                    loader: BatchLoader, augment_policy: str, generator: torch.Generator, *,
                    amp: bool = True, channels_last: bool = False, label_smoothing: float = 0.0,
                    scaler: torch.amp.GradScaler | None = None, progress: str | None = None) -> dict[str, float]:
    """Train for one pass over `loader`. Augmentation runs per batch on the model's device; the
    forward pass runs under `autocast_dtype(device)` when `amp` (fp16 needs `scaler`).
    `progress`: a label to show the batches' progress under (crackcore.progress), None: quiet."""
    model.train()
    device = loader.device
    dtype = autocast_dtype(device) if amp else None
    if dtype == torch.float16 and scaler is None:
        raise ValueError("float16 autocast needs a GradScaler; pass scaler=torch.amp.GradScaler('cuda')")
    criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    start = time.perf_counter()
    for x_u8, y, _ in track(loader, progress or "", len(loader), unit="batches", enabled=progress is not None,
                            done_line=False):  # the caller logs the epoch's figures
        x = model_inputs(x_u8, augment_policy, generator, channels_last)
        lr = optimizer.param_groups[0]["lr"]  # the rate this step used (the scheduler moves it on)
        logits, loss = training_step(model, optimizer, x, y, criterion, dtype, scaler)
        scheduler.step()
        loss_sum += loss.detach() * len(y)  # no host sync per step
        correct += (logits.argmax(1) == y).sum()
        seen += len(y)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    if not math.isfinite(loss_sum.item()):
        raise DivergedError("training loss is not finite: the run diverged; lower the learning rate (--lr)")
    return {"loss": loss_sum.item() / seen, "accuracy": correct.item() / seen, "images": seen,
            "seconds": seconds, "img_s": seen / seconds, "last_lr": lr}


@torch.inference_mode()
def evaluate(model: nn.Module, loader: BatchLoader, data: PreparedData, *, channels_last: bool = False) -> dict[str, Any]:
    """Loss, accuracy (Wilson CI), precision/recall/F1, ROC-AUC, ECE, and per-sample
    `predictions` (sample = position in the evaluated rows, path, true/pred label, prob_crack, source).
    Float32, as torchvision's references evaluate: reported probabilities stay exact and match
    what `crackcore.predict` computes for the same images."""
    model.eval()
    losses, probs, margins, labels, rows = [], [], [], [], []
    start = time.perf_counter()
    for x_u8, y, idx in loader:
        logits = model(model_inputs(x_u8, channels_last=channels_last)).float()
        losses.append(nn.functional.cross_entropy(logits, y, reduction="none"))
        probs.append(torch.softmax(logits, 1)[:, 1])
        margins.append(logits[:, 1] - logits[:, 0])  # exact where the probability saturates (calibration)
        labels.append(y)
        rows.append(idx)
    if loader.device.type == "cuda":
        torch.cuda.synchronize(loader.device)  # the last batch's kernels count too (eval_img_s)
    seconds = time.perf_counter() - start
    prob = torch.cat(probs).cpu().numpy().astype(np.float64)
    y_true = torch.cat(labels).cpu().numpy()
    row = torch.cat(rows).numpy()
    y_pred = (prob >= 0.5).astype(np.int64)
    predictions = pd.DataFrame({
        "sample": np.arange(len(row)),
        "path": data.samples["path"].to_numpy()[row],
        "true_label": y_true.astype(np.int64),
        "pred_label": y_pred,
        "prob_crack": prob,
        "logit_crack": torch.cat(margins).cpu().numpy().astype(np.float64),
        "source": data.samples["source"].to_numpy()[row],
    })
    per_image = torch.cat(losses).cpu().double() if losses else torch.zeros(0, dtype=torch.float64)
    return {**binary_metrics(y_true, y_pred, prob), "loss": float(per_image.sum().item() / max(1, len(row))),
            "seconds": seconds, "img_s": len(row) / seconds if seconds else float("nan"), "predictions": predictions}


def shift_score(model: nn.Module, channels_last: bool = False) -> Callable[[torch.Tensor], torch.Tensor]:
    """uint8 batch -> P(crack), exactly as evaluate() scores it (float32, eval mode)."""
    @torch.inference_mode()
    def score(x_u8: torch.Tensor) -> torch.Tensor:
        model.eval()
        return torch.softmax(model(model_inputs(x_u8, channels_last=channels_last)).float(), 1)[:, 1]

    return score


def evaluate_shifts(model: nn.Module, data: PreparedData, rows: np.ndarray, device: torch.device, *,
                    cells: list[tuple[str, int]] | None = None, max_images: int | None = None, seed: int = 0,
                    channels_last: bool = False, clean: bool = True) -> dict[str, Any]:
    """The shift suite (crackcore.shift.run_suite) on `rows` of the decoded images."""
    labels = data.samples["label"].to_numpy()[rows]
    return run_suite(shift_score(model, channels_last), as_tensor(data.images), labels, index=rows, cells=cells,
                     max_images=max_images, seed=seed, device=device, clean=clean)


def adapted_evaluation(model: nn.Module, data: PreparedData, split: str, source: str, loader: "BatchLoader",
                       cfg: TrainConfig, *, channels_last: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    """evaluate() of a copy of `model` adapted (cfg.adapt_method, then the EM prior) to the decoded
    images of `source`'s rows in `split`, the rows it scores: transductive, as test-time adaptation
    is; the labels are never read. `model` itself is untouched. Returns (evaluation, record)."""
    rows = torch.from_numpy(data.indices(split, [source]))
    labels = data.samples["label"].to_numpy()
    train_prior = float(labels[data.indices("train")].mean())  # the uncalibrated model's prior (temperature 1)
    net = copy.deepcopy(model)
    device = next(model.parameters()).device
    # adapt_model seeds torch: the run's own random streams go on as if it had not been called
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        record = adapt_model(net, as_tensor(data.images)[rows], cfg.adapt_method, train_prior=train_prior, seed=cfg.seed,
                             prior=cfg.adapt_prior)
    return evaluate(net, loader, data, channels_last=channels_last), {**record, "n": len(rows), "split": split}


def adaptation_gain(adapted: dict[str, Any], zero_shot: dict[str, Any], data: PreparedData, rows: np.ndarray,
                    seed: int = 0) -> dict[str, Any]:
    """Adapted minus zero-shot accuracy on the same images with its paired 95 % bootstrap interval,
    resampling whole photos (the `group` of each row)."""
    a, z = adapted["predictions"], zero_shot["predictions"]
    if not (a["path"].to_numpy() == z["path"].to_numpy()).all():
        raise ValueError("the adapted and the zero-shot model were scored on other images")
    return paired_difference(a["true_label"] == a["pred_label"], z["true_label"] == z["pred_label"],
                             data.samples["group"].to_numpy()[rows], seed=seed)


def gain_text(gain: dict[str, Any]) -> str:
    return (f"{100 * gain['difference']:+.2f} points, paired 95 % CI {100 * gain['ci95_low']:+.2f}.."
            f"{100 * gain['ci95_high']:+.2f}, {gain['n_groups']} photos")


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Short linear warm-up (3 % of steps), then cosine to zero over `cfg.epochs`, or constant."""
    total = max(1, cfg.epochs * steps_per_epoch)
    warm = max(1, int(0.03 * total))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if cfg.lr_schedule == "constant":
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass
class FitResult:
    model: CrackResNet
    history: pd.DataFrame
    weights: WeightsInfo
    val: dict[str, Any]  # evaluate() on val after the last epoch
    test: dict[str, Any] | None = None  # evaluate() on the test split of the sources trained on
    held_out: dict[str, dict[str, Any]] = field(default_factory=dict)  # evaluate() on each val/test source
    external: dict[str, dict[str, Any]] = field(default_factory=dict)  # evaluate() on each --eval folder
    # cfg.adapt_to set: evaluate() of the model adapted to each held-out source's and --eval set's own
    # images (crackcore.adaptation), beside the zero-shot held_out / external; with the adaptation records
    adapted: dict[str, dict[str, Any]] = field(default_factory=dict)
    adaptation: dict[str, dict[str, Any]] = field(default_factory=dict)
    val_zero_shot: dict[str, Any] | None = None  # val adapted to the val source: the saved model's own val score
    shift: dict[str, Any] | None = None  # the shift suite on the test split (crackcore.shift.run_suite)
    device: str = "cpu"
    precision: str = "float32"  # of the training forward pass; evaluation is always float32
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)  # the caller's bookkeeping (tune/: the Ray node it ran on)


EpochCallback = Callable[[dict[str, Any], Callable[[], dict[str, Any]]], None]
Weights = tuple[WeightsInfo, "dict[str, torch.Tensor] | None"]  # resolved, and loaded (None: random init)


def fit(cfg: TrainConfig, data: PreparedData, *, weights: Weights | None = None, on_epoch: EpochCallback | None = None,
        resume_state: dict[str, Any] | None = None, evaluate_test: bool = False,
        log: Callable[[str], None] | None = print, progress: bool = False) -> FitResult:
    """Train `cfg.epochs` epochs on `data`, evaluating on val after each. `weights`: the
    ImageNet weights already resolved and loaded (model.resolve_weights, load_backbone), as a
    study ships them to its trials; None: resolve cfg.weights here. `on_epoch(row, state_fn)` is
    called after every epoch with the history row and a function returning a checkpoint dict
    (model, optimizer, scheduler, RNG states, history); `resume_state` is such a dict.
    `progress`: show each epoch's batches (a bar on a terminal, periodic lines in a log)."""
    t0 = time.perf_counter()
    device = resolve_device(cfg.device)
    if device.type == "cpu":
        torch.set_num_threads(max(1, cfg.num_threads or available_cpus()))
    else:  # fixed input size: let cuDNN pick the fastest kernels once, as torchvision's references do
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    model, info = build_model(cfg.freeze_depth, cfg.weights, *(weights or (None, None)))
    model.to(device)
    channels_last = cfg.channels_last
    model = model.to(memory_format=torch.channels_last) if channels_last else model
    step_model: nn.Module = torch.compile(model) if cfg.compile else model
    dtype, scaler = training_precision(device, cfg.amp)

    # a last batch of one image fails in BatchNorm (one value per channel once layer4 is 1x1,
    # i.e. at <= 32 px) and is a noisy step anyway: drop it, keep any larger remainder
    lone_last = len(data.indices("train")) % cfg.batch_size == 1
    train_loader = BatchLoader(data, "train", cfg.batch_size, device, shuffle=True, seed=cfg.seed, drop_last=lone_last,
                               gpu_share=cfg.gpu_share)

    def loader(split: str, sources: list[str] | None) -> BatchLoader:
        return BatchLoader(data, split, max(256, cfg.batch_size), device, shuffle=False, gpu_share=cfg.gpu_share,
                           sources=sources)

    # selection is scored on the val source when one is held out; the in-domain val rows then
    # give one more per-source accuracy
    val_loader = loader("val", cfg.selection_sources())
    domain_val = loader("val", data.roles("train")) if cfg.val_source else None
    optimizer = torch.optim.SGD(trainable_parameters(model), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                                nesterov=cfg.momentum > 0)
    scheduler = make_scheduler(optimizer, cfg, len(train_loader))
    aug_gen = torch.Generator().manual_seed(cfg.seed + 1)
    history, start_epoch = ([], 1) if resume_state is None else checkpoint.restore(
        resume_state, model, optimizer, scheduler, scaler, aug_gen, info.sha256)
    adapt_val = cfg.adapt_to is not None and cfg.adapt_to == cfg.val_source
    adaptation: dict[str, dict[str, Any]] = {}

    def score_val() -> tuple[dict[str, Any], dict[str, Any] | None]:
        """(the val score selection uses, the zero-shot one when that is adapted)."""
        zero_shot = evaluate(step_model, val_loader, data, channels_last=channels_last)
        if not adapt_val:
            return zero_shot, None
        adapted, adaptation[cfg.val_source] = adapted_evaluation(model, data, "val", cfg.val_source, val_loader, cfg,
                                                                 channels_last=channels_last)
        return adapted, zero_shot

    val: dict[str, Any] = {}
    val_zero_shot: dict[str, Any] | None = None
    for epoch in range(start_epoch, cfg.epochs + 1):
        t_epoch = time.perf_counter()
        train_loader.epoch = epoch
        tr = train_one_epoch(step_model, optimizer, scheduler, train_loader, cfg.augment_policy, aug_gen,
                             amp=cfg.amp, channels_last=channels_last, label_smoothing=cfg.label_smoothing,
                             scaler=scaler, progress=f"epoch {epoch}/{cfg.epochs}" if progress else None)
        val, val_zero_shot = score_val()
        domain = None if domain_val is None else evaluate(step_model, domain_val, data, channels_last=channels_last)
        per_source = val_by_source(val, domain)
        if domain is not None:  # val_loss is the held-out source's; the in-domain one beside it (tune.curves)
            per_source["val_loss_domain"] = domain["loss"]
        if val_zero_shot is not None:  # val_* are the adapted model's (what trials are selected on)
            per_source.update(val_acc_zero_shot=val_zero_shot["accuracy"], val_loss_zero_shot=val_zero_shot["loss"])
        if cfg.val_shift:  # the clean val pass is done; the cheap shifts add one pass each
            shifted = evaluate_shifts(step_model, data, val_loader.index.numpy(), device, cells=list(VAL_CELLS),
                                      seed=cfg.seed, channels_last=channels_last, clean=False)
            per_source["val_shift_acc"] = float(np.mean([val["accuracy"], *(c["accuracy"] for c in shifted["cells"])]))
            per_source["val_shift_seconds"] = shifted["seconds"]
        row = {"epoch": epoch, "train_loss": tr["loss"], "train_acc": tr["accuracy"], "val_loss": val["loss"],
               "val_n": val["n"], "val_acc": val["accuracy"], "current_lr": tr["last_lr"],
               "seconds": time.perf_counter() - t_epoch, "train_img_s": tr["img_s"], **per_source}
        history.append(row)
        if log:
            log(f"epoch {epoch:>3}/{cfg.epochs}  train loss {tr['loss']:.4f} acc {tr['accuracy']:.4f}  "
                f"val loss {val['loss']:.4f} acc {format_accuracy(val['accuracy'], val['n'], val['ci95_low'], val['ci95_high'])}  "
                f"{tr['img_s']:.0f} img/s  {row['seconds']:.1f}s")
        if on_epoch:
            on_epoch(dict(row), lambda epoch=epoch: checkpoint.capture(model, optimizer, scheduler, scaler, aug_gen,
                                                                       history, epoch, cfg.to_dict(), info.sha256))
    if not val:  # resumed after the last epoch: evaluate the restored model
        val, val_zero_shot = score_val()
    test, held_out, external, shift, adapted = None, {}, {}, None, {}
    if evaluate_test:
        test = evaluate(step_model, loader("test", data.roles("train")), data, channels_last=channels_last)
        held_out = {**({cfg.val_source: val_zero_shot or val} if cfg.val_source else {}), **({cfg.test_source: evaluate(
            step_model, loader("test", [cfg.test_source]), data, channels_last=channels_last)} if cfg.test_source else {})}
        external = {name: evaluate(step_model, loader("external", [name]), data, channels_last=channels_last)
                    for name in cfg.external}
        if cfg.adapt_to is not None:  # every held-out source and --eval set, each adapted to its own images
            sets = {cfg.val_source: "val", cfg.test_source: "test", **{name: "external" for name in cfg.external}}
            sets.pop(None, None)  # no val or test source
            for name, split in sets.items():
                if name == cfg.val_source and adapt_val:
                    adapted[name] = val  # the last epoch's adapted val score
                    continue
                adapted[name], adaptation[name] = adapted_evaluation(model, data, split, name, loader(split, [name]),
                                                                     cfg, channels_last=channels_last)
            for name, record in adaptation.items():
                if log and (inverted := inverted_text(record)):
                    log(f"warning: {name} adapted: {inverted}; its adapted figures are not to be used (--adapt-method bn)")
            for name, split in sets.items():
                adaptation[name]["gain"] = adaptation_gain(adapted[name], {**held_out, **external}[name], data,
                                                           data.indices(split, [name]), cfg.seed)
            if log:
                log(f"adapted ({cfg.adapt_method}{' + EM prior' if cfg.adapt_prior else ''}): " + ", ".join(
                    f"{name} {format_accuracy(m['accuracy'], m['n'], m['ci95_low'], m['ci95_high'])} (zero-shot "
                    f"{100 * {**held_out, **external}[name]['accuracy']:.2f} %, gain {gain_text(adaptation[name]['gain'])})"
                    for name, m in adapted.items()))
        if cfg.shift_suite:
            shift = evaluate_shifts(step_model, data, data.indices("test", data.roles("train")), device,
                                    max_images=cfg.shift_max_images, seed=cfg.seed, channels_last=channels_last)
            if log:
                log(f"shift suite: clean {shift['clean']['accuracy']:.4f}, mean over {len(shift['cells'])} shifted "
                    f"cells {shift['mean_accuracy']:.4f} (n={shift['n_per_cell']} per cell, {shift['seconds']:.1f}s)")
    columns = [*HISTORY_COLUMNS, *sorted({k for row in history for k in row} - set(HISTORY_COLUMNS))]
    return FitResult(model=model, history=pd.DataFrame(history, columns=columns), weights=info, val=val, test=test,
                     held_out=held_out, external=external, adapted=adapted, adaptation=adaptation,
                     val_zero_shot=val_zero_shot, shift=shift, device=str(device), precision=precision_name(dtype),
                     seconds=time.perf_counter() - t0)


def val_by_source(*evaluations: dict[str, Any] | None) -> dict[str, float]:
    """val_acc_<source> for each source in val, when val holds several."""
    preds = pd.concat([e["predictions"] for e in evaluations if e])
    if preds["source"].nunique() < 2:
        return {}
    return {f"val_acc_{s}": float((g["true_label"] == g["pred_label"]).mean()) for s, g in preds.groupby("source")}
