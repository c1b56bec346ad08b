"""Error analysis and the atomic writers every output file goes through.

A reader never sees a half-written file: each writer writes a temp file in the same folder
and renames it over the target (atomic on POSIX)."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import torch

PREDICTION_COLUMNS = ["sample", "path", "true_label", "pred_label", "prob_crack"]


def errors_from_predictions(predictions: pd.DataFrame) -> pd.DataFrame:
    """The misclassified rows of evaluate()'s predictions, most confident mistakes first."""
    wrong = predictions[predictions["true_label"] != predictions["pred_label"]]
    # |logit| ranks mistakes whose float32 probability saturated at 0 or 1
    confidence = (wrong["logit_crack"] if "logit_crack" in wrong else wrong["prob_crack"] - 0.5).abs()
    return wrong.assign(_c=confidence).sort_values(["_c", "sample"], ascending=[False, True]).drop(columns="_c")[
        PREDICTION_COLUMNS].reset_index(drop=True)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# mkstemp/mkdtemp create 0600/0700 for privacy while being written; the renamed result gets
# the permissions an ordinary open()/mkdir() would have given it
_UMASK = _umask()
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


def write_parquet(df: pd.DataFrame, path: str | Path) -> Path:
    return _atomic(path, lambda tmp: df.to_parquet(tmp, index=False))


def write_json(obj: Any, path: str | Path) -> Path:
    return _atomic(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n"))


def write_text(text: str, path: str | Path) -> Path:
    return _atomic(path, lambda tmp: tmp.write_text(text))


def write_bytes(data: bytes, path: str | Path) -> Path:
    return _atomic(path, lambda tmp: tmp.write_bytes(data))


def save_torch(obj: Any, path: str | Path) -> Path:
    return _atomic(path, lambda tmp: torch.save(obj, tmp))
