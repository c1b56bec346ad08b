"""The tuning study end to end: real Ray (local and a 2-node cluster on 127.0.0.1), real
Optuna, real images, tiny budgets."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import pytest
import torch
import torchvision

from crackcore.journal import open_journal

REPO = Path(__file__).resolve().parents[1]
RUN = [sys.executable, str(REPO / "tune" / "run.py")]
OUTPUTS = ["trials.parquet", "history.parquet", "best_config.json", "final_history.parquet", "final_metrics.json",
           "errors.parquet", "predictions.parquet", "split.parquet", "model.pt", "study.json", "optuna_journal.log",
           "study_config.json", "ray"]


def run_study(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([*RUN, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env={**os.environ, **(env or {})})


def optuna_trials(study_dir: Path, name: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=name, storage=open_journal(study_dir)).trials


def reported_epochs(study_dir: Path) -> dict[str, list[int]]:
    """Every epoch each trial reported, in order, from Ray's raw per-trial result.json (which
    keeps a repeated epoch; history.parquet keeps the last report of each)."""
    return {f.parent.name: [json.loads(line)["epoch"] for line in f.read_text().splitlines() if line.strip()]
            for f in (study_dir / "ray").glob("*/result.json")}


# --------------------------------------------------------------------------- (a) local study


def test_local_study_writes_every_output(tiny_study: Path) -> None:
    for name in OUTPUTS:
        assert (tiny_study / name).exists(), name
    trials = pd.read_parquet(tiny_study / "trials.parquet")
    assert len(trials) == 4
    assert {"lr", "freeze_depth", "augment_policy", "status", "epochs", "node_id", "best_val_acc"} <= set(trials.columns)
    assert trials["lr"].between(1e-4, 1e-1).all() and trials["freeze_depth"].between(0, 5).all()
    assert set(trials["status"]) <= {"COMPLETE", "PRUNED"}
    # the seed notebook's setting is evaluated first
    assert optuna_trials(tiny_study, "tiny")[0].params == {"lr": 1e-3, "freeze_depth": 0, "augment_policy": "flip"}
    assert ((trials["status"] == "COMPLETE") == (trials["epochs"] == 2)).all() and (trials["epochs"] >= 1).all()

    predictions = pd.read_parquet(tiny_study / "predictions.parquet")
    errors = pd.read_parquet(tiny_study / "errors.parquet")
    wrong = predictions[predictions["true_label"] != predictions["pred_label"]]
    assert list(errors.columns) == ["sample", "path", "true_label", "pred_label", "prob_crack", "source"]
    assert sorted(errors["sample"]) == sorted(wrong["sample"])
    metrics = json.loads((tiny_study / "final_metrics.json").read_text())
    assert metrics["errors"] == len(errors) and metrics["n_test"] == len(predictions)
    assert metrics["test_accuracy"] == pytest.approx(1 - len(errors) / len(predictions))
    split = pd.read_parquet(tiny_study / "split.parquet")
    assert set(predictions["path"]) == set(split.loc[split["split"] == "test", "path"])

    model = torch.load(tiny_study / "model.pt", weights_only=True)
    assert model["format"] == "crackcore-model" and model["weights"]["source"] == "random"
    best = json.loads((tiny_study / "best_config.json").read_text())
    assert best["train_config"]["epochs"] == 2 and best["trial_id"] in set(trials["trial_id"])
    study = json.loads((tiny_study / "study.json").read_text())
    assert study["data_source"]["kind"] in ("real", "synthetic") and study["trials"] == 4
    assert 1 <= study["max_parallel_trials"] <= 2
    # 2 epochs, ASHA's rung at 1: no epoch a checkpoint is worth writing at (tune.search.checkpoint_epochs)
    assert study["footprint"]["checkpoint_bytes_written"] == 0 == study["footprint"]["checkpoint_bytes_peak"]
    assert not list((tiny_study / "ray").rglob("checkpoint_*")) and study["footprint"]["bytes_left"] < 50e6
    assert 0 < study["slot_utilisation"] <= 1.05


def test_optuna_journal_records_epochs_and_pruning(tiny_study: Path) -> None:
    trials = pd.read_parquet(tiny_study / "trials.parquet")
    frozen = optuna_trials(tiny_study, "tiny")
    assert len(frozen) == 4
    by_params = {(round(t.params["lr"], 12), t.params["freeze_depth"], t.params["augment_policy"]): t for t in frozen}
    for row in trials.itertuples():
        t = by_params[(round(row.lr, 12), row.freeze_depth, row.augment_policy)]
        # every epoch a trial ran is an intermediate value at step = epoch
        assert sorted(t.intermediate_values) == list(range(1, row.epochs + 1))
        expected = optuna.trial.TrialState.PRUNED if row.status == "PRUNED" else optuna.trial.TrialState.COMPLETE
        assert t.state == expected
        if row.status == "COMPLETE":
            assert t.value == pytest.approx(row.last_val_acc)


def test_the_pick_is_compared_with_the_reference_retrained_beside_it(tiny_study: Path) -> None:
    from crackcore.results import load_study
    from tune.trials import rank_trials

    s = load_study(tiny_study)
    reference = {"lr": 0.02, "freeze_depth": 0, "augment_policy": "none"}  # conftest.TINY_REFERENCE
    # random init: freezing random layers is not searched
    assert s.config["space"]["freeze_depths"] == [0] and (s.trials["freeze_depth"] == 0).all()
    # the choice: the highest val accuracy's tie set, stated with the rule
    assert "highest val accuracy" in s.best_config["rule"] and s.study["best_rule"] == s.best_config["rule"]
    ranked = rank_trials(s.trials, "val_acc", reference)
    assert s.best_config["trial_id"] == ranked["trial_id"].iloc[0]
    assert s.best_config["tie_set"] == s.study["tie_set"] == ranked.loc[ranked["tied"], "trial_id"].tolist()
    assert (s.trials["last_val_n"] > 0).all()
    # the reference, retrained beside the pick (not a trial's setting, so never the pick) on the same images
    ref = s.final_metrics["reference"]
    assert ref["params"] == reference and ref["retrained"] and not ref["is_pick"] and ref["from"] == "reference"
    assert ref["test"]["n"] == s.final_metrics["n_test"] and 0 <= ref["test"]["accuracy"] <= 1
    lift = s.lift.set_index("set").loc["test split"]
    refp = s.reference_predictions[s.reference_predictions["set"] == "test split"]
    pick = s.test_predictions().merge(refp, on=["source", "path"], suffixes=("", "_ref"))
    assert lift["n"] == len(pick) == s.final_metrics["n_test"]
    assert lift["reference_accuracy"] == pytest.approx(ref["test"]["accuracy"])
    assert lift["pick_accuracy"] == pytest.approx(s.final_metrics["test_accuracy"])
    assert lift["lift"] == pytest.approx(lift["pick_accuracy"] - lift["reference_accuracy"])
    assert lift["ci95_low"] <= lift["lift"] <= lift["ci95_high"]
    assert lift["pick_only_right"] == ((pick["pred_label"] == pick["true_label"]) & (pick["pred_label_ref"] != pick["true_label"])).sum()
    # the rungs' fidelity: one rung (epoch 1) below max_epochs 2, over the trials that ran both epochs
    assert s.fidelity["rung"].tolist() == [1] and s.fidelity["n"].iloc[0] == (s.trials["status"] == "COMPLETE").sum()


def test_results_loader_reads_the_study(tiny_study: Path) -> None:
    from crackcore.results import load_study

    study = load_study(tiny_study)
    assert len(study.trials) == 4 and not study.missing
    assert study.final_metrics["n_test"] == len(study.predictions)


# --------------------------------------------------------------------------- (b) 2-node cluster


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _processes_under(folder: str) -> list[int]:
    """Ids of the processes whose command line names `folder` (a test cluster's Ray processes:
    their --temp-dir / session folder) and of their descendants (Ray's workers retitle themselves
    "ray::..."), never another Ray on the machine."""
    cmdline, parent = {}, {}
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit():
                cmdline[int(proc.name)] = (proc / "cmdline").read_bytes().decode(errors="replace")
                parent[int(proc.name)] = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):  # gone meanwhile
            continue
    found = {pid for pid, line in cmdline.items() if folder in line and pid != os.getpid()}
    while grown := {pid for pid, ppid in parent.items() if ppid in found} - found:
        found |= grown
    return sorted(found)


def _kill(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def ray_cluster(worker: list[str], head_cpus: int = 1):
    """A head node with `head_cpus` CPUs and one worker node started with `worker` flags, on
    127.0.0.1. Each node has a temp folder of its own (short: Ray's socket paths must fit 107
    bytes), so its address file is not /tmp/ray/ray_current_cluster (a local Ray of someone else
    would then refuse to start) and teardown kills this cluster's processes only, not `ray stop`'s
    every Ray on the machine. Yields (address, env, {"head": folder, "worker": folder})."""
    import tempfile

    ray_bin = str(Path(sys.executable).parent / "ray")
    port = _free_port()
    # a lost node is noticed after 3 missed 1 s health checks (Ray's default: 5 of 3 s, after a 10 s timeout)
    # the cluster's own token (as `ray get-auth-token --generate` makes one): a fresh machine has no
    # ~/.ray/auth_token, and the user's must not be touched
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
           "RAY_health_check_period_ms": "1000",
           "RAY_health_check_timeout_ms": "1000", "RAY_health_check_failure_threshold": "3"}
    folders = {node: tempfile.mkdtemp(prefix=f"ray{node[0]}-", dir="/tmp") for node in ("head", "worker")}
    common = ["--object-store-memory=300000000", "--disable-usage-stats", "--node-ip-address=127.0.0.1"]
    try:
        subprocess.run([ray_bin, "start", "--head", f"--port={port}", "--include-dashboard=false", f"--num-cpus={head_cpus}",
                        f"--temp-dir={folders['head']}", *common], check=True, capture_output=True, env=env, timeout=120)
        subprocess.run([ray_bin, "start", f"--address=127.0.0.1:{port}", f"--temp-dir={folders['worker']}", *worker,
                        *common], check=True, capture_output=True, env=env, timeout=120)
        yield f"127.0.0.1:{port}", env, folders
    finally:
        for folder in folders.values():
            _kill(_processes_under(folder))
        for folder in folders.values():
            shutil.rmtree(folder, ignore_errors=True)


def _result_rows(study_dir: Path) -> dict[str, list[dict]]:
    """Every report of each trial in Ray's per-trial result.json, whole lines only."""
    rows = {}
    for f in (study_dir / "ray").glob("*/result.json"):
        lines = [line for line in f.read_text(errors="replace").splitlines() if line.strip()]
        with contextlib.suppress(ValueError):
            rows[f.parent.name] = [json.loads(line) for line in lines]
    return rows


@pytest.mark.slow
def test_a_lost_worker_node_loses_no_finished_epoch(crack_data: Path, tmp_path: Path) -> None:
    """A 2-node cluster on 127.0.0.1 (one CPU each, a trial on each). The worker node's raylet is
    killed (a spot instance gone) while its trial runs, after it wrote a checkpoint: the lost trial
    goes on on the head from its last checkpoint (Ray's FailureConfig(max_failures)). Then the
    head goes too (the whole cluster and the driver); on a new cluster the same command line
    (--resume auto) completes the study. No epoch is counted twice in the journal or the trials
    table. What the lost node cost (epochs run again, seconds) is printed for the README."""
    weights = tmp_path / "backbone.pth"  # read by the driver only: trials get it from the object store
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    study_dir, log = tmp_path / "lost", tmp_path / "driver.log"

    def command(address: str) -> list[str]:
        # max 6 epochs, no ASHA rung below it: checkpoints after epochs 1..5 (tune.search.checkpoint_epochs)
        return [*RUN, "--address", address, "--data", str(crack_data), "--storage-path", str(tmp_path), "--study-name",
                "lost", "--num-samples", "2", "--max-epochs", "6", "--grace-period", "6", "--final-epochs", "1",
                "--image-size", "32", "--subset", "100", "--cpus-per-trial", "1", "--max-concurrent-trials", "2",
                "--weights", str(weights), "--resume", "auto"]

    def reported(trial: str | None, since: float = 0.0) -> list[dict]:
        return [r for t, rows in _result_rows(study_dir).items() for r in rows
                if (trial is None or t == trial) and r["wall_time"] >= since]

    with ray_cluster(worker=["--num-cpus=1"]) as (address, env, folders):
        assert (Path(folders["head"]) / "ray_current_cluster").exists() and not Path("/tmp/ray/ray_current_cluster").exists()
        with open(log, "w") as out:  # a file, not a pipe: Ray's progress tables would fill a pipe nobody reads yet
            driver = subprocess.Popen(command(address), cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                      start_new_session=True)
        try:
            [raylet] = [pid for pid in _processes_under(folders["worker"])
                        if Path(f"/proc/{pid}/cmdline").read_text(errors="replace").split("\0")[0].endswith("raylet")]
            worker_node = re.search(r"--node_id=(\w+)", Path(f"/proc/{raylet}/cmdline").read_text())[1]
            deadline, lost = time.time() + 300, None
            while time.time() < deadline and lost is None and driver.poll() is None:
                time.sleep(0.1)
                lost = next((t for t, rows in _result_rows(study_dir).items()
                             if rows and rows[-1]["node_id"] == worker_node and 2 <= rows[-1]["epoch"] < 5), None)
            assert lost, "no trial reported 2 epochs on the worker node: " + log.read_text()[-3000:]
            _kill([raylet])  # the node is gone: its raylet, and with it the trial's worker process
            killed_at = time.time()
            def moved() -> list:  # the worker's process may outlive its raylet for a report or two
                return [r for r in reported(lost, killed_at) if r["node_id"] != worker_node]

            while time.time() < deadline + 300 and not moved() and driver.poll() is None:
                time.sleep(0.1)  # the lost trial goes on on the head
            assert moved(), "the lost trial did not go on on the head: " + log.read_text()[-3000:]
            head_lost_at = time.time()
            assert driver.poll() is None, "the study ended before the head was lost"
        finally:
            os.killpg(driver.pid, signal.SIGKILL)  # then the head goes: the cluster (on leaving) and the driver
            driver.wait()
    with ray_cluster(worker=["--num-cpus=1"]) as (address, env, folders):
        proc = subprocess.run(command(address), cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "resuming study lost" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-3000:]
    trials = pd.read_parquet(study_dir / "trials.parquet")
    assert (trials["status"] == "COMPLETE").all() and (trials["epochs"] == 6).all() and len(trials) == 2
    journal = optuna_trials(study_dir, "lost")
    assert all(sorted(t.intermediate_values) == list(range(1, 7)) for t in journal)
    history = pd.read_parquet(study_dir / "history.parquet")
    assert not history.duplicated(["trial_id", "epoch"]).any() and len(history) == 12
    rows = reported(lost)
    # by node, not by the kill's clock: a report the worker sent as it was killed may carry a later wall_time
    pre = [r for r in rows if r["node_id"] == worker_node]
    on_head = [r for r in rows if r["node_id"] != worker_node and r["wall_time"] < head_lost_at]
    last_checkpoint = max(r["epoch"] for r in pre if r["checkpoint_bytes"] > 0)
    rerun = sorted({r["epoch"] for r in pre} & {r["epoch"] for r in on_head})
    # it went on from its last checkpoint, not from scratch: only the epochs after it ran again
    assert on_head[0]["epoch"] == last_checkpoint + 1 and all(e > last_checkpoint for e in rerun)
    assert {r["node_id"] for r in pre} == {worker_node} and worker_node not in {r["node_id"] for r in on_head}
    assert sorted({r["epoch"] for r in rows}) == list(range(1, 7))
    print(f"\nlost node: trial {lost} killed after it reported epoch {pre[-1]['epoch']} (last checkpoint: epoch "
          f"{last_checkpoint}); reported epochs run again: {rerun} (+ the epoch in progress); "
          f"{on_head[0]['wall_time'] - killed_at:.1f} s from the kill to its next epoch's report on the head "
          f"({on_head[0]['seconds']:.1f} s of it that epoch's training)")


@pytest.mark.slow
def test_trials_pack_on_the_gpu_node_and_the_retrain_gets_a_whole_gpu(crack_data: Path, tmp_path: Path) -> None:
    # The worker's GPU is a Ray resource only (no CUDA here, so tasks train on the CPU): what is
    # tested is placement. Trials asking 0.5 GPU must run two at a time on the GPU node, never on
    # the GPU-less head, and the final retrain must get the whole GPU there (the head has more
    # CPUs, so a retrain asking CPUs only would land on it).
    with ray_cluster(worker=["--num-cpus=2", "--num-gpus=1"], head_cpus=3) as (address, env, _):
        proc = run_study("--address", address, "--data", str(crack_data), "--storage-path", str(tmp_path),
                         "--study-name", "packed", "--num-samples", "2", "--max-epochs", "3", "--grace-period", "3",
                         "--final-epochs", "1", "--image-size", "32", "--subset", "300", "--cpus-per-trial", "1",
                         "--gpus-per-trial", "0.5", env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    study = json.loads((tmp_path / "packed" / "study.json").read_text())
    gpu_nodes = {node for node, r in study["node_resources"].items() if r["GPU"] > 0}
    assert study["nodes"] == 2 and len(gpu_nodes) == 1
    trials = pd.read_parquet(tmp_path / "packed" / "trials.parquet")
    assert set(trials["node_id"]) == gpu_nodes and (trials["status"] == "COMPLETE").all()
    assert study["config"]["gpus_per_trial"] == 0.5 and study["trial_slots"] == 2
    assert study["max_parallel_trials"] == 2, "two trials should have shared the GPU"
    assert study["final_node_id"] in gpu_nodes


# --------------------------------------------------------------------------- (c) resume


@pytest.mark.slow
def test_a_study_killed_or_out_of_disk_at_any_point_resumes_with_the_same_command(crack_data: Path,
                                                                                  tmp_path: Path) -> None:
    """Soak: a restarted driver pod runs the same command line (--resume auto). Stopped at every
    stage, by SIGKILL (the driver and its Ray) or by a disk that fills up there (storage on a
    small tmpfs, as root; the filler is then deleted: room made), the study still finishes with
    complete outputs, every finished trial of the Optuna journal in trials.parquet with its
    epochs, no trial run twice, and the journal's best trial retrained. On the way a torn
    experiment state is set aside."""
    from test_reliability import one_error_line, tmpfs

    root = os.geteuid() == 0  # without root no tmpfs: the disk-full stops are SIGKILLs at the same points
    with tmpfs(tmp_path / "disk", "1g") if root else contextlib.nullcontext(tmp_path) as storage:
        args = ["--data", str(crack_data), "--storage-path", str(storage), "--study-name", "soak",
                "--num-samples", "3", "--max-epochs", "2", "--grace-period", "2", "--final-epochs", "2",
                "--image-size", "32", "--subset", "40", "--max-concurrent-trials", "1", "--resume", "auto"]
        study_dir = storage / "soak"

        def stopped_at(point: str, fill: bool = True, leave: int = 0) -> subprocess.CompletedProcess:
            fill = fill and root
            env = ({"CRACK_FILL_AT": point, "CRACK_FILL_DIR": str(storage), "CRACK_FILL_LEAVE": str(leave)} if fill
                   else {"CRACK_KILL_AT": point})
            proc = subprocess.run([*RUN, *args], cwd=REPO, capture_output=True, text=True, timeout=300,
                                  env={**os.environ, **env}, start_new_session=True)
            if fill:
                line = one_error_line(proc)
                assert "no space left" in line and "--resume auto" in line, line
                for filler in storage.glob("filler-*"):  # room made
                    filler.unlink()
            else:
                assert proc.returncode == -signal.SIGKILL, f"not killed at {point}: " + proc.stderr[-2000:]
            assert not (study_dir / "study.json").exists()
            return proc

        stopped_at("search-start")  # before the first trial: Ray's tuner.pkl is written, its first state is not
        assert (study_dir / "ray" / "tuner.pkl").exists() and not list((study_dir / "ray").glob("experiment_state-*"))
        stopped_at("result2")  # mid-search: trial 1 reported epoch 2 (its epoch 1 checkpoint is in Ray's snapshot)
        done = {t.number: dict(t.intermediate_values) for t in optuna_trials(study_dir, "soak") if t.state.is_finished()}

        # a torn experiment state (a snapshot cut short by the full disk): set aside, the journal goes on
        state = max((study_dir / "ray").glob("experiment_state-*.json"))  # each driver writes its own; Ray reads the newest
        state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
        proc = stopped_at("final retrain:epoch2", leave=2_000_000)  # at the final model.pt
        assert "torn or empty" in proc.stdout and "set aside" in proc.stdout, proc.stdout[-2000:]
        # the trials after the mid-search stop finished, each of their epochs once (those the torn state
        # orphaned are FAIL and re-run under a new number)
        resumed = [t for t in optuna_trials(study_dir, "soak")
                   if t.number not in done and t.state.is_finished() and "orphaned" not in t.user_attrs]
        assert resumed and all(sorted(t.intermediate_values) == [1, 2] for t in resumed)
        assert not (study_dir / "model.pt").exists() and (study_dir / "trials.parquet").exists()
        stopped_at("outputs")  # at the report: model.pt is written, its metrics not
        assert (study_dir / "model.pt").exists() and not (study_dir / "final_metrics.json").exists()

        proc = run_study(*args)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        assert all((study_dir / name).exists() for name in OUTPUTS)
        trials = pd.read_parquet(study_dir / "trials.parquet").set_index("trial_id")
        assert len(trials) == 3
        after = optuna_trials(study_dir, "soak")
        assert all(t.state.is_finished() for t in after)
        ran = [t for t in after if "orphaned" not in t.user_attrs]  # asked by a killed driver, never started
        assert len(ran) == 3 and all(t.state != optuna.trial.TrialState.FAIL for t in ran)
        for number, values in done.items():  # finished trials were not run again
            assert dict(after[number].intermediate_values) == values
        for t in ran:  # every finished trial of the journal is in the table with its epochs, each once
            row = trials.loc[t.user_attrs["ray_trial_id"]]
            assert row["status"] == t.state.name and row["epochs"] == max(t.intermediate_values)
        history = pd.read_parquet(study_dir / "history.parquet")
        assert not history.duplicated(["trial_id", "epoch"]).any()
        # the retrained trial is the rule's choice (tune.trials) on the journal-reconciled table, a
        # trial the journal holds as COMPLETE
        from tune.trials import pick_best
        chosen = json.loads((study_dir / "best_config.json").read_text())
        expected = pick_best(trials.reset_index(), reference=(chosen.get("reference") or {}).get("params"))
        assert chosen["trial_id"] == expected["trial_id"]
        [journal_trial] = [t for t in ran if t.user_attrs["ray_trial_id"] == chosen["trial_id"]]
        assert journal_trial.state == optuna.trial.TrialState.COMPLETE and chosen["params"] == journal_trial.params
        assert json.loads((study_dir / "final_metrics.json").read_text())["epochs"] == 2
        # (once finished, the same command leaves it alone: test_existing_study_is_not_overwritten_...)
        assert json.loads((study_dir / "study.json").read_text())["resumed"] is True


@pytest.mark.slow
def test_uri_storage_study_resumes_on_a_machine_without_its_local_folder(crack_data: Path, tmp_path: Path) -> None:
    # a driver pod dies: a new one (same image, empty disk) continues from the URI storage alone
    bucket, machine = tmp_path / "bucket", tmp_path / "machine"
    machine.mkdir()
    args = ["--data", str(crack_data), "--storage-path", f"file://{bucket}", "--study-name", "uri",
            "--num-samples", "3", "--max-epochs", "6", "--grace-period", "6", "--final-epochs", "1",
            "--image-size", "32", "--subset", "40", "--max-concurrent-trials", "1"]
    driver = subprocess.Popen([*RUN, *args], cwd=machine, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    remote_journal = bucket / "uri" / "outputs" / "optuna_journal.log"
    try:  # killed mid-study: one trial finished, the next one part-way (as the mirror shows them)
        deadline, finished, running = time.time() + 300, [], []
        while time.time() < deadline and not (finished and running):
            time.sleep(0.3)
            if remote_journal.exists():
                trials = optuna_trials(remote_journal.parent, "uri")
                finished = [t for t in trials if t.state.is_finished()]
                running = [t for t in trials if not t.state.is_finished() and t.intermediate_values]
        assert finished and running, "the mirrored journal never showed a finished and a running trial"
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    shutil.rmtree(machine)  # the new machine has none of the local files, and another working folder
    machine = tmp_path / "another-machine"
    machine.mkdir()
    proc = subprocess.run([*RUN, *args, "--resume"], cwd=machine, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "fetched study_config.json, optuna_journal.log" in proc.stdout
    after = optuna_trials(machine / "results" / "uri", "uri")
    ran = [t for t in after if "orphaned" not in t.user_attrs]
    assert len(ran) == 3 and all(t.state != optuna.trial.TrialState.FAIL for t in ran)
    for t in finished:  # what finished before the driver died was not run again
        assert dict(after[t.number].intermediate_values) == dict(t.intermediate_values)
    for t in running:  # the interrupted trial went on in its own Optuna record, every epoch once
        assert after[t.number].state.is_finished() and sorted(after[t.number].intermediate_values) == [1, 2, 3, 4, 5, 6]
    assert (bucket / "uri" / "outputs" / "final_metrics.json").exists()
    # and the name is taken on the URI storage, even where no local folder exists
    shutil.rmtree(machine / "results")
    proc = subprocess.run([*RUN, *args], cwd=machine, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "already exists" in proc.stderr


@pytest.mark.slow
def test_ctrl_c_in_the_last_trials_is_an_interruption_not_the_end(crack_data: Path, tmp_path: Path) -> None:
    # Ray marks the trials it stops on SIGINT as TERMINATED: the study must still count them
    # unfinished. Two trials of 2 CPUs on 2 CPUs: the second one is still pending (no results).
    args = ["--data", str(crack_data), "--storage-path", str(tmp_path), "--study-name", "ctrl-c",
            "--num-samples", "2", "--max-epochs", "10", "--grace-period", "10", "--final-epochs", "1",
            "--image-size", "32", "--subset", "40", "--cpus-per-trial", "2", "--max-concurrent-trials", "2",
            "--mlflow", f"sqlite:///{tmp_path}/mlflow.db"]
    study_dir = tmp_path / "ctrl-c"
    driver = subprocess.Popen([*RUN, *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline, reported = time.time() + 300, False
        while time.time() < deadline and not reported:
            time.sleep(0.2)
            if (study_dir / "optuna_journal.log").exists():
                reported = any(t.intermediate_values for t in optuna_trials(study_dir, "ctrl-c"))
        assert reported, "the trial reported no epoch within 300 s"
        driver.send_signal(signal.SIGINT)
        _, err = driver.communicate(timeout=300)
    finally:
        driver.kill()
    assert driver.returncode == 130 and "--resume" in err, err[-3000:]
    assert not (study_dir / "final_metrics.json").exists()
    running = [t for t in optuna_trials(study_dir, "ctrl-c") if t.intermediate_values]
    assert [t.state for t in running] == [optuna.trial.TrialState.RUNNING] and len(running[0].intermediate_values) < 10
    trials = pd.read_parquet(study_dir / "trials.parquet")
    assert trials["status"].tolist() == ["INTERRUPTED", "INTERRUPTED"], trials

    # Ray's state is code on --resume: state changed since the study wrote it is refused, before Ray starts
    from test_reliability import one_error_line

    searcher = max((study_dir / "ray").glob("searcher-state-*.pkl"))
    saved = searcher.read_bytes()
    searcher.write_bytes(saved + b"planted")
    line = one_error_line(run_study(*args, "--resume", timeout=120))
    assert "searcher-state-" in line and "--trust-changed-state" in line, line
    searcher.write_bytes(saved)

    proc = run_study(*args, "--resume")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    for trial in optuna_trials(study_dir, "ctrl-c"):
        assert trial.state == optuna.trial.TrialState.COMPLETE and sorted(trial.intermediate_values) == list(range(1, 11))
    trials = pd.read_parquet(study_dir / "trials.parquet")
    assert trials["status"].tolist() == ["COMPLETE"] * 2 and (study_dir / "final_metrics.json").exists()
    # MLflow: the resumed study went on in its experiment, each trial in its own run (the interrupted
    # one included), every epoch once
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("ctrl-c").experiment_id], "tags.role = 'trial'")
    assert sorted(r.data.tags["trial_id"] for r in runs) == sorted(trials["trial_id"])
    for r in runs:
        assert r.info.status == "FINISHED"
        assert sorted(m.step for m in client.get_metric_history(r.info.run_id, "val_acc")) == list(range(1, 11))


# --------------------------------------------------------------------------- (d) fault injection


@pytest.mark.slow
def test_crashed_trial_resumes_from_its_checkpoint(crack_data: Path, tmp_path: Path) -> None:
    faults = tmp_path / "faults"
    proc = run_study("--data", str(crack_data), "--storage-path", str(tmp_path), "--study-name", "faulty",
                     "--num-samples", "2", "--max-epochs", "3", "--grace-period", "3", "--final-epochs", "1",
                     "--image-size", "32", "--subset", "40",
                     env={"CRACK_FAULT_EPOCH": "2", "CRACK_FAULT_DIR": str(faults)})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert len(list(faults.glob("*.failed"))) == 2, "each trial should have failed once"
    trials = pd.read_parquet(tmp_path / "faulty" / "trials.parquet")
    assert (trials["status"] == "COMPLETE").all() and (trials["epochs"] == 3).all()
    # resumed from the epoch-1 checkpoint: epoch 1 is not trained again (a restart from scratch
    # would report it twice), epochs 2 and 3 once each
    assert sorted(reported_epochs(tmp_path / "faulty").values()) == [[1, 2, 3]] * 2
    # checkpoints after epochs 1 and 2, none after the last; none left once the trials finished
    study = json.loads((tmp_path / "faulty" / "study.json").read_text())
    history = pd.read_parquet(tmp_path / "faulty" / "history.parquet")
    assert (history["checkpoint_bytes"] > 0).tolist() == [e < 3 for e in history["epoch"]]
    footprint = study["footprint"]
    assert footprint["checkpoint_bytes_written"] == history["checkpoint_bytes"].sum()
    assert 0 < footprint["checkpoint_bytes_peak"] <= 2 * study["trial_slots"] * footprint["checkpoint_bytes_largest"]
    assert not list((tmp_path / "faulty" / "ray").rglob("checkpoint_*"))
    # ... and exactly: each resumed trial's epochs equal an uninterrupted run of its settings
    from crackcore.config import TrainConfig, TrialParams, trial_config
    from crackcore.data import prepare_data
    from crackcore.train import fit
    from tune.trainable import within_resources

    train = TrainConfig(**json.loads((tmp_path / "faulty" / "study_config.json").read_text())["train"])
    data = prepare_data(train)
    columns = ["train_loss", "train_acc", "val_loss", "val_acc"]
    for trial_id, rows in pd.read_parquet(tmp_path / "faulty" / "history.parquet").groupby("trial_id"):
        first = rows.iloc[0]
        params = TrialParams(lr=float(first.lr), freeze_depth=int(first.freeze_depth), augment_policy=str(first.augment_policy))
        whole = fit(within_resources(trial_config(train, params, 3), cpus=1, gpus=0), data, log=None)
        pd.testing.assert_frame_equal(rows.sort_values("epoch")[columns].reset_index(drop=True),
                                      whole.history[columns].reset_index(drop=True), check_dtype=False)


# --------------------------------------------------------------------------- (e) bad input


@pytest.mark.parametrize("args, message", [
    (["--num-samples", "0"], "--num-samples must be >= 1"),
    (["--address", "127.0.0.1:1"], "cannot reach a Ray cluster at 127.0.0.1:1"),
    (["--data", "/nonexistent/crack-data"], "data folder /nonexistent/crack-data does not exist"),
    (["--config", "/nonexistent.toml"], "experiment file /nonexistent.toml does not exist"),
    (["--gpus-per-trial", "1.5"], "above 1 Ray needs whole GPUs"),
    (["--address", "ray://10.0.0.1:10001"], "Ray Client (ray://) is not supported"),
    (["--smoke-test", "--weights", "/nonexistent/resnet18.pth"], "weights file /nonexistent/resnet18.pth does not exist"),
    (["--smoke-test", "--cpus-per-trial", "64"], "one trial needs 64 CPU"),
    (["--smoke-test", "--study-name", ".."], "is not a folder name"),
    (["--data", "a=/x", "--data", "a=/y"], "data source name 'a' is given twice"),
    (["--data", "a=/x", "--val-source", "b"], "val_source='b' names no data source"),
    (["--eval", "site=/nonexistent/site"], "data folder /nonexistent/site does not exist"),
    (["--leave-one-out"], "leave-one-out needs at least two data sources"),
    (["--address", "nonsense"], "--address nonsense is not HOST:PORT"),
    (["--resume", "sometimes"], "--resume takes no value, or 'auto'"),
    (["--max-epochs", "2", "--grace-period", "3"], "grace_period=3 must be between 1 and max_epochs=2"),
    # checked before Ray starts (the unreachable --address would be the error otherwise); as root, MLflow
    # itself would create the missing folder (tests/test_tracking.py: bogus://x and the same with crackcore.fit)
    (["--mlflow", "sqlite:////nonexistent/dir/x.db", "--address", "127.0.0.1:1"],
     "--mlflow sqlite:////nonexistent/dir/x.db: folder /nonexistent/dir does not exist"),
])
def test_bad_input_fails_with_one_clear_line(args: list[str], message: str, tmp_path: Path) -> None:
    proc = run_study(*args, "--storage-path", str(tmp_path), timeout=120)
    assert proc.returncode == 1
    lines = [l for l in proc.stderr.splitlines() if l.startswith("error: ")]
    assert len(lines) == 1 and message in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not any(tmp_path.iterdir()), "nothing may be written on bad input"


def test_unknown_flag_is_a_usage_error() -> None:
    proc = run_study("--num-trials", "3", timeout=60)
    assert proc.returncode == 2 and "unrecognized arguments: --num-trials" in proc.stderr


def test_existing_study_is_not_overwritten_and_resume_needs_a_study(tiny_study: Path, tmp_path: Path) -> None:
    before = (tiny_study / "trials.parquet").read_bytes()
    proc = run_study("--smoke-test", "--storage-path", str(tiny_study.parent), "--study-name", "tiny", timeout=180)
    assert proc.returncode == 1 and "already exists" in proc.stderr and "--resume" in proc.stderr
    assert (tiny_study / "trials.parquet").read_bytes() == before
    proc = run_study("--smoke-test", "--storage-path", str(tmp_path), "--study-name", "never-ran", "--resume", timeout=180)
    assert proc.returncode == 1 and "no study to resume" in proc.stderr
    # a flag that disagrees with the saved study would be ignored by --resume: refused instead
    resume = ["--storage-path", str(tiny_study.parent), "--study-name", "tiny", "--resume"]
    proc = run_study(*resume, "--subset", "99", timeout=180)
    assert proc.returncode == 1 and "train.subset is 60 there, not 99" in proc.stderr, proc.stderr[-2000:]
    model = (tiny_study / "model.pt").read_bytes()
    proc = run_study(*resume, "--no-reference", timeout=180)  # its reference retrain has begun (and ended)
    assert proc.returncode == 1 and "reference retrain already began" in proc.stderr.strip().splitlines()[-1]
    proc = run_study(*resume, "--subset", "60", timeout=180)  # agreeing flags are fine; a finished study stays as is
    assert proc.returncode == 0 and "nothing to resume" in proc.stdout, proc.stderr[-2000:]
    assert (tiny_study / "model.pt").read_bytes() == model and (tiny_study / "trials.parquet").read_bytes() == before


def test_default_named_rerun_gets_a_new_name(tmp_path: Path, crack_data: Path) -> None:
    storage = tmp_path / "results"
    (storage / "smoke").mkdir(parents=True)
    (storage / "smoke" / "study_config.json").write_text("{}")  # an earlier default-named study
    (storage / "smoke" / "optuna_journal.log").write_text("")
    (tmp_path / "smoke.toml").write_text('name = "smoke"\n')
    proc = run_study("--smoke-test", "--config", str(tmp_path / "smoke.toml"), "--storage-path", str(storage),
                     "--data", str(crack_data), "--num-samples", "1", "--final-epochs", "1", timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "this run is study 'smoke-2'" in proc.stdout
    assert (storage / "smoke" / "study_config.json").read_text() == "{}"
    assert (storage / "smoke-2" / "final_metrics.json").exists()


# --------------------------------------------------------------------------- honest evaluation


@pytest.mark.slow
def test_seed_repeats_rank_the_top_configs(crack_data: Path, tmp_path: Path) -> None:
    # the study itself on the grouped split; --compare-splits retrains the winner under random
    proc = run_study("--smoke-test", "--data", str(crack_data), "--storage-path", str(tmp_path), "--study-name", "rep",
                     "--repeat-top", "2", "--repeats", "2", "--compare-splits", "--split-strategy", "grouped",
                     "--no-reference")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    study_dir = tmp_path / "rep"
    from tune.trials import rank_repeats, rank_trials

    trials = pd.read_parquet(study_dir / "trials.parquet")
    best = json.loads((study_dir / "best_config.json").read_text())
    ranked = rank_trials(trials, "val_acc", best["reference"]["params"])
    tie_set = ranked.loc[ranked["tied"], "trial_id"].tolist()
    assert best["tie_set"] == tie_set
    if len(tie_set) < 2:  # nothing the seeds could separate: the single-seed rule chose
        assert not (study_dir / "repeats.parquet").exists() and best["trial_id"] == tie_set[0]
    else:
        repeats = pd.read_parquet(study_dir / "repeats.parquet")
        assert repeats["trial_id"].drop_duplicates().tolist() == tie_set[:2]  # the tie set, in the rule's order
        assert (repeats.groupby("trial_id")["seed"].nunique() == 2).all() and repeats["seed"].is_unique
        assert repeats["val_acc"].between(0, 1).all()
        again = rank_repeats(repeats.drop(columns=["mean_val_acc", "ci95_low", "ci95_high", "mean_val_loss", "rule_score",
                                                   "rule_se", "tied"]), "val_acc", best["reference"]["params"])
        assert best["trial_id"] == again["trial_id"].iloc[0] and "seeds" in best["rule"]
        assert best["repeats"]["mean_val_loss"] == pytest.approx(repeats.groupby("trial_id")["val_loss"].mean()[best["trial_id"]])
        assert best["repeats"]["configs_repeated"] == repeats["trial_id"].nunique()
        assert repeats["ci95_low"].between(0, 1).all() and repeats["ci95_high"].between(0, 1).all()
    split = pd.read_parquet(study_dir / "split.parquet")
    assert split.groupby("group")["split"].nunique().max() == 1  # near-duplicate groups never straddle splits
    assert json.loads((study_dir / "final_metrics.json").read_text())["split_strategy"] == "grouped"
    comparison = json.loads((study_dir / "final_metrics.json").read_text())["split_comparison"]
    assert set(comparison) == {"random", "grouped"}
    for side in comparison.values():
        assert 0 <= side["ci95_low"] <= side["test_accuracy"] <= side["ci95_high"] <= 1 and side["n_test"] > 0
    assert comparison["grouped"]["test_images_with_near_duplicate_in_train"] == 0  # grouped never leaks


@pytest.mark.slow
def test_diverged_trials_are_recorded_not_retried(crack_data: Path, tmp_path: Path) -> None:
    # every trial's loss turns non-finite in epoch 2: no Ray retries (divergence repeats), each
    # trial reported as the worst result (DIVERGED, a value Optuna keeps), and the study stops
    # with one line saying why
    faults = tmp_path / "faults"
    proc = run_study("--data", str(crack_data), "--storage-path", str(tmp_path), "--study-name", "diverge",
                     "--num-samples", "2", "--max-epochs", "3", "--grace-period", "3", "--image-size", "32",
                     "--subset", "40", env={"CRACK_DIVERGE_EPOCH": "2", "CRACK_FAULT_DIR": str(faults)})
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-3000:]
    [line] = [l for l in proc.stderr.splitlines() if l.startswith("error: ")]
    assert "every trial that reported diverged" in line
    assert sorted(f.read_text() for f in faults.glob("*.diverged")) == ["2\n", "2\n"], "diverged once each"
    trials = pd.read_parquet(tmp_path / "diverge" / "trials.parquet")
    assert trials["status"].tolist() == ["DIVERGED", "DIVERGED"] and trials["error"].isna().all()
    assert (trials["last_val_acc"] == 0).all() and (trials["epochs"] == 2).all()
    history = pd.read_parquet(tmp_path / "diverge" / "history.parquet")
    assert sorted(history["epoch"]) == [1, 1, 2, 2] and history.loc[history["epoch"] == 2, "train_loss"].isna().all()
    pruned = [t for t in optuna_trials(tmp_path / "diverge", "diverge")]
    assert [t.state for t in pruned] == [optuna.trial.TrialState.PRUNED] * 2
    assert all(t.intermediate_values[2] == 0.0 for t in pruned)


def test_start_points_fit_the_space_or_are_skipped(capsys) -> None:
    from crackcore.config import StudyConfig
    from tune.search import search_space, start_points

    searched = StudyConfig(space={"weight_decays": [0.0, 1e-4]})  # the start point names no weight_decay
    assert start_points(searched, search_space(searched)) == [
        {"lr": 1e-3, "freeze_depth": 0, "augment_policy": "flip", "weight_decay": 1e-4}]
    narrowed = StudyConfig(space={"augment_policies": ["none", "color"], "freeze_depths": [1, 3, 5]})
    assert start_points(narrowed, search_space(narrowed)) == []
    assert "outside the search space" in capsys.readouterr().err


def test_gpu_profile_and_gpus_per_trial_resolve_by_precedence(tmp_path: Path) -> None:
    from crackcore.config import StudyConfig
    from tune.settings import build_parser, resolve_config

    def resolve(flags: list[str], has_gpu: bool, **file: Any) -> StudyConfig:
        return resolve_config(build_parser().parse_args(flags), StudyConfig(**file), has_gpu)

    assert resolve([], has_gpu=True).gpus_per_trial == 0.25  # GPUs and no setting: 4 trials per GPU
    assert resolve(["--gpus-per-trial", "0"], has_gpu=True).gpus_per_trial == 0  # explicit 0: trials on CPUs
    assert resolve(["--gpus-per-trial", "0.5"], has_gpu=False).gpus_per_trial == 0  # no GPU in the cluster
    profiled = resolve([], has_gpu=True, gpu={"gpus_per_trial": 1, "max_epochs": 10}, cpu={"max_epochs": 4})
    assert (profiled.gpus_per_trial, profiled.max_epochs) == (1, 10)
    assert resolve([], has_gpu=True, gpu={"gpus_per_trial": 0.0}).gpus_per_trial == 0  # the file's explicit 0
    assert resolve(["--max-epochs", "2"], has_gpu=False, cpu={"max_epochs": 4}).max_epochs == 2


def test_best_trial_rule_on_a_hand_made_table() -> None:
    from tune.trials import pick_best

    table = pd.DataFrame([
        # trial_id, status, epochs, last_val_acc, last_val_loss
        ("a", "PRUNED", 1, 0.99, 0.10),     # best accuracy, but stopped early
        ("b", "COMPLETE", 4, 0.95, 0.30),
        ("c", "COMPLETE", 4, 0.95, 0.20),   # ties b on accuracy, lower loss: chosen
        ("d", "DIVERGED", 4, 0.0, float("nan")),
        ("e", "ERROR", 0, float("nan"), float("nan")),
    ], columns=["trial_id", "status", "epochs", "last_val_acc", "last_val_loss"])
    assert pick_best(table)["trial_id"] == "c"
    assert pick_best(table[table["status"] != "COMPLETE"])["trial_id"] == "a"  # none complete: best that reported
    with pytest.raises(Exception, match="diverged"):
        pick_best(table[table["trial_id"].isin(["d", "e"])])


def test_data_source_order_flag_env_download_folder_file_then_embedded_sample(tmp_path: Path, monkeypatch,
                                                                             capsys) -> None:
    import crackcore.sources
    import tune.settings as run
    from crackcore.config import StudyConfig, TrainConfig
    from crackcore.data import prepare_data
    from crackcore.sources import EMBEDDED_SAMPLE

    def data_of(flags: list[str], file: dict | None = None) -> str | None:
        a = run.build_parser().parse_args(flags)
        return run.resolve_config(a, StudyConfig(train=file or {}), has_gpu=False).train.data

    downloaded = tmp_path / "data" / "concrete-crack-images"
    monkeypatch.setattr(crackcore.sources, "DOWNLOADED", downloaded)
    monkeypatch.delenv("CRACK_DATA", raising=False)
    assert data_of([]) == str(EMBEDDED_SAMPLE)  # nothing anywhere: the real sample shipped in the package
    assert data_of([], {"data": "/from/file"}) == "/from/file"  # the experiment file comes before it
    assert data_of(["--data", "synthetic"]) == "synthetic"  # the procedural set, asked for by name
    downloaded.mkdir(parents=True)
    assert data_of([]) == str(downloaded)
    monkeypatch.setenv("CRACK_DATA", "/from/env")
    assert data_of([]) == "/from/env" and data_of(["--data", "/from/flag"]) == "/from/flag"
    monkeypatch.chdir(tmp_path)  # a relative or slashed path is saved resolved, one spelling per folder
    assert data_of(["--data", "data/concrete-crack-images/"]) == str(downloaded.resolve())

    saved = StudyConfig(train={"data": str(downloaded.resolve())})
    same = run.build_parser().parse_args(["--data", "./data/concrete-crack-images", "--resume"])
    assert run.resume_conflicts(same, saved, saved) == []
    other = run.build_parser().parse_args(["--data", "/elsewhere", "--resume"])
    assert run.resume_conflicts(other, saved, saved) == [f"train.data is {str(downloaded.resolve())!r} there, not '/elsewhere'"]
    # the embedded sample says what it is; the synthetic set is said loudly and recorded as synthetic
    capsys.readouterr()
    data = prepare_data(TrainConfig(data=str(EMBEDDED_SAMPLE), image_size=32, subset=40))
    n = sum(1 for _ in EMBEDDED_SAMPLE.glob("*/*.jpg"))
    assert data.source["kind"] == "real" and list(data.source["sources"]) == ["concrete"]
    assert f"embedded real sample: {n} images, Özgenel 2019, CC BY 4.0" in capsys.readouterr().err
    data = prepare_data(TrainConfig(data="synthetic", image_size=32, synthetic_per_class=20))
    assert data.source["kind"] == "synthetic" and "SYNTHETIC" in capsys.readouterr().err.upper()


def test_embedded_sample_is_balanced_small_licensed_and_follows_its_rule(crack_data: Path) -> None:
    import importlib.util

    from conftest import SHARED_SAMPLE
    from crackcore.sources import EMBEDDED_SAMPLE

    files = sorted(p for p in EMBEDDED_SAMPLE.rglob("*.jpg"))
    per_class = {c: sum(p.parent.name == c for p in files) for c in ("Positive", "Negative")}
    assert per_class["Positive"] == per_class["Negative"] and 2 * per_class["Positive"] == len(files) <= 2000
    assert sum(p.stat().st_size for p in files) <= 15_000_000
    sums = dict(line.split("  ")[::-1] for line in (EMBEDDED_SAMPLE / "SHA256SUMS").read_text().splitlines())
    assert sums == {f"{p.parent.name}/{p.name}": hashlib.sha256(p.read_bytes()).hexdigest() for p in files}
    readme = (EMBEDDED_SAMPLE / "README.md").read_text()
    assert "CC BY 4.0" in readme and "doi:10.17632/5y9wdsg2zt.2" in readme and "tools/embedded_sample.py" in readme
    if crack_data.resolve() != SHARED_SAMPLE.resolve():
        pytest.skip(f"the 6,000-image source sample is not the test data ({crack_data}): the rule is checked on it")
    spec = importlib.util.spec_from_file_location("embedded_sample", REPO / "tools" / "embedded_sample.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.main([str(crack_data), "--check"]) == 0  # the same files, byte for byte, as the seeded rule draws


def test_study_selects_on_a_held_out_source_and_reports_each_source(crack_data: Path, walls: dict[str, Path],
                                                                      tmp_path: Path) -> None:
    proc = run_study("--smoke-test", "--data", f"concrete={crack_data}", "--data", f"masonry={walls['masonry']}",
                     "--data", f"quay={walls['quay-wall']}", "--val-source", "masonry", "--test-source", "quay",
                     "--group-by", "^(.*)__", "--eval", f"site={walls['quay-wall']}", "--leave-one-out",
                     "--storage-path", str(tmp_path), "--study-name", "sources", "--weights", "random",
                     "--no-reference")  # the lift is tiny_study's test; here it would only add a retrain
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    study_dir = tmp_path / "sources"
    assert not json.loads((study_dir / "final_metrics.json").read_text())["reference"]["retrained"]
    assert not (study_dir / "reference_predictions.parquet").exists()
    split = pd.read_parquet(study_dir / "split.parquet")
    assert set(split.loc[split["source"] == "masonry", "split"]) == {"val"}
    assert set(split.loc[split["source"] == "quay", "split"]) == {"test"}
    assert set(split.loc[split["source"] == "site", "split"]) == {"external"}
    # every trial and the choice of the best were scored on the masonry images alone
    history = pd.read_parquet(study_dir / "history.parquet")
    assert (history["val_acc"] == history["val_acc_masonry"]).all() and "val_acc_concrete" in history
    trials = pd.read_parquet(study_dir / "trials.parquet")
    last = history.sort_values("epoch").groupby("trial_id").last()
    best = json.loads((study_dir / "best_config.json").read_text())
    complete = trials[trials["status"] == "COMPLETE"]["trial_id"]
    assert last.loc[best["trial_id"], "val_acc_masonry"] == last.loc[complete, "val_acc_masonry"].max()
    assert "masonry" in best["selection"] and "masonry" in json.loads((study_dir / "study.json").read_text())["selection"]
    metrics = json.loads((study_dir / "final_metrics.json").read_text())
    assert set(metrics["per_source"]) == {"masonry", "quay"} and set(metrics["external"]) == {"site"}
    assert "quay, held out, final evaluation only: accuracy" in proc.stdout and "external site: accuracy" in proc.stdout
    loso = pd.read_parquet(study_dir / "loso.parquet")
    assert loso["held_out_source"].tolist() == ["concrete", "masonry", "quay"]
    from crackcore.results import load_study

    s = load_study(study_dir)
    assert len(s.loso) == 3 and s.per_set()["set"].tolist() == ["test split", "masonry", "quay", "site"]
    from tune.report import main as report_main

    assert report_main([str(study_dir)]) == 0
    assert (study_dir / "report" / "per_set.png").is_file()
    assert "## Other structures" in (study_dir / "report" / "report.md").read_text()


def test_a_storage_path_under_a_file_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a folder")
    proc = run_study("--smoke-test", "--storage-path", str(tmp_path / "file" / "studies"), timeout=120)
    assert proc.returncode == 1 and "is a file, not a folder; pass a folder" in proc.stderr
    assert "Traceback" not in proc.stderr
