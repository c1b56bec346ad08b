"""The tools people already use, on real outputs: the tiny study's MLflow store read back
through MLflow's client, the retrain's TensorBoard events read back from the file, and
optuna-dashboard serving the study's journal over HTTP."""
from __future__ import annotations

import json
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import optuna
import pandas as pd
import pytest
from mlflow import MlflowClient

from crackcore.journal import open_journal

REPO = Path(__file__).resolve().parents[1]


def runs_of(client: MlflowClient, experiment_id: str, role: str) -> list:
    return client.search_runs([experiment_id], f"tags.role = '{role}'", max_results=1000)


def history_of(client: MlflowClient, run_id: str, key: str) -> dict[int, float]:
    """{step: value} of a metric; a step logged twice would show as a shorter dict than the list."""
    points = [(m.step, m.value) for m in client.get_metric_history(run_id, key)]
    assert len(points) == len(dict(points)), f"{key}: a step logged twice {points}"
    return dict(points)


def per_epoch(table: pd.DataFrame, key: str) -> dict[int, float]:
    return dict(zip(table["epoch"].astype(int), table[key]))


# --------------------------------------------------------------------------- MLflow


def test_every_trial_and_the_retrain_are_mlflow_runs(tiny_study: Path, tmp_path: Path) -> None:
    study = json.loads((tiny_study / "study.json").read_text())
    uri = study["mlflow"]["uri"]
    assert uri == f"sqlite:///{tiny_study.parent / 'mlflow.db'}"  # the fixture's --mlflow, made absolute
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("tiny")  # named after the study
    assert exp.experiment_id == study["mlflow"]["experiment_id"]
    assert len(client.search_runs([exp.experiment_id], max_results=1000)) == 5  # 4 trials + the retrain

    trials = pd.read_parquet(tiny_study / "trials.parquet").set_index("trial_id")
    history = pd.read_parquet(tiny_study / "history.parquet")
    runs = {r.data.tags["trial_id"]: r for r in runs_of(client, exp.experiment_id, "trial")}
    assert set(runs) == set(trials.index)
    for trial_id, r in runs.items():
        row = trials.loc[trial_id]
        assert r.info.status == "FINISHED" and r.data.tags["status"] == row["status"]  # COMPLETE or PRUNED
        assert float(r.data.params["lr"]) == pytest.approx(row["lr"], rel=1e-12)
        assert (int(r.data.params["freeze_depth"]), r.data.params["augment_policy"]) == (row["freeze_depth"],
                                                                                       row["augment_policy"])
        h = history[history["trial_id"] == trial_id].sort_values("epoch")
        assert len(h) == row["epochs"]
        for key in ("val_acc", "val_loss", "train_loss"):  # one point per epoch, at step = epoch
            assert history_of(client, r.info.run_id, key) == pytest.approx(per_epoch(h, key))
    assert {r.data.tags["status"] for r in runs.values()} == set(trials["status"])

    [retrain] = runs_of(client, exp.experiment_id, "retrain")
    assert retrain.info.run_id == study["mlflow"]["retrain_run_id"] and retrain.info.status == "FINISHED"
    best = json.loads((tiny_study / "best_config.json").read_text())
    assert retrain.data.tags["best_trial_id"] == best["trial_id"]
    assert float(retrain.data.params["lr"]) == pytest.approx(best["params"]["lr"], rel=1e-12)
    final = pd.read_parquet(tiny_study / "final_history.parquet")
    assert history_of(client, retrain.info.run_id, "val_acc") == pytest.approx(per_epoch(final, "val_acc"))
    metrics = json.loads((tiny_study / "final_metrics.json").read_text())
    for key in ("test_accuracy", "ci95_low", "ci95_high", "f1", "roc_auc", "n_test", "errors"):
        assert retrain.data.metrics[key] == pytest.approx(metrics[key]), key

    # the files, as artifacts: byte for byte what the study wrote; the report once it is built
    from tune.report import main as report_main

    assert report_main([str(tiny_study), "--max-errors", "0"]) == 0
    artifacts = {a.path for a in client.list_artifacts(retrain.info.run_id)}
    assert {"model.pt", "errors.parquet", "final_metrics.json", "report"} <= artifacts
    for name in ("errors.parquet", "model.pt"):
        got = client.download_artifacts(retrain.info.run_id, name, str(tmp_path))
        assert Path(got).read_bytes() == (tiny_study / name).read_bytes(), name
    report = {Path(a.path).name for a in client.list_artifacts(retrain.info.run_id, "report")}
    assert {"report.md", "index.html"} <= report and {p.name for p in (tiny_study / "report").iterdir()} <= report


def test_fit_is_one_mlflow_run(crack_data: Path, tmp_path: Path) -> None:
    import crackcore.fit as fit_cli
    from crackcore.cli import run_main

    out, uri = tmp_path / "results" / "base", f"sqlite:///{tmp_path}/results/mlflow.db"  # results/ does not exist yet
    assert run_main(fit_cli.main, ["--data", str(crack_data), "--subset", "40", "--epochs", "2", "--image-size", "32",
                                   "--weights", "random", "--out", str(out), "--mlflow", uri]) == 0
    client = MlflowClient(uri)
    [r] = client.search_runs([client.get_experiment_by_name("base").experiment_id])
    assert r.info.status == "FINISHED" and r.data.tags["role"] == "fit"
    cfg = json.loads((out / "config.json").read_text())
    assert r.data.params["lr"] == str(cfg["lr"]) and r.data.params["epochs"] == "2" and r.data.params["subset"] == "40"
    final = pd.read_parquet(out / "final_history.parquet")
    for key in ("val_acc", "train_loss"):
        assert history_of(client, r.info.run_id, key) == pytest.approx(per_epoch(final, key))
    metrics = json.loads((out / "final_metrics.json").read_text())
    assert r.data.metrics["test_accuracy"] == pytest.approx(metrics["test_accuracy"])
    assert not any(k.startswith("data_source") for k in r.data.metrics)  # bookkeeping is not a metric
    assert {a.path for a in client.list_artifacts(r.info.run_id)} == {"model.pt", "errors.parquet", "final_metrics.json"}
    # the artifacts live next to the store, not in the folder the command ran from
    assert (tmp_path / "results" / "mlartifacts" / "base").is_dir()
    # a new study never mixes its runs into an experiment of the same name that holds runs; a resumed one goes on
    from crackcore.exceptions import StudyError
    from crackcore.tracking import experiment

    with pytest.raises(StudyError, match="already holds runs of an earlier study of that name; pass --study-name NEW"):
        experiment(uri, "base", new_study=True)
    assert experiment(uri, "base") == r.info.experiment_id


@pytest.mark.parametrize("uri, message", [
    ("sqlite:////nonexistent/dir/x.db", "folder /nonexistent/dir does not exist; create it"),
    ("bogus://x", "cannot open this MLflow tracking store"),
    ("http://127.0.0.1:1", "cannot open this MLflow tracking store"),  # no server: no minutes of retries either
])
def test_a_bad_mlflow_uri_is_one_line_before_anything_runs(uri: str, message: str, tmp_path: Path, capsys) -> None:
    import crackcore.fit as fit_cli
    from crackcore.cli import run_main

    assert run_main(fit_cli.main, ["--out", str(tmp_path / "out"), "--mlflow", uri]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --mlflow {uri}") and message in err[0], err
    assert not Path("/nonexistent").exists() and not any(tmp_path.iterdir())


# --------------------------------------------------------------------------- TensorBoard


def tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value)]} of the TensorBoard event files in `folder`: TFRecords (length,
    CRC, an Event protobuf, CRC), each record's CRCs checked as TensorBoard checks them."""
    from tensorboardX.proto.event_pb2 import Event
    from tensorboardX.record_writer import masked_crc32c

    scalars: dict[str, list[tuple[int, float]]] = {}
    for f in folder.glob("events.out.tfevents.*"):
        data, i = f.read_bytes(), 0
        while i < len(data):
            header = data[i:i + 8]
            (n,), (header_crc,) = struct.unpack("<Q", header), struct.unpack("<I", data[i + 8:i + 12])
            body, (body_crc,) = data[i + 12:i + 12 + n], struct.unpack("<I", data[i + 12 + n:i + 16 + n])
            assert header_crc == masked_crc32c(header) and body_crc == masked_crc32c(body), f"damaged record in {f}"
            event = Event.FromString(body)
            for v in event.summary.value:
                scalars.setdefault(v.tag, []).append((event.step, v.simple_value))
            i += 16 + n
    return scalars


def test_the_retrain_curves_are_in_tensorboard_beside_the_trials(tiny_study: Path) -> None:
    logdir = tiny_study / "ray"  # what the README's `tensorboard --logdir` line points at
    final = pd.read_parquet(tiny_study / "final_history.parquet")
    retrain = tensorboard_scalars(logdir / "retrain")
    for key in ("val_acc", "val_loss", "train_loss", "train_acc", "current_lr"):  # Ray's tags, step = epoch
        assert dict(retrain[f"ray/tune/{key}"]) == pytest.approx(per_epoch(final, key), rel=1e-6)
        assert len(retrain[f"ray/tune/{key}"]) == len(final)
    trial_dirs = [d for d in logdir.iterdir() if d.name.startswith("train_trial_")]
    assert len(trial_dirs) == 4
    assert all("ray/tune/val_acc" in tensorboard_scalars(d) for d in trial_dirs)  # Ray's own, same tag


# --------------------------------------------------------------------------- optuna-dashboard


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def test_optuna_dashboard_serves_the_study_and_its_pruned_trials(tiny_study: Path) -> None:
    journal = tiny_study / "optuna_journal.log"
    expected = optuna.load_study(study_name="tiny", storage=open_journal(tiny_study)).trials
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    # the README's command, on a loopback port
    server = subprocess.Popen([str(Path(sys.executable).parent / "optuna-dashboard"), str(journal), "--host",
                               "127.0.0.1", "--port", str(port), "--quiet"], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        deadline, studies = time.time() + 60, None
        while studies is None and time.time() < deadline and server.poll() is None:
            try:
                studies = _get(f"{base}/api/studies")["study_summaries"]
            except OSError:  # not listening yet
                time.sleep(0.3)
        assert studies is not None, f"optuna-dashboard did not answer: {server.poll()} {server.stdout.read() if server.poll() is not None else ''}"
        [summary] = [s for s in studies if s["study_name"] == "tiny"]
        detail = _get(f"{base}/api/studies/{summary['study_id']}")
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    assert detail["name"] == "tiny" and len(detail["trials"]) == len(expected) == 4
    states = {t["number"]: t["state"] for t in detail["trials"]}
    assert states == {t.number: t.state.name.capitalize() for t in expected}
    pruned = {n for n, s in states.items() if s == "Pruned"}
    trials = pd.read_parquet(tiny_study / "trials.parquet")
    assert pruned and len(pruned) == (trials["status"] == "PRUNED").sum()  # ASHA's early stops, as Optuna PRUNED
    # each trial's per-epoch values, as the dashboard plots them
    for t in detail["trials"]:
        assert [v["step"] for v in t["intermediate_values"]] == sorted(expected[t["number"]].intermediate_values)
