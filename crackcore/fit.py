"""`python -m crackcore.fit`: one training run (the seed notebook's baseline), and the writer
of a finished run's files - the same files the study's final retrain writes."""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from crackcore.config import AUGMENT_POLICIES, SPLIT_STRATEGIES, TrainConfig, config_json
from crackcore.data import CLASSES, IMAGENET_MEAN, IMAGENET_STD, PreparedData, prepare_data
from crackcore.errors import errors_from_predictions, save_torch, write_json, write_parquet
from crackcore.calibration import apply_temperature, fit_temperature
from crackcore.metrics import expected_calibration_error, format_accuracy, reliability_table
from crackcore.train import FitResult, fit

MODEL_FORMAT = "crackcore-model"


def versions() -> dict[str, str]:
    import numpy, pandas, pyarrow, torchvision

    return {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "numpy": numpy.__version__, "pandas": pandas.__version__, "pyarrow": pyarrow.__version__}


def model_payload(result: FitResult, cfg: TrainConfig) -> dict[str, Any]:
    """What `model.pt` holds; loadable with torch.load(weights_only=True). The state_dict
    has torchvision resnet18 names, so `resnet18(num_classes=2).load_state_dict` works too."""
    return {"format": MODEL_FORMAT, "version": 1,
            "state_dict": {k: v.detach().cpu() for k, v in result.model.state_dict().items()},
            "arch": "resnet18", "classes": list(CLASSES), "image_size": cfg.image_size,
            "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "config": cfg.to_dict(),
            "weights": result.weights.to_dict(),
            "test_metrics": {k: v for k, v in (result.test or {}).items() if k != "predictions"}}


def write_run_outputs(out: Path, result: FitResult, data: PreparedData, cfg: TrainConfig,
                      extra_metrics: dict[str, Any] | None = None) -> dict[str, Any]:
    """final_history.parquet, final_metrics.json, errors.parquet, predictions.parquet,
    split.parquet, model.pt, config.json - each written atomically. Returns final metrics."""
    assert result.test is not None, "write_run_outputs needs a fit(..., evaluate_test=True) result"
    test = result.test
    predictions = test["predictions"]
    errors = errors_from_predictions(predictions)
    # temperature fitted on val, judged on test: the predicted class is unchanged, only confidence
    val_preds = result.val["predictions"]
    temperature = fit_temperature(val_preds["true_label"], val_preds["logit_crack"])
    calibrated = apply_temperature(predictions["logit_crack"], temperature)
    metrics = {
        "test_accuracy": test["accuracy"], "n_test": test["n"], "errors": len(errors),
        "ci95_low": test["ci95_low"], "ci95_high": test["ci95_high"], "precision": test["precision"],
        "recall": test["recall"], "f1": test["f1"], "roc_auc": test["roc_auc"], "ece": test["ece"],
        "test_loss": test["loss"], "confusion": {"tp": test["tp"], "fp": test["fp"], "fn": test["fn"], "tn": test["tn"]},
        "val_accuracy": result.val["accuracy"], "n_val": result.val["n"], "val_loss": result.val["loss"],
        "reliability": reliability_table(predictions["true_label"], predictions["prob_crack"]).to_dict("records"),
        "temperature": temperature,
        "ece_calibrated": expected_calibration_error(predictions["true_label"], calibrated),
        "reliability_calibrated": reliability_table(predictions["true_label"], calibrated).to_dict("records"),
        "split_strategy": cfg.split_strategy, "data_kind": data.source.get("kind"),
        "weights": result.weights.to_dict(), "device": result.device, "train_precision": result.precision,
        "train_seconds": result.seconds,
        "epochs": len(result.history), "image_size": cfg.image_size,
    }
    metrics.update(extra_metrics or {})
    out.mkdir(parents=True, exist_ok=True)
    write_parquet(result.history, out / "final_history.parquet")
    write_parquet(predictions, out / "predictions.parquet")
    write_parquet(errors, out / "errors.parquet")
    write_parquet(data.split_table(), out / "split.parquet")
    save_torch({**model_payload(result, cfg), "temperature": temperature}, out / "model.pt")
    write_json(cfg.to_dict(), out / "config.json")
    write_json(metrics, out / "final_metrics.json")
    return metrics


def summary_lines(metrics: dict[str, Any], out: Path) -> list[str]:
    return [f"test accuracy {format_accuracy(metrics['test_accuracy'], metrics['n_test'], metrics['ci95_low'], metrics['ci95_high'])}",
            f"precision {metrics['precision']:.4f}  recall {metrics['recall']:.4f}  F1 {metrics['f1']:.4f}  "
            f"ROC-AUC {metrics['roc_auc']:.4f}  ECE {metrics['ece']:.4f} (temperature {metrics['temperature']:.2f} "
            f"fitted on val: ECE {metrics['ece_calibrated']:.4f})",
            f"misclassified test images: {metrics['errors']} -> {out / 'errors.parquet'}",
            f"outputs: {out}/ (model.pt, final_metrics.json, final_history.parquet, predictions.parquet, split.parquet)"]


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = argparse.ArgumentParser(prog="python -m crackcore.fit", description="Train one ResNet-18 crack classifier "
                                "(the baseline) and write its metrics, errors and model.")
    p.add_argument("--data", default=os.environ.get("CRACK_DATA"),
                   help="folder with Positive/ and Negative/ (default $CRACK_DATA; none = synthetic set)")
    p.add_argument("--out", type=Path, default=Path("results/baseline"))
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--freeze-depth", type=int, default=d.freeze_depth, choices=range(6))
    p.add_argument("--augment-policy", default=d.augment_policy, choices=AUGMENT_POLICIES)
    p.add_argument("--image-size", type=int, default=d.image_size)
    p.add_argument("--subset", type=int, default=None, help="images per class (deterministic)")
    p.add_argument("--weights", default=d.weights, help="auto | imagenet | random | PATH to resnet18 .pth")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--split-strategy", default=d.split_strategy, choices=SPLIT_STRATEGIES)
    p.add_argument("--device", default=d.device)
    p.add_argument("--lr-schedule", default=d.lr_schedule, choices=["cosine", "constant"])
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    cfg = TrainConfig(data=a.data, epochs=a.epochs, lr=a.lr, batch_size=a.batch_size, freeze_depth=a.freeze_depth,
                      augment_policy=a.augment_policy, image_size=a.image_size, subset=a.subset, weights=a.weights,
                      seed=a.seed, split_strategy=a.split_strategy, device=a.device, lr_schedule=a.lr_schedule)
    print("config:", config_json(cfg), flush=True)
    t0 = time.time()
    data = prepare_data(cfg)
    print(f"data: {data.source['kind']} {data.source['root']} - {data.counts()}", flush=True)
    result = fit(cfg, data, evaluate_test=True)
    metrics = write_run_outputs(a.out, result, data, cfg, {"wall_seconds": time.time() - t0, "versions": versions(),
                                                            "data_source": data.source, "command": sys.argv})
    print(f"\nweights: {result.weights.describe()}  device: {result.device} ({result.precision})  wall {time.time() - t0:.0f}s")
    print("\n".join(summary_lines(metrics, a.out)))
    return 0


if __name__ == "__main__":
    from crackcore.cli import run_main

    sys.exit(run_main(main))
