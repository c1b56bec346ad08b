"""MLflow runs of a training run or a study, beside its files (which stay the record of truth).

`open_store(uri)` checks a `--mlflow` tracking URI before any work starts; `experiment(...)`
gets or makes the experiment runs go to; `tracked_run` / `log_epoch` / `log_history` /
`finish_run` record one run (parameters, per-epoch metrics at step = epoch, final metrics,
artifacts). mlflow is imported only when a URI is given. No Ray here: Ray Tune's trials are
logged by tune.tracking through Ray's own MLflow callback, which uses the same store.

A local store is a SQLite file (`sqlite:///results/mlflow.db`); its artifacts go to
`mlartifacts/<experiment>/` next to the file (MLflow's own default would be ./mlruns in
whatever folder the command ran from)."""
from __future__ import annotations

import contextlib
import math
import numbers as _numbers
import os
from pathlib import Path
from typing import Any, Iterator

import pandas as pd

from crackcore.exceptions import ConfigError, StudyError

SQLITE = "sqlite:///"
ARTIFACTS_DIR = "mlartifacts"
MAX_PARAM_CHARS = 6000  # MLflow's limit on a parameter value
BATCH = 100  # MLflow's log_batch takes at most 100 params / 1000 metrics per call
BOOKKEEPING = {"data_source", "versions", "command", "weights"}  # final_metrics.json's entries that are no figures


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///PATH` URI, or None for any other store."""
    return Path(uri[len(SQLITE):]) if uri.startswith(SQLITE) else None


def normalise(uri: str) -> str:
    """A relative SQLite path made absolute: a resumed study, a report or a driver in another
    working folder then opens the same file."""
    path = sqlite_path(uri)
    return f"{SQLITE}{path.expanduser().resolve()}" if path is not None else uri


def client(uri: str) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


@contextlib.contextmanager
def _fail_fast() -> Iterator[None]:
    """An unreachable server fails in seconds, not after MLflow's two minutes of retries."""
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ.update({"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def open_store(uri: str, create_in: str | Path | None = None) -> str:
    """The tracking URI, normalised and checked: the store opens (a new SQLite file is created
    with MLflow's tables). A SQLite file's folder must exist, except `create_in` (the folder the
    run writes to anyway, e.g. results/), which is created: MLflow itself would make any missing
    folder, so a typo would silently start a store elsewhere. ConfigError (one line) otherwise."""
    uri = normalise(uri)
    db = sqlite_path(uri)
    if db is not None and not db.parent.is_dir():
        if create_in is None or db.parent != Path(create_in).expanduser().resolve():
            raise ConfigError(f"--mlflow {uri}: folder {db.parent} does not exist; create it or give a file in an "
                              "existing folder, e.g. sqlite:///results/mlflow.db")
        db.parent.mkdir(parents=True)
    try:
        with _fail_fast():
            client(uri).search_experiments(max_results=1)
    except Exception as exc:  # any failure to open is the same problem for the user: this URI
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ConfigError(f"--mlflow {uri}: cannot open this MLflow tracking store ({reason}); give sqlite:///PATH.db "
                          "(a local file) or the http(s):// address of a running MLflow server") from None
    return uri


def experiment(uri: str, name: str, new_study: bool = False) -> str:
    """The id of experiment `name`, made if missing (artifacts next to a SQLite store). With
    `new_study`, an experiment that already holds runs is an error: a new study never mixes
    its runs with those of an earlier study of the same name."""
    mlf = client(uri)
    found = mlf.get_experiment_by_name(name)
    if found is None:
        db = sqlite_path(uri)
        return mlf.create_experiment(name, artifact_location=(db.parent / ARTIFACTS_DIR / name).as_uri()
                                        if db is not None else None)
    if found.lifecycle_stage != "active":
        raise StudyError(f"MLflow experiment {name!r} in {uri} is deleted; restore it (mlflow experiments restore), "
                         "remove it for good (mlflow gc), or use another name")
    if new_study and mlf.search_runs([found.experiment_id], max_results=1):
        raise StudyError(f"MLflow experiment {name!r} in {uri} already holds runs of an earlier study of that name; "
                         "pass --study-name NEW, or delete that experiment first")
    return found.experiment_id


def _flatten(nested: dict[str, Any], sep: str) -> dict[str, Any]:
    return pd.json_normalize(nested, sep=sep).iloc[0].to_dict() if nested else {}


def flat_params(config: dict[str, Any]) -> dict[str, str]:
    """A nested config as MLflow parameters: dotted keys, string values."""
    return {k: str(v)[:MAX_PARAM_CHARS] for k, v in _flatten(config, ".").items()}


def numbers(values: dict[str, Any], sep: str = "/") -> dict[str, float]:
    """The finite numeric leaves of a nested dict (bools and lists left out), keys joined by `sep`."""
    return {k: float(v) for k, v in _flatten(values, sep).items()
            if isinstance(v, _numbers.Real) and not isinstance(v, bool) and math.isfinite(v)}  # numpy scalars too


def log_batch(mlf: Any, run_id: str, metrics: dict[str, float] | None = None, step: int = 0,
              params: dict[str, str] | None = None, tags: dict[str, str] | None = None) -> None:
    """Metrics at `step`, params and tags, in as few calls as MLflow's batch limits allow."""
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.utils.time import get_current_time_millis

    now = get_current_time_millis()
    items = ([Metric(k, v, now, step) for k, v in (metrics or {}).items()],
             [Param(k, v) for k, v in (params or {}).items()], [RunTag(k, v) for k, v in (tags or {}).items()])
    for i in range(0, max(map(len, items), default=0), BATCH):
        mlf.log_batch(run_id, metrics=items[0][i:i + BATCH], params=items[1][i:i + BATCH], tags=items[2][i:i + BATCH])


@contextlib.contextmanager
def tracked_run(uri: str | None, experiment_id: str | None, name: str, params: dict[str, Any],
                tags: dict[str, str] | None = None) -> Iterator[str | None]:
    """A run open for the block (None without a URI): ended FAILED (KILLED on Ctrl-C) if the
    block raises; the block ends it with finish_run."""
    if uri is None or experiment_id is None:
        yield None
        return
    mlf = client(uri)
    run_id = mlf.create_run(experiment_id, run_name=name, tags=tags).info.run_id
    log_batch(mlf, run_id, params=flat_params(params))  # a nested config flattened
    try:
        yield run_id
    except BaseException as exc:
        end_run(uri, run_id, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise


def log_epoch(uri: str, run_id: str, row: dict[str, Any], mlf: Any = None) -> None:
    """One epoch of train.fit's history (a row of final_history.parquet) at step = epoch."""
    log_batch(mlf or client(uri), run_id, numbers({k: v for k, v in row.items() if k != "epoch"}),
              step=int(row["epoch"]))


def log_history(uri: str, run_id: str, history: pd.DataFrame) -> None:
    """Every epoch of a finished run's history, each at step = epoch."""
    mlf = client(uri)
    for row in history.to_dict("records"):
        log_epoch(uri, run_id, row, mlf)


def finish_run(uri: str, run_id: str, metrics: dict[str, Any], artifacts: list[Path], skip: set[str] = frozenset(),
               step: int = 0, status: str = "FINISHED") -> None:
    """The run's final metrics (numeric leaves of final_metrics.json's figures, `skip`: names its
    per-epoch history already holds) at `step`, its artifact files, then its end."""
    mlf = client(uri)
    log_batch(mlf, run_id, numbers({k: v for k, v in metrics.items() if k not in skip | BOOKKEEPING}), step=step)
    for path in artifacts:
        if path.is_file():
            mlf.log_artifact(run_id, str(path))
    mlf.set_terminated(run_id, status)


def end_run(uri: str, run_id: str, status: str) -> None:
    client(uri).set_terminated(run_id, status)


def log_folder(uri: str, run_id: str, folder: Path, artifact_path: str) -> None:
    """Every file of `folder` as artifacts of a run, under `artifact_path` (e.g. the report)."""
    client(uri).log_artifacts(run_id, str(folder), artifact_path)
