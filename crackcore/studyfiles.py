"""The one catalogue of the files a run or a study writes, by name. Every writer
(crackcore.outputs, tune/run.py, tune.storage) and the one reader (crackcore.results) spell a
file's name from here, so renaming or adding one is one line."""
from __future__ import annotations

# a finished run (python -m crackcore.fit, or the study's final retrain)
MODEL = "model.pt"
RUN_CONFIG = "config.json"
FINAL_METRICS = "final_metrics.json"
FINAL_HISTORY = "final_history.parquet"
PREDICTIONS = "predictions.parquet"
ERRORS = "errors.parquet"
SPLIT = "split.parquet"
LOSO = "loso.parquet"  # with --leave-one-out
# a study
STUDY = "study.json"
STUDY_CONFIG = "study_config.json"
BEST_CONFIG = "best_config.json"
TRIALS = "trials.parquet"
HISTORY = "history.parquet"
REPEATS = "repeats.parquet"  # with --repeat-top
REFERENCE_PREDICTIONS = "reference_predictions.parquet"  # with the reference retrained beside the pick
JOURNAL = "optuna_journal.log"
STATE_HASHES = "ray_state_sha256.json"  # SHA-256 of Ray's saved state as the study wrote it

# what load_study reads, by attribute
TABLES = {"trials": TRIALS, "history": HISTORY, "final_history": FINAL_HISTORY, "errors": ERRORS,
          "predictions": PREDICTIONS, "split": SPLIT, "repeats": REPEATS, "loso": LOSO,
          "reference_predictions": REFERENCE_PREDICTIONS}
DOCUMENTS = {"study": STUDY, "config": STUDY_CONFIG, "best_config": BEST_CONFIG, "final_metrics": FINAL_METRICS}
OPTIONAL = {REPEATS, LOSO, REFERENCE_PREDICTIONS}  # only with --repeat-top / --leave-one-out / a reference
