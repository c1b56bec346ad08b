"""Faults a user meets on a real machine: a full disk, a read-only folder, a write cut short.
Each ends in one clear line and leaves the study resumable. Disk-full and read-only cases
use a small tmpfs, which needs root (CI runs as root)."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import optuna
import pytest

from crackcore.journal import open_journal
from crackcore.results import load_study
from crackcore.studyfiles import JOURNAL

REPO = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs as a full disk needs root (CI runs as root)")
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def remount(path: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(path)], check=True)


def cli(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env={**os.environ, **(env or {})})


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


def journal_with_trials(folder: Path, n: int) -> optuna.Study:
    study = optuna.create_study(study_name="s", storage=open_journal(folder, writer=True), direction="maximize")
    for k in range(n):
        study.enqueue_trial({"x": float(k)})
        study.optimize(lambda t: t.suggest_float("x", 0, 10), n_trials=1)
    return study


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_bytes().splitlines()]  # raises on a damaged record


# --------------------------------------------------------------------------- the Optuna journal


def test_a_torn_journal_tail_is_cut_when_the_search_reopens_it(tmp_path: Path, capsys) -> None:
    journal_with_trials(tmp_path, 3)
    path = tmp_path / JOURNAL
    whole = path.read_bytes()
    path.write_bytes(whole + b'{"op_code":4,"worker_id":"x","study_id":0,"datetime_st')  # a write cut short
    reader = optuna.load_study(study_name="s", storage=open_journal(tmp_path))  # a report reads, never repairs
    assert len(reader.trials) == 3 and path.read_bytes() != whole
    study = optuna.load_study(study_name="s", storage=open_journal(tmp_path, writer=True))
    assert "cut a torn last record" in capsys.readouterr().err and path.read_bytes() == whole
    study.optimize(lambda t: t.suggest_float("x", 0, 10), n_trials=1)  # appends after the last whole record
    assert len(optuna.load_study(study_name="s", storage=open_journal(tmp_path)).trials) == 4
    assert len(records(path)) > 0


def test_a_damaged_record_before_the_tail_is_an_error_not_a_silent_cut(tmp_path: Path) -> None:
    journal_with_trials(tmp_path, 2)
    path = tmp_path / JOURNAL
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:2] + [b'{"op_code":\n'] + lines[2:]))
    with pytest.raises(Exception, match="damaged at record 3"):
        open_journal(tmp_path, writer=True)


def test_an_append_on_a_full_disk_leaves_whole_records(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "disk", "64k") as disk:
        study = journal_with_trials(disk, 1)
        (disk / "filler").write_bytes(b"\0" * (64 * 1024 - (disk / JOURNAL).stat().st_size - 4096 - 200))
        with pytest.raises(OSError) as failed:
            for _ in range(200):
                study.optimize(lambda t: t.suggest_float("x", 0, 10), n_trials=1)
        assert failed.value.errno == 28 and failed.value.filename == str(disk / JOURNAL)
        written = records(disk / JOURNAL)  # every record whole: nothing torn after the last one
        (disk / "filler").unlink()
        resumed = optuna.load_study(study_name="s", storage=open_journal(disk, writer=True))
        resumed.optimize(lambda t: t.suggest_float("x", 0, 10), n_trials=1)
        assert len(records(disk / JOURNAL)) > len(written)


# --------------------------------------------------------------------------- full disk, read-only folders


@pytest.mark.slow
def test_a_study_stopped_by_a_full_disk_is_one_line_and_resumes(crack_data: Path, tmp_path: Path) -> None:
    # grace period = max epochs: no ASHA rung at epoch 1, so each trial writes its checkpoint there
    args = ["tune/run.py", "--smoke-test", "--data", str(crack_data), "--subset", "40", "--num-samples", "2",
            "--grace-period", "2", "--final-epochs", "1", "--study-name", "full", "--resume", "auto"]
    with tmpfs(tmp_path / "disk", "3m") as disk:
        line = one_error_line(cli(*args, "--storage-path", str(disk)))
        assert "no space left" in line and "--resume auto" in line and str(disk) in line
        records(disk / "full" / JOURNAL)
        remount(disk, "size=1g")  # room made: the same command goes on
        proc = cli(*args, "--storage-path", str(disk))
        assert proc.returncode == 0, proc.stderr[-3000:]
        s = load_study(disk / "full")
        assert not s.missing and len(s.trials) == 2 and s.final_metrics["epochs"] == 1


def test_a_full_decode_cache_is_one_line_and_leaves_no_temp_file(crack_data: Path, tmp_path: Path) -> None:
    with tmpfs(tmp_path / "disk", "3m") as disk:  # was: SIGBUS (exit 135, no message) and a .tmp.npy left
        proc = cli("-m", "crackcore.fit", "--data", str(crack_data), "--subset", "300", "--image-size", "160",
                   "--weights", "random", "--out", str(tmp_path / "run"), env={"CRACK_CACHE": str(disk)})
        line = one_error_line(proc)
        assert "no space left" in line and "decode cache" in line and "CRACK_CACHE" in line
        assert not list(disk.rglob("*.tmp*")) and not (tmp_path / "run").exists()


def test_read_only_folders_are_one_line_before_any_work(tiny_study: Path, tmp_path: Path) -> None:
    with tmpfs(tmp_path / "ro", "256m") as ro:
        shutil.copytree(tiny_study, ro / "tiny", ignore=shutil.ignore_patterns("ray", "report"))
        remount(ro, "ro")
        line = one_error_line(cli("tune/run.py", "--smoke-test", "--storage-path", str(ro / "studies")))
        assert "read-only file system" in line and "--storage-path" in line
        line = one_error_line(cli("-m", "crackcore.fit", "--out", str(ro / "run")))
        assert "read-only file system" in line and "--out" in line
        line = one_error_line(cli("-m", "crackcore.fit", "--out", str(tmp_path / "run"), env={"CRACK_CACHE": str(ro)}))
        assert "read-only file system" in line and "CRACK_CACHE" in line
        line = one_error_line(cli("tune/report.py", str(ro / "tiny")))
        assert "read-only file system" in line and "report" in line


def test_report_of_a_study_stopped_mid_search_counts_the_journal_trials(tiny_study: Path, tmp_path: Path) -> None:
    stopped = tmp_path / "tiny"
    shutil.copytree(tiny_study, stopped, ignore=shutil.ignore_patterns("ray", "report"))
    for name in ("trials.parquet", "history.parquet", "study.json"):
        (stopped / name).unlink()
    s = load_study(stopped)
    assert len(s.trials) == 4 and s.trials_from == JOURNAL and set(s.trials["status"]) <= {"COMPLETE", "PRUNED"}
    proc = cli("tune/report.py", str(stopped))
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = (stopped / "report" / "report.md").read_text()
    assert "- trials: 4 (" in text and "read from the Optuna journal" in text
