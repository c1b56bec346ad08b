"""With `--mlflow URI`, every trial as an MLflow run: Ray Tune's own MLflow callback, run on the
driver (a local SQLite store works on any cluster). Apart from tune.tracking because it imports
mlflow (half a second), which a study without --mlflow does not load."""
from __future__ import annotations

from typing import Any

from ray.air.integrations.mlflow import MLflowLoggerCallback

from crackcore import tracking
from tune.tracking import epoch_metrics


class TrialRuns(MLflowLoggerCallback):
    """Ray's MLflowLoggerCallback, with what a study needs: metrics at step = epoch (a trial
    resumed from a checkpoint goes on at its next epoch), one batch per report, only the
    history's figures (not Ray's bookkeeping), and on --resume a trial's run found again by its
    `trial_id` tag (Ray saves no callback state, so the plain callback would open a second run)."""

    def __init__(self, uri: str, study: str):
        super().__init__(tracking_uri=uri, experiment_name=study, tags={"study": study, "role": "trial"})

    def log_trial_start(self, trial: Any) -> None:
        mlf = tracking.client(self.tracking_uri)
        if trial not in self._trial_runs:
            found = mlf.search_runs([self.mlflow_util.experiment_id], f"tags.trial_id = '{trial.trial_id}'",
                                    max_results=1)
            if found:
                self._trial_runs[trial] = found[0].info.run_id
                mlf.update_run(found[0].info.run_id, status="RUNNING")
            else:
                self._trial_runs[trial] = mlf.create_run(self.mlflow_util.experiment_id, run_name=str(trial), tags={
                    **self.tags, "trial_id": trial.trial_id, "trial_name": str(trial)}).info.run_id
        tracking.log_batch(mlf, self._trial_runs[trial], params=tracking.flat_params(trial.config))

    def log_trial_result(self, iteration: int, trial: Any, result: dict) -> None:
        tracking.log_batch(tracking.client(self.tracking_uri), self._trial_runs[trial],
                           tracking.numbers(epoch_metrics(result)), step=int(result.get("epoch", iteration)))

    def log_trial_end(self, trial: Any, failed: bool = False) -> None:
        tracking.end_run(self.tracking_uri, self._trial_runs[trial], "FAILED" if failed else "FINISHED")
