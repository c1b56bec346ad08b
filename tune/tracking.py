"""The study in MLflow and TensorBoard. With `--mlflow URI` every trial is an MLflow run,
logged by Ray Tune's own MLflow callback (on the driver: a local SQLite store works on any
cluster), and the final retrain is one more run with its test metrics and files; all under
one experiment named after the study. Ray writes each trial's TensorBoard events under
results/<study>/ray/; the retrain's curves go to ray/retrain/ with the same tags, so
`tensorboard --logdir results/<study>/ray` draws them beside the trials'. The trials' callback
is tune.trial_runs: it imports mlflow, which a study without --mlflow does not load."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from crackcore import tracking
from crackcore.outputs import write_folder
from crackcore.studyfiles import ERRORS, FINAL_METRICS, MODEL
from crackcore.train import HISTORY_COLUMNS

TB_PREFIX = "ray/tune/"  # the tag prefix of Ray's TensorBoard logger
RETRAIN_EVENTS = "retrain"  # the retrain's TensorBoard folder inside Ray's experiment folder


def epoch_metrics(result: dict[str, Any]) -> dict[str, Any]:
    """The figures of one epoch in a trial's report: train.fit's history row (and val_acc_<source>)."""
    return {k: v for k, v in result.items() if (k in HISTORY_COLUMNS or k.startswith("val_acc_")) and k != "epoch"}


def mark_trials(uri: str, experiment_id: str, trials: pd.DataFrame) -> None:
    """Tag each trial's run with its study status (COMPLETE, PRUNED, DIVERGED, ...: Ray ends an
    early-stopped trial like a complete one); a run of an interrupted trial is ended KILLED."""
    mlf = tracking.client(uri)
    status = trials.set_index("trial_id")["status"].to_dict()
    for r in mlf.search_runs([experiment_id], "tags.role = 'trial'", max_results=10_000):
        trial_id = r.data.tags.get("trial_id")
        if trial_id in status:
            mlf.set_tag(r.info.run_id, "status", status[trial_id])
            if r.info.status == "RUNNING" and status[trial_id] == "INTERRUPTED":
                mlf.set_terminated(r.info.run_id, "KILLED")


def write_retrain_events(history: pd.DataFrame, folder: Path) -> Path:
    """The retrain's per-epoch curves as TensorBoard scalars (Ray's tags, step = epoch), the
    folder replaced whole: a retrain run again (a resumed study) leaves no duplicate points."""
    from tensorboardX import SummaryWriter

    def fill(tmp: Path) -> None:
        with SummaryWriter(str(tmp)) as writer:
            for row in history.to_dict("records"):
                for key, value in tracking.numbers(epoch_metrics(row)).items():
                    writer.add_scalar(TB_PREFIX + key, value, global_step=int(row["epoch"]))

    return write_folder(folder, fill)


def log_retrain(uri: str, experiment_id: str, study: str, best_trial_id: str, result: Any, best_cfg: Any,
                metrics: dict[str, Any], study_dir: Path) -> str:
    """The final retrain as an MLflow run: its training config, per-epoch history, test metrics
    and model.pt, errors.parquet and final_metrics.json. Returns the run id."""
    with tracking.tracked_run(uri, experiment_id, "retrain", best_cfg.to_dict(),
                              {"study": study, "role": "retrain", "best_trial_id": best_trial_id}) as run_id:
        tracking.log_history(uri, run_id, result.history)
        tracking.finish_run(uri, run_id, metrics, [study_dir / n for n in (MODEL, ERRORS, FINAL_METRICS)],
                            skip=set(HISTORY_COLUMNS), step=len(result.history))
    return run_id
