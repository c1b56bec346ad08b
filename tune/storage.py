"""Where a study's files live. Local storage: one folder, results/<study>/, holds Ray's
experiment (ray/), the Optuna journal and every output. URI storage (s3://, gs://, file://):
Ray keeps its experiment at URI/<study>/ray, our files are written to ./results/<study>/ and
mirrored to URI/<study>/outputs: the config at the start, the journal at every snapshot Ray
takes of its experiment, everything at the end. So a driver on another machine can `--resume`
the study, in any working folder: it fetches config and journal back, Ray restores from the
URI, and the restored searcher opens the fetched journal (tune.search pickles it by reference)."""
from __future__ import annotations

import hashlib
import json
import os
import pickletools
import sys
import threading
import time
from contextlib import suppress
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
from ray import tune

from crackcore.config import StudyConfig
from crackcore.exceptions import StorageError, StudyError, storage_error
from crackcore.faults import kill_point
from crackcore.outputs import write_json
from crackcore.studyfiles import JOURNAL, STATE_HASHES, STUDY_CONFIG

RAY_DIR = "ray"  # Ray's own experiment folder inside the study folder
OUTPUTS_DIR = "outputs"
RESUME_FILES = (STUDY_CONFIG, JOURNAL, STATE_HASHES)  # what a driver needs to --resume a study
# Ray's files that --resume unpickles (the experiment state JSON holds pickles too), by name prefix;
# callback-states-*.pkl is written after the callbacks' get_state, so StateHashes cannot hash it as written
KEEP_VERSIONS = 3
STATE_FILES = ("tuner.pkl", "experiment_state-", "searcher-state-", "search_gen_state-")


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
    remote = _remote_file(storage, STUDY_CONFIG)
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

    on_trial_error = on_trial_complete  # a trial out of retries is as finished

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
            with suppress(OSError):  # a folder Ray deleted between scandir and stat: sample again
                self.peak = max(self.peak or 0, checkpoint_bytes(self.experiment))
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
    return any(name.startswith("experiment_state-") and name.endswith(".json") for name in _state_files(experiment))


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


def _state_files(experiment: str) -> dict[str, pafs.FileInfo]:
    """Ray's state files at the top of its experiment folder, by name."""
    fs, root = _filesystem(experiment)
    try:
        found = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    except OSError:
        return {}
    return {Path(f.path).name: f for f in found if f.type == pafs.FileType.File and Path(f.path).name.startswith(STATE_FILES)}


def _read(experiment: str, name: str) -> bytes:
    fs, root = _filesystem(experiment)
    with fs.open_input_stream(f"{root}/{name}") as f:
        return f.readall()


def _whole(name: str, data: bytes) -> bool:
    """A state file that is whole: the experiment state's JSON parses, a pickle ends in its STOP opcode.
    pickletools reads the opcodes without running any of them."""
    if name.startswith("experiment_state-"):  # JSON; the others are pickles (search_gen_state's .json too)
        try:
            json.loads(data)
            return True
        except ValueError:
            return False
    try:
        return any(op.name == "STOP" for op, _, _ in pickletools.genops(data))
    except Exception:  # noqa: BLE001 (genops raises ValueError and others on a cut pickle)
        return False


def damaged_state(experiment: str) -> list[str]:
    """Ray's state files of the newest snapshot (and tuner.pkl) that are torn or empty: a write
    cut short by a full disk. Ray cannot restore such an experiment (it logs the JSON error and
    restarts with no trials)."""
    files = _state_files(experiment)
    newest = {prefix: max((n for n in files if n.startswith(prefix)), default=None) for prefix in STATE_FILES}
    return [n for n in newest.values() if n and not _whole(n, _read(experiment, n))]


def set_damaged_state_aside(experiment: str) -> str:
    """Move Ray's state files into a folder of their own inside the experiment (kept, never
    read again), so a new Ray search starts there; the trials' folders stay. Returns the folder."""
    fs, root = _filesystem(experiment)
    aside = f"{root}/damaged-state-{time.strftime('%Y%m%d-%H%M%S')}"
    fs.create_dir(aside)
    for name in _state_files(experiment):
        fs.move(f"{root}/{name}", f"{aside}/{name}")
    return aside


def state_hashes(experiment: str, staging: str | None = None) -> dict[str, str]:
    """SHA-256 of Ray's state files: tuner.pkl from the experiment, the snapshot's files from
    Ray's staging folder (`staging`, as written, before Ray uploads them) or the experiment."""
    hashes = {name: hashlib.sha256(_read(experiment, name)).hexdigest()
              for name in (_state_files(experiment) if staging is None else ["tuner.pkl"])}
    if staging is not None:
        for f in sorted(Path(staging).iterdir()):
            if f.is_file() and f.name.startswith(STATE_FILES[1:]):
                hashes[f.name] = hashlib.sha256(f.read_bytes()).hexdigest()
    return hashes


def changed_state(study_dir: Path, experiment: str) -> list[str]:
    """Ray's state files that differ from what this study wrote (STATE_HASHES), are new, or that
    the study holds no hashes for (a study folder from before they were recorded)."""
    recorded = study_dir / STATE_HASHES
    if not recorded.is_file():
        return [f"{STATE_HASHES} missing"]
    try:
        known = json.loads(recorded.read_text())["sha256"]
    except (ValueError, KeyError, TypeError):
        return [f"{STATE_HASHES} unreadable"]
    return sorted(name for name, digest in state_hashes(experiment).items() if digest not in known.get(name, []))


class StateHashes(tune.Callback):
    """Record the SHA-256 of Ray's state files (STATE_FILES) as this study writes them, in
    STATE_HASHES beside the journal: tuner.pkl at the start, the snapshot's files at each of
    Ray's experiment snapshots. Ray calls get_state() after it wrote the snapshot into its staging
    folder and before it uploads it. If the record cannot be written (a full disk), the snapshot
    fails before its upload, so the uploaded state never runs ahead of its hashes."""

    def __init__(self, study_dir: Path, experiment: str, searcher: Any):
        self.study_dir, self.experiment, self.searcher = study_dir, experiment, searcher

    def setup(self, **info: Any) -> None:
        self._write(state_hashes(self.experiment))  # tuner.pkl, and on --resume the state it was checked against

    def get_state(self) -> None:
        staging = getattr(self.searcher, "saved_in", None)
        if staging:
            self._write(state_hashes(self.experiment, staging))
        return None  # nothing for Ray to save

    def _write(self, hashes: dict[str, str]) -> None:
        path = self.study_dir / STATE_HASHES
        try:  # the record holds every state file in the folder: a resumed run's snapshots add theirs
            known = json.loads(path.read_text())["sha256"] if path.is_file() else {}
        except (OSError, ValueError, KeyError):
            known = {}
        for name, digest in hashes.items():
            # a snapshot keeps its file name; Ray uploads it in the background, so a driver killed
            # before an upload finished leaves one of the last versions: the record keeps KEEP_VERSIONS
            known[name] = ([digest] + [d for d in known.get(name, []) if d != digest])[:KEEP_VERSIONS]
        try:
            write_json({"about": "SHA-256 of Ray's saved state as this study wrote it (latest first); --resume "
                        "refuses state that differs (it unpickles it), unless --trust-changed-state",
                        "sha256": known}, path)
        except OSError as exc:
            raise (storage_error(exc, path=exc.filename or path) or exc) from exc
