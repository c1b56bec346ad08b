"""Every file a run writes, and the atomic writers they all go through: a reader never sees a
half-written file, as each writer writes a temp file in the same folder and renames it over
the target (atomic on POSIX). `write_run_outputs` writes a finished run's files, the same for
`python -m crackcore.fit` and the study's final retrain; `model.pt` is read by crackcore.predict."""
from __future__ import annotations

import json
import os
import platform
import fcntl
import shutil
import tempfile
import time
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, Callable, Iterator

import pandas as pd
import torch

from crackcore.calibration import apply_temperature, fit_temperature
from crackcore.exceptions import ConfigError, StorageError, storage_error
from crackcore.faults import kill_point
from crackcore.images import CLASSES, IMAGENET_MEAN, IMAGENET_STD
from crackcore.metrics import binary_metrics, expected_calibration_error, format_accuracy, reliability_table
from crackcore.studyfiles import ERRORS, FINAL_HISTORY, FINAL_METRICS, MODEL, PREDICTIONS, RUN_CONFIG, SPLIT

MODEL_FORMAT = "crackcore-model"

PREDICTION_COLUMNS = ["sample", "path", "true_label", "pred_label", "prob_crack", "source"]
SET_METRICS = ("n", "accuracy", "ci95_low", "ci95_high", "precision", "recall", "f1", "roc_auc", "ece")


def set_metrics(m: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """The figures final_metrics.json gives each evaluated set (a source, an --eval folder)."""
    return {**{k: m[k] for k in SET_METRICS}, "false_positive_rate": m["fp"] / max(1, m["fp"] + m["tn"]), **extra}


def per_source_metrics(result: Any, cfg: Any) -> dict[str, Any]:
    """Each source side by side: the test split of every source trained on (when there are
    several) and every held-out source, all of whose images were scored."""
    rows = {}
    test_preds = result.test["predictions"]
    if test_preds["source"].nunique() > 1:
        for name, g in test_preds.groupby("source"):
            rows[name] = set_metrics(binary_metrics(g["true_label"], g["pred_label"], g["prob_crack"]), role="test split")
    for name, m in result.held_out.items():
        rows[name] = set_metrics(m, role=f"held out, {'selection' if name == cfg.val_source else 'final evaluation'} only",
                                 **adapted_block(result, name))
    return rows


def adapted_block(result: Any, name: str) -> dict[str, Any]:
    """{"adapted": figures} of a set the model was also scored on adapted to it (TrainConfig.adapt_to;
    the set's own figures beside it are zero-shot), else {}."""
    adapted = getattr(result, "adapted", {})
    if name not in adapted:
        return {}
    record = getattr(result, "adaptation", {}).get(name, {})
    prior = record.get("prior", {})
    return {"adapted": set_metrics(adapted[name], method=record.get("method"), adapted_on_n=record.get("n"),
                                   prior_applied=prior.get("applied"), prior_ran_away=prior.get("ran_away"),
                                   site_prior=prior.get("site_prior"),
                                   train_prior=prior.get("train_prior"), gain=record.get("gain"),
                                   seconds=record.get("seconds"))}


def errors_from_predictions(predictions: pd.DataFrame) -> pd.DataFrame:
    """The misclassified rows of evaluate()'s predictions, most confident mistakes first."""
    wrong = predictions[predictions["true_label"] != predictions["pred_label"]]
    # |logit| ranks mistakes whose float32 probability saturated at 0 or 1
    confidence = (wrong["logit_crack"] if "logit_crack" in wrong else wrong["prob_crack"] - 0.5).abs()
    return wrong.assign(_c=confidence).sort_values(["_c", "sample"], ascending=[False, True]).drop(columns="_c")[
        [c for c in PREDICTION_COLUMNS if c in wrong]].reset_index(drop=True)


# mkstemp/mkdtemp create 0600/0700 for privacy while being written; the renamed result gets
# the permissions an ordinary open()/mkdir() would have given it (the umask is read by setting it)
_UMASK = os.umask(0o022)
os.umask(_UMASK)
FILE_MODE, DIR_MODE = 0o666 & ~_UMASK, 0o777 & ~_UMASK


def _atomic(path: str | Path, write: Callable[[Path], None]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def check_writable(folder: str | Path, what: str, fix: str = "") -> None:
    """Fail before any work, in one line, when `folder` (or the nearest existing folder above it,
    where it would be made) cannot be written: a read-only or foreign-owned folder, a full disk."""
    folder = Path(folder).expanduser().absolute()
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        raise StorageError(f"{what}: {existing} is a file, not a folder; pass a folder")
    try:
        fd, tmp = tempfile.mkstemp(dir=existing, prefix=".write-check.")
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        raise (storage_error(exc, what, fix, existing / "x") or exc) from None


def build_folder(root: str | Path, marker: str, meta: dict[str, Any], what: str,
                 build: Callable[[Path], None]) -> Path:
    """A generated folder, whole or not at all: `build(tmp)` fills a temp folder next to `root`,
    `marker` (JSON of `meta`) is written last and the folder renamed into place. An existing
    folder whose marker matches `meta` is reused as is; any other one is an error."""
    root = Path(root)

    def complete() -> bool:
        return (root / marker).is_file() and json.loads((root / marker).read_text()) == meta

    if complete():
        return root
    if root.exists():
        raise FileExistsError(f"{root} exists but is not this {what}; remove it or choose another folder")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}."))
    try:
        build(tmp)
        (tmp / marker).write_text(json.dumps(meta, indent=2))
        tmp.chmod(DIR_MODE)
        os.replace(tmp, root)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if complete():  # another process finished the same folder first
            return root
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


def write_folder(out: Path, fill: Callable[[Path], None]) -> Path:
    """A run folder whole or not at all: `fill(tmp)` writes a temp folder next to `out`, which then
    takes its place; an earlier run there is removed only once the new one is complete, so a
    failure never leaves two runs mixed."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp, old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.")), out.with_name(f".{out.name}.old")
    try:
        fill(tmp)
        tmp.chmod(DIR_MODE)
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not out.exists():
            os.replace(old, out)
        raise
    if old.is_dir():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink(missing_ok=True)
    return out


LOCK_NAME = ".crackcore.lock"  # inside a claimed --out while its run is on; not "an earlier run"


def folder_in_use(out: Path) -> bool:
    """Whether `out` holds anything but a claim's lock file (an earlier run, other files)."""
    return out.is_dir() and any(p.name != LOCK_NAME for p in out.iterdir())


def check_replaceable(out: Path, record: str, ours: Callable[[Any], bool], command: str, hint: str = "") -> None:
    """--out of a command that replaces its folder whole: it may be new, empty (but for a claim's
    lock file) or an earlier run of `command`, known by its `record` JSON (`ours(parsed)`);
    anything else would be lost, so it is refused before any work."""
    if not out.exists() or (out.is_dir() and not folder_in_use(out)):
        return
    try:
        mine = out.is_dir() and ours(json.loads((out / record).read_text()))
    except (OSError, ValueError):
        mine = False
    if not mine:
        raise ConfigError(f"--out {out} exists and was not written by {command} (no {record} of ours in it); pass a "
                          f"new folder{hint}")


@contextmanager
def claim_folder(out: Path, flag: str = "--out") -> Iterator[None]:
    """`out` claimed for one run, atomically: the folder is made (if new) and a lock file in it
    is flock()ed, so of two runs started at once to one folder only one goes on; the other gets a
    ConfigError naming the holder. The kernel drops the lock when its process dies, so a killed
    run leaves no stale claim. On leaving, the lock file and a folder made here and left empty
    are removed (a run that wrote --out replaced the folder, lock file and all)."""
    out = Path(out)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    lock = out / LOCK_NAME
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise ConfigError(f"{flag} {out} is being written by another run ({holder}); wait for it to finish, or "
                              f"pass another {flag}") from None
        with suppress(FileNotFoundError):  # removed by the run that held it just before we locked it
            if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {platform.node()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode())
    try:
        yield
    finally:
        with suppress(FileNotFoundError):
            if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                os.unlink(lock)
        os.close(fd)
        if created:
            with suppress(OSError):
                out.rmdir()  # only if empty: a run that failed before writing leaves no folder


def write_parquet(df: pd.DataFrame, path: str | Path) -> Path:
    return _atomic(path, lambda tmp: df.to_parquet(tmp, index=False))


def write_json(obj: Any, path: str | Path) -> Path:
    return _atomic(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n"))


def write_text(text: str, path: str | Path) -> Path:
    return _atomic(path, lambda tmp: tmp.write_text(text))


def write_bytes(data: bytes, path: str | Path) -> Path:
    return _atomic(path, lambda tmp: tmp.write_bytes(data))


def _torch_save(obj: Any, tmp: Path) -> None:
    # through a Python file: torch's own file writer turns a full disk into a RuntimeError
    # ("PytorchStreamWriter failed writing file", "unexpected pos") with no errno; a Python file's
    # write raises the OSError, which torch keeps as the context of its RuntimeError
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
    except RuntimeError as exc:
        cause = exc.__context__
        if isinstance(cause, OSError) and cause.errno is not None:
            raise OSError(cause.errno, cause.strerror, str(tmp)) from None
        raise


def save_torch(obj: Any, path: str | Path) -> Path:
    """torch.save, atomically; a full disk is an OSError (ENOSPC) naming the file, which
    storage_error turns into one line."""
    return _atomic(path, lambda tmp: _torch_save(obj, tmp))


def versions() -> dict[str, str]:
    import numpy, pandas, pyarrow, torchvision

    return {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "numpy": numpy.__version__, "pandas": pandas.__version__, "pyarrow": pyarrow.__version__}


def model_payload(result: Any, cfg: Any) -> dict[str, Any]:
    """What `model.pt` holds for a train.FitResult and its TrainConfig; loadable with torch.load(weights_only=True). The state_dict
    has torchvision resnet18 names, so `resnet18(num_classes=2).load_state_dict` works too."""
    return {"format": MODEL_FORMAT, "version": 1,
            "state_dict": {k: v.detach().cpu() for k, v in result.model.state_dict().items()},
            "arch": "resnet18", "classes": list(CLASSES), "image_size": cfg.image_size,
            "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "config": cfg.to_dict(),
            "weights": result.weights.to_dict(),
            "test_metrics": {k: v for k, v in (result.test or {}).items() if k != "predictions"}}


def loso_table(results: dict[str, Any]) -> pd.DataFrame:
    """loso.parquet: one row per held-out source, from train.FitResults of config.leave_one_out."""
    def adapted_columns(r: Any, name: str) -> dict[str, Any]:  # flat: the paired gain as three numbers
        block = dict(adapted_block(r, name).get("adapted", {}))
        gain = block.pop("gain", None) or {}
        return {**{f"adapted_{k}": v for k, v in block.items()},
                **{column: gain[k] for column, k in (("adapted_gain", "difference"), ("adapted_gain_ci95_low", "ci95_low"),
                                                     ("adapted_gain_ci95_high", "ci95_high")) if k in gain}}

    return pd.DataFrame([{"held_out_source": name, **set_metrics(r.held_out[name]), **adapted_columns(r, name)}
                         for name, r in results.items()])


def write_run_outputs(out: Path, result: Any, data: Any, cfg: Any,
                      extra_metrics: dict[str, Any] | None = None) -> dict[str, Any]:
    """final_history.parquet, final_metrics.json, errors.parquet, predictions.parquet,
    split.parquet, model.pt, config.json of a train.FitResult on data.PreparedData - each
    written atomically. Returns final metrics."""
    assert result.test is not None, "write_run_outputs needs a fit(..., evaluate_test=True) result"
    test = result.test
    predictions = pd.concat([test["predictions"], *(m["predictions"] for m in result.held_out.values()),
                             *(m["predictions"] for m in result.external.values())], ignore_index=True)
    # temperature fitted on val, judged on test: the predicted class is unchanged, only confidence
    # of the model saved: its zero-shot val predictions, when selection scored val adapted
    val_preds = (getattr(result, "val_zero_shot", None) or result.val)["predictions"]
    temperature = fit_temperature(val_preds["true_label"], val_preds["logit_crack"])
    test_preds = test["predictions"]
    calibrated = apply_temperature(test_preds["logit_crack"], temperature)
    metrics = {
        "test_accuracy": test["accuracy"], "n_test": test["n"], "errors": test["errors"],
        "ci95_low": test["ci95_low"], "ci95_high": test["ci95_high"], "precision": test["precision"],
        "recall": test["recall"], "f1": test["f1"], "roc_auc": test["roc_auc"], "ece": test["ece"],
        "test_loss": test["loss"], "confusion": {"tp": test["tp"], "fp": test["fp"], "fn": test["fn"], "tn": test["tn"]},
        "val_accuracy": result.val["accuracy"], "n_val": result.val["n"], "val_loss": result.val["loss"],
        **({"val_adapted_to": cfg.adapt_to} if getattr(result, "val_zero_shot", None) else {}),
        "reliability": reliability_table(test_preds["true_label"], test_preds["prob_crack"]).to_dict("records"),
        "temperature": temperature, "ece_calibrated": expected_calibration_error(test_preds["true_label"], calibrated),
        "reliability_calibrated": reliability_table(test_preds["true_label"], calibrated).to_dict("records"),
        "selection": cfg.selection(), "per_source": per_source_metrics(result, cfg),
        "external": {name: set_metrics(m, **adapted_block(result, name)) for name, m in result.external.items()},
        "split_strategy": cfg.split_strategy, "data_kind": data.source.get("kind"),
        "weights": result.weights.to_dict(), "device": result.device, "train_precision": result.precision,
        "train_seconds": result.seconds, **({"shift": result.shift} if getattr(result, "shift", None) else {}),
        "epochs": len(result.history), "image_size": cfg.image_size, **(extra_metrics or {}),
    }
    write_parquet(result.history, out / FINAL_HISTORY)
    write_parquet(predictions, out / PREDICTIONS)
    write_parquet(errors_from_predictions(predictions), out / ERRORS)
    write_parquet(data.split_table(), out / SPLIT)
    save_torch({**model_payload(result, cfg), "temperature": temperature}, out / MODEL)
    kill_point("outputs")
    write_json(cfg.to_dict(), out / RUN_CONFIG)
    write_json(metrics, out / FINAL_METRICS)
    return metrics


def adapted_how(m: dict[str, Any]) -> str:
    if m.get("prior_ran_away") and m.get("prior_applied") is False:
        return f"{m.get('method')}, EM prior ran away ({m.get('site_prior', float('nan')):.3f}): not applied"
    return f"{m.get('method')}{'' if m.get('prior_applied', True) else ', no prior'}"


def summary_lines(metrics: dict[str, Any], out: Path) -> list[str]:
    sets = [(f"{name}, {m['role']}", m) for name, m in metrics.get("per_source", {}).items()]
    shift = metrics.get("shift")
    shift_lines = [] if not shift else [
        f"shift suite (n={shift['n_per_cell']} of {shift['of_n']} test images per cell): clean "
        f"{100 * shift['clean']['accuracy']:.2f} %, mean over {len(shift['cells'])} shift x severity cells "
        f"{100 * shift['mean_accuracy']:.2f} %, worst " + ", ".join(
            f"{c['shift']}@{c['severity']} {100 * c['accuracy']:.1f} %"
            for c in sorted(shift["cells"], key=lambda c: c["accuracy"])[:3]) + f" ({shift['seconds']:.0f}s)"]
    sets += [(f"external {name}", m) for name, m in metrics.get("external", {}).items()]
    sets = [s for label, m in sets for s in ((label, m), *(((f"{label}, adapted ({adapted_how(m['adapted'])})",
                                                             m["adapted"]),) if "adapted" in m else ()))]
    return [f"test accuracy {format_accuracy(metrics['test_accuracy'], metrics['n_test'], metrics['ci95_low'], metrics['ci95_high'])}",
            f"precision {metrics['precision']:.4f}  recall {metrics['recall']:.4f}  F1 {metrics['f1']:.4f}  "
            f"ROC-AUC {metrics['roc_auc']:.4f}  ECE {metrics['ece']:.4f} (temperature {metrics['temperature']:.2f} "
            f"fitted on val: ECE {metrics['ece_calibrated']:.4f})",
            *(f"{label}: accuracy {format_accuracy(m['accuracy'], m['n'], m['ci95_low'], m['ci95_high'])}  recall "
              f"{m['recall']:.3f}  false alarms {m['false_positive_rate']:.3f}  F1 {m['f1']:.3f}" for label, m in sets),
            *shift_lines,
            f"misclassified test images: {metrics['errors']} -> {out / 'errors.parquet'}"
            + (" (with those of the sets above)" if sets else ""),
            f"outputs: {out}/ (model.pt, final_metrics.json, final_history.parquet, predictions.parquet, split.parquet)"]
