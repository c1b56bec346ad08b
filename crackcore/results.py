"""The one reader of study files: `load_study(path)` returns everything a study wrote as
DataFrames and dicts, for the report, notebooks and tests.

    from crackcore.results import load_study
    s = load_study("results/study")
    s.trials.sort_values("best_val_acc", ascending=False).head()   # best trials
    s.history.pivot(index="epoch", columns="trial_id", values="val_acc")  # learning curves
    s.final_metrics["test_accuracy"], s.errors.head()               # final model and its mistakes
    s.calibration                                                   # crackcore.calibrate runs beside it
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from crackcore.exceptions import StudyFilesError
from crackcore.journal import open_journal
from crackcore.studyfiles import DOCUMENTS, JOURNAL, MODEL, OPTIONAL, TABLES, TRIALS
from crackcore.shift import shift_frame

# `python -m crackcore.calibrate --out results/STUDY/calibration/SITE` puts a calibration beside a study
CALIBRATION_GLOB = "calibration/*/calibration.json"
CALIBRATION_FORMAT = "crackcore-calibration"
CALIBRATION_COLUMNS = ("before", "after", "head refit")


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
    reference_predictions: pd.DataFrame = field(default_factory=pd.DataFrame)
    calibration: pd.DataFrame = field(default_factory=pd.DataFrame)
    missing: list[str] = field(default_factory=list)
    trials_from: str = TRIALS  # or the Optuna journal, for a study stopped before the search ended

    @property
    def journal_path(self) -> Path:
        return self.path / JOURNAL

    @property
    def name(self) -> str:
        return self.config.get("name", self.path.name)

    @property
    def model_path(self) -> Path:
        return self.path / MODEL

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

    @property
    def lift(self) -> pd.DataFrame:
        """The pick against the reference setting, retrained alike, on every evaluated set (one row
        each: set, pick_accuracy, reference_accuracy, lift = pick - reference, its paired 95 % CI
        ci95_low..ci95_high, n); empty when no reference was retrained (--no-reference, or the
        pick is the reference: final_metrics.json "reference" says which)."""
        return pd.DataFrame([{"set": name, **v} for name, v in (self.final_metrics.get("lift") or {}).items()])

    @property
    def fidelity(self) -> pd.DataFrame:
        """Per ASHA rung, Spearman's rho between the ranking at that rung and the last epoch's
        ranking by the choice rule, over the trials that ran all epochs (study.json "fidelity")."""
        return pd.DataFrame(self.study.get("fidelity", []), columns=["rung", "n", "spearman"])

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
        # a set also scored adapted to its own images (--adapt-to): its adapted figures on a row of their own
        rows = [r for row in rows for r in ({k: v for k, v in row.items() if k != "adapted"}, *(
            [{"set": f"{row['set']} (adapted)", "role": f"{row.get('role', '')}, adapted ({row['adapted']['method']})",
              **{k: row["adapted"][k] for k in ("n", "accuracy", "ci95_low", "ci95_high", "precision", "recall", "f1",
                                                "roc_auc") if k in row["adapted"]}}] if "adapted" in row else []))]
        return pd.DataFrame(rows)


def _read(f: Path, read: Callable[[], Any]) -> Any:
    try:
        return read()
    except (ValueError, OSError) as exc:  # JSONDecodeError, ArrowInvalid are ValueErrors
        raise StudyFilesError(f"{f} is damaged ({str(exc).splitlines()[0][:120]}); restore it or re-run the step "
                              "that writes it") from None


def is_calibration(record: Any) -> bool:
    """A calibration.json of crackcore.calibrate's, not someone else's file of that name."""
    return isinstance(record, dict) and record.get("format") == CALIBRATION_FORMAT


def load_calibrations(study_dir: str | Path) -> pd.DataFrame:
    """Every calibration written beside a study (CALIBRATION_GLOB), one row per site and model
    column (before / after / head refit): its temperature, threshold and figures on the site's
    evaluation rest, each interval as _low / _high columns. Empty when there is none."""
    rows = []
    for f in sorted(Path(study_dir).glob(CALIBRATION_GLOB)):
        d = _read(f, lambda: json.loads(f.read_text()))
        if not is_calibration(d):
            continue  # someone else's file of that name: not ours to read
        columns = d.get("metrics", {})  # JSON keeps no order: the table's own
        for column in sorted(columns, key=lambda c: (CALIBRATION_COLUMNS + (c,)).index(c)):
            m = columns[column]
            flat = {k: v for k, v in m.items() if not k.endswith("_ci95")}
            for k, v in m.items():
                if k.endswith("_ci95"):
                    flat[f"{k[:-5]}_low"], flat[f"{k[:-5]}_high"] = v
            rows.append({"site": f.parent.name, "site_folder": d.get("site"), "k": d.get("k"), "seed": d.get("seed"),
                         "model": column, **flat})
    return pd.DataFrame(rows)


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
    for files, read in ((DOCUMENTS, lambda f: json.loads(f.read_text())), (TABLES, pd.read_parquet)):
        for attr, name in files.items():
            f = path / name
            if f.is_file():
                setattr(study, attr, _read(f, lambda: read(f)))
            elif name not in OPTIONAL:
                study.missing.append(name)
    if not study.model_path.is_file():
        study.missing.append(MODEL)
    if not len(study.trials) and study.journal_path.is_file():  # stopped mid-search: the journal has the trials so far
        study.trials = _read(study.journal_path, lambda: journal_trials(study))
        study.trials_from = JOURNAL
    study.calibration = load_calibrations(path)
    return study


def journal_trials(study: Study) -> pd.DataFrame:
    """The trials table as far as the Optuna journal knows it (params, state, epochs, best
    value); trials.parquet is only written once the search has ended."""
    optuna_study = load_optuna_study(study)
    return pd.DataFrame([{"trial_id": f"optuna-{t.number}", **t.params, "status": t.state.name,
                          "epochs": len(t.intermediate_values),
                          "best_val_acc": max(t.intermediate_values.values(), default=float("nan"))}
                         for t in (optuna_study.trials if optuna_study else [])])


def load_optuna_study(study: Study) -> Any:
    """The persisted Optuna study (for optuna.visualization / importance), or None."""
    if not study.journal_path.is_file():
        return None
    import optuna

    return optuna.load_study(study_name=study.name, storage=open_journal(study.path))
