"""Where a study's files live. Local storage: one folder, results/<study>/, holds Ray's
experiment (ray/), the Optuna journal and every output. URI storage (s3://, gs://, file://):
Ray keeps its experiment at URI/<study>/ray, our files are written to ./results/<study>/ and
mirrored to URI/<study>/outputs: the config at the start, the journal at every snapshot Ray
takes of its experiment, everything at the end. So a driver on another machine can `--resume`
the study, in any working folder: it fetches config and journal back, Ray restores from the
URI, and the restored searcher opens the fetched journal (tune.search pickles it by reference)."""
from __future__ import annotations

import os
import sys
import threading
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
from ray import tune

from crackcore.config import StudyConfig
from crackcore.exceptions import StorageError, StudyError
from crackcore.faults import kill_point
from crackcore.results import JOURNAL

RAY_DIR = "ray"  # Ray's own experiment folder inside the study folder
CONFIG_FILE = "study_config.json"
OUTPUTS_DIR = "outputs"
RESUME_FILES = (CONFIG_FILE, JOURNAL)  # what a driver needs to --resume a study


def ray_storage(cfg: StudyConfig, storage_path: str) -> tuple[Path, str]:
    """(local study folder, Ray storage_path). A URI (s3://, gs://, file://) keeps Ray's folder
    (checkpoints, trial results) on shared storage; our files are written to ./results/<name>
    and mirrored to URI/<name>/outputs (see sync_outputs)."""
    if "://" in storage_path:
        return Path("results").resolve() / cfg.name, f"{storage_path.rstrip('/')}/{cfg.name}"
    study_dir = Path(storage_path).expanduser().resolve() / cfg.name
    blocked = next((p for p in study_dir.parents if p.exists() and not p.is_dir()), None)
    if blocked:
        raise StudyError(f"--storage-path {storage_path}: {blocked} is a file, not a folder; pass a folder")
    return study_dir, str(study_dir)


def _remote_file(storage: str, name: str) -> tuple[pafs.FileSystem, str] | None:
    """(filesystem, path) of URI/<name>/outputs/<file>, or None for local storage."""
    if "://" not in storage:
        return None
    fs, root = pafs.FileSystem.from_uri(f"{storage}/{OUTPUTS_DIR}")
    return fs, f"{root}/{name}"


def _exists(remote: tuple[pafs.FileSystem, str]) -> bool:
    return remote[0].get_file_info(remote[1]).type != pafs.FileType.NotFound


def sync_outputs(study_dir: Path, storage: str, names: tuple[str, ...] | None = None) -> None:
    """Mirror study files to URI storage: the config and the Optuna journal while the study
    runs (a driver on another machine can then --resume it), every output at the end."""
    if "://" not in storage:
        return
    if names is None:
        pafs.copy_files(str(study_dir), f"{storage}/{OUTPUTS_DIR}")
        return
    for name in names:
        fs, path = _remote_file(storage, name)
        fs.create_dir(path.rpartition("/")[0], recursive=True)
        if (study_dir / name).is_file():
            pafs.copy_files(str(study_dir / name), path, destination_filesystem=fs)


def fetch_saved_study(study_dir: Path, storage: str) -> bool:
    """On a machine without the local study folder, get config + journal back from URI storage."""
    remote = _remote_file(storage, CONFIG_FILE)
    if remote is None or not _exists(remote):
        return False
    study_dir.mkdir(parents=True, exist_ok=True)
    for name in RESUME_FILES:
        fs, path = _remote_file(storage, name)
        if _exists((fs, path)):
            pafs.copy_files(path, str(study_dir / name), source_filesystem=fs)
    return True


def study_started(study_dir: Path, storage: str) -> bool:
    """A study ran here (its Optuna journal or Ray's folder exist, locally or on URI storage):
    never overwrite it. A folder holding only study_config.json is a start that failed before
    the search began."""
    if (study_dir / RAY_DIR).exists() or (study_dir / JOURNAL).exists():
        return True
    remote = _remote_file(storage, JOURNAL)
    return remote is not None and (_exists(remote) or tune.Tuner.can_restore(f"{storage}/{RAY_DIR}"))


class DropFinishedCheckpoints(tune.Callback):
    """Delete a trial's checkpoint once the trial has finished (complete, stopped by ASHA,
    diverged, or out of retries): nothing resumes a finished trial, and the best one is retrained
    from scratch. An interrupted trial keeps its checkpoint for --resume. A checkpoint goes only
    after Ray's next experiment snapshot (get_state) records its trial as finished: a driver killed
    in between resumes from a snapshot that never points at a deleted checkpoint."""

    def __init__(self) -> None:
        self.finished: list[Any] = []  # checkpoints of trials finished since the last snapshot
        self.recorded: list[Any] = []  # ... and those a snapshot has recorded as finished

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.finished += [trial.checkpoint] if trial.checkpoint else []

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.finished += [trial.checkpoint] if trial.checkpoint else []

    def get_state(self) -> None:
        self.recorded, self.finished = self.recorded + self.finished, []
        return None  # nothing for Ray to save

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        self._drop(self.recorded)
        self.recorded = []

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self._drop(self.recorded + self.finished)

    def _drop(self, checkpoints: list[Any]) -> None:
        for saved in checkpoints:
            try:
                saved.filesystem.delete_dir(saved.path)
            except OSError as exc:  # already gone, or storage unreachable: the study goes on
                print(f"warning: could not delete a finished trial's checkpoint {saved.path}: {exc}", file=sys.stderr)


def checkpoint_bytes(experiment: Path) -> int:
    """Bytes of every trial checkpoint in Ray's experiment folder at this moment, those being written included."""
    total = 0
    for trial in os.scandir(experiment) if experiment.is_dir() else ():
        for saved in os.scandir(trial.path) if trial.is_dir() else ():
            if saved.name.startswith("checkpoint_"):
                for root, _, files in os.walk(saved.path):
                    total += sum(os.stat(os.path.join(root, f)).st_size for f in files)
    return total


class CheckpointWatch:
    """The peak of the checkpoint bytes a search holds on local storage, sampled every `every`
    seconds in a thread of the driver (a few dozen stats; it is what the disk actually held,
    Ray's copy of a new checkpoint before it drops the trial's older one included). URI
    storage is not sampled: listing a bucket that often costs requests; peak is None then."""

    def __init__(self, experiment: str, every: float = 0.1) -> None:
        self.experiment = None if "://" in experiment else Path(experiment)
        self.every, self.peak = every, None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="checkpoint-watch", daemon=True)

    def _sample(self) -> None:
        while True:
            try:
                self.peak = max(self.peak or 0, checkpoint_bytes(self.experiment))
            except OSError:  # a folder Ray deleted between scandir and stat: sample again
                pass
            if self._stop.wait(self.every):
                return

    def __enter__(self) -> "CheckpointWatch":
        if self.experiment is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


class SyncStudyFiles(tune.Callback):
    """Mirror the resume files to URI storage at each of Ray's experiment snapshots. Ray calls
    get_state() after saving the searcher (which maps Ray trials to Optuna trial ids) and
    before uploading the snapshot, so the uploaded journal always holds every trial the
    uploaded searcher knows: a driver on another machine resumes both consistently."""

    def __init__(self, study_dir: Path, storage: str):
        self.study_dir, self.storage = study_dir, storage

    def get_state(self) -> None:
        try:
            sync_outputs(self.study_dir, self.storage, RESUME_FILES)
        except OSError as exc:  # a storage hiccup must not end the study; the next snapshot retries
            print(f"warning: could not mirror {', '.join(RESUME_FILES)} to {self.storage}: {exc}", file=sys.stderr)
        return None  # nothing for Ray to save: the files are the state


class KillPoints(tune.Callback):
    """crackcore.faults kill points inside Ray's experiment loop, for the reliability tests."""

    def __init__(self) -> None:
        self.results = 0

    def setup(self, **info: Any) -> None:
        kill_point("search-start")  # tuner.pkl is written, the first experiment state is not

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        self.results += 1
        kill_point(f"result{self.results}")  # before Ray snapshots this result


def has_experiment_state(experiment: str) -> bool:
    """Ray's experiment folder holds a snapshot to restore (an experiment_state-*.json), not
    just the tuner.pkl it writes before the first one."""
    fs, root = _filesystem(experiment)
    try:
        found = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    except OSError:
        return False
    return any(Path(f.path).name.startswith("experiment_state-") and f.path.endswith(".json") for f in found)


def clear_experiment(experiment: str) -> None:
    fs, root = _filesystem(experiment)
    fs.delete_dir(root)


def _filesystem(location: str) -> tuple[pafs.FileSystem, str]:
    return pafs.FileSystem.from_uri(location) if "://" in location else (pafs.LocalFileSystem(), location)


class StopOnStorageFault(tune.Callback):
    """End the study at the first trial that failed because storage cannot be written (a full
    disk, a read-only or foreign-owned folder) instead of letting Ray retry every trial into the
    same wall and mark them all ERROR: the failed trial is back in Ray's queue (a retry), so a
    --resume after the fix continues it from its last checkpoint."""

    MARKS = ("No space left on device", "Disk quota exceeded", "Permission denied", "Read-only file system")

    def __init__(self, study_dir: Path, storage: str):
        self.study_dir, self.storage = study_dir, storage

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        try:
            text = Path(trial.error_file).read_text(errors="replace") if trial.error_file else ""
        except OSError:
            return
        if fault := next((m for m in self.MARKS if m in text), None):
            raise StorageError(f"trial {trial.trial_id} could not write its checkpoint to {self.storage} "
                               f"({fault.lower()})")
