"""The one reader of study files: `load_study(path)` returns everything a study wrote as
DataFrames and dicts, for the report, notebooks and tests.

    from crackcore.results import load_study
    s = load_study("results/study")
    s.trials.sort_values("best_val_acc", ascending=False).head()   # best trials
    s.history.pivot(index="epoch", columns="trial_id", values="val_acc")  # learning curves
    s.final_metrics["test_accuracy"], s.errors.head()               # final model and its mistakes
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from crackcore.exceptions import StudyFilesError

TABLES = {"trials": "trials.parquet", "history": "history.parquet", "final_history": "final_history.parquet",
          "errors": "errors.parquet", "predictions": "predictions.parquet", "split": "split.parquet",
          "repeats": "repeats.parquet", "loso": "loso.parquet"}
DOCUMENTS = {"study": "study.json", "config": "study_config.json", "best_config": "best_config.json",
             "final_metrics": "final_metrics.json"}
OPTIONAL = {"repeats.parquet", "loso.parquet"}  # only with --repeat-top / --leave-one-out
JOURNAL = "optuna_journal.log"


@dataclass
class Study:
    path: Path
    study: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    best_config: dict[str, Any] = field(default_factory=dict)
    final_metrics: dict[str, Any] = field(default_factory=dict)
    trials: pd.DataFrame = field(default_factory=pd.DataFrame)
    history: pd.DataFrame = field(default_factory=pd.DataFrame)
    final_history: pd.DataFrame = field(default_factory=pd.DataFrame)
    errors: pd.DataFrame = field(default_factory=pd.DataFrame)
    predictions: pd.DataFrame = field(default_factory=pd.DataFrame)
    split: pd.DataFrame = field(default_factory=pd.DataFrame)
    repeats: pd.DataFrame = field(default_factory=pd.DataFrame)
    loso: pd.DataFrame = field(default_factory=pd.DataFrame)
    missing: list[str] = field(default_factory=list)

    @property
    def journal_path(self) -> Path:
        return self.path / JOURNAL

    @property
    def name(self) -> str:
        return self.config.get("name", self.path.name)

    @property
    def model_path(self) -> Path:
        return self.path / "model.pt"

    def test_predictions(self) -> pd.DataFrame:
        """predictions.parquet's rows of the in-domain test split (not of held-out or --eval sets)."""
        roles = {n: r["role"] for n, r in self.study.get("data_source", {}).get("sources", {}).items()}
        p = self.predictions
        return p[p["source"].map(roles) == "train"] if roles and "source" in p else p

    @property
    def shift(self) -> pd.DataFrame:
        """The shift suite of the final model (final_metrics.json "shift"): one row for the clean
        test images (shift "clean", severity 0) and one per shift x severity cell, each with n,
        accuracy and its Wilson 95 % CI; empty when the suite did not run."""
        return shift_frame(self.final_metrics.get("shift"))

    def per_set(self) -> pd.DataFrame:
        """The final model on every evaluated set, one row each: the test split of the sources
        trained on, each held-out source, each --eval folder (final_metrics.json)."""
        m = self.final_metrics
        if not m:
            return pd.DataFrame()
        rows = [{"set": "test split", "role": "in-domain test", "n": m["n_test"], "accuracy": m["test_accuracy"],
                 **{k: m[k] for k in ("ci95_low", "ci95_high", "precision", "recall", "f1", "roc_auc")}}]
        rows += [{"set": name, **s} for name, s in m.get("per_source", {}).items()]
        rows += [{"set": name, "role": "external (--eval)", **s} for name, s in m.get("external", {}).items()]
        return pd.DataFrame(rows)


SHIFT_COLUMNS = ["shift", "severity", "level", "parameter", "n", "accuracy", "ci95_low", "ci95_high"]


def shift_frame(suite: dict[str, Any] | None) -> pd.DataFrame:
    """A shift suite's result (crackcore.shift.run_suite) as a table: the clean row first."""
    if not suite:
        return pd.DataFrame(columns=SHIFT_COLUMNS)
    clean = [{"shift": "clean", "severity": 0, "level": None, "parameter": "", **suite["clean"]}] if suite["clean"] else []
    return pd.DataFrame([*clean, *suite["cells"]], columns=SHIFT_COLUMNS)


def _read(f: Path, read: Callable[[], Any]) -> Any:
    try:
        return read()
    except (ValueError, OSError) as exc:  # JSONDecodeError, ArrowInvalid are ValueErrors
        raise StudyFilesError(f"{f} is damaged ({str(exc).splitlines()[0][:120]}); restore it or re-run the step "
                              "that writes it") from None


def load_study(path: str | Path) -> Study:
    """Read a study folder. Files a study has not written yet (an interrupted search, a
    missing retrain) are listed in `missing` and left empty; a folder that is not a study
    at all raises StudyFilesError."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise StudyFilesError(f"{path} does not exist; pass results/<study-name>")
    if not (path / DOCUMENTS["config"]).is_file() and not (path / TABLES["trials"]).is_file():
        raise StudyFilesError(f"{path} is not a study folder (no study_config.json / trials.parquet); "
                              "pass results/<study-name>")
    study = Study(path=path)
    for attr, name in DOCUMENTS.items():
        f = path / name
        if f.is_file():
            setattr(study, attr, _read(f, lambda: json.loads(f.read_text())))
        else:
            study.missing.append(name)
    for attr, name in TABLES.items():
        f = path / name
        if f.is_file():
            setattr(study, attr, _read(f, lambda: pd.read_parquet(f)))
        elif name not in OPTIONAL:
            study.missing.append(name)
    if not study.model_path.is_file():
        study.missing.append("model.pt")
    return study


def open_journal(study_dir: str | Path) -> Any:
    """The Optuna JournalStorage of a study folder (written by the search, read by reports)."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return JournalStorage(JournalFileBackend(str(Path(study_dir) / JOURNAL)))


def load_optuna_study(study: Study) -> Any:
    """The persisted Optuna study (for optuna.visualization / importance), or None."""
    if not study.journal_path.is_file():
        return None
    import optuna

    return optuna.load_study(study_name=study.name, storage=open_journal(study.path))
