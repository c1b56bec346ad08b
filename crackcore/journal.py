"""The study's Optuna journal (a JournalStorage file): opened as the search's writer, whose
appends are whole records or nothing, or as a reader that never changes it. A torn last
record (a write cut short by a full disk or a kill) is cut when the writer opens it."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from crackcore.exceptions import StudyFilesError
from crackcore.studyfiles import JOURNAL


def open_journal(study_dir: str | Path, writer: bool = False) -> Any:
    """The Optuna JournalStorage of a study folder (written by the search, read by reports).
    The search opens it as the `writer`: a torn last record (a write cut short by a full disk
    or a kill) is cut first, with a warning, and every later append is whole or not at all.
    Readers never change the file: a live study may be writing its tail."""
    from optuna.storages import JournalStorage

    return JournalStorage(_whole_record_backend(Path(study_dir) / JOURNAL, writer))


def cut_torn_tail(path: Path) -> int:
    """Cut what follows the journal's last whole record; returns the records dropped (0 or 1).
    A record is one JSON line ending in a newline, so a torn write is a tail without one (or,
    cut right after a newline of its own, a last line that is not JSON). A damaged record
    before the last one is not a torn write: that is an error, the file is left as it is."""
    data = path.read_bytes() if path.is_file() else b""
    keep = data.rfind(b"\n") + 1  # everything after the last newline is torn
    lines = data[:keep].splitlines(keepends=True)
    bad = [i for i, line in enumerate(lines) if not _is_record(line)]
    if bad and bad != [len(lines) - 1]:
        raise StudyFilesError(f"{path} is damaged at record {bad[0] + 1} of {len(lines)} (not a torn last write); "
                              "restore it from a copy or start a new study")
    if bad:
        keep -= len(lines[-1])
    if keep == len(data):
        return 0
    with open(path, "r+b") as f:
        f.truncate(keep)
        os.fsync(f.fileno())
    print(f"warning: {path}: cut a torn last record ({len(data) - keep} bytes, 1 record dropped) left by a write "
          "that was cut short (disk full or a kill); the study goes on from the record before it", file=sys.stderr)
    return 1


def _is_record(line: bytes) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


def _whole_record_backend(path: Path, writer: bool) -> Any:
    from optuna.storages.journal import JournalFileBackend
    from optuna.storages.journal._file import get_lock_file  # optuna 5.0.0: the lock its own appends take

    class WholeRecordFile(JournalFileBackend):
        """Optuna's journal file whose appends are whole: a failed write (disk full) is cut back
        to the last whole record under the same lock, so a later --resume appends after it."""

        def append_logs(self, logs: list[dict[str, Any]]) -> None:
            text = "".join(json.dumps(log, separators=(",", ":")) + "\n" for log in logs).encode()
            with get_lock_file(self._lock):
                fd = os.open(self._file_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
                start = os.lseek(fd, 0, os.SEEK_END)
                try:
                    view = memoryview(text)
                    while view:  # os.write may write less than asked
                        view = view[os.write(fd, view):]
                    os.fsync(fd)
                except OSError as exc:
                    os.ftruncate(fd, start)
                    raise OSError(exc.errno, exc.strerror, self._file_path) from exc
                finally:
                    os.close(fd)

    backend = WholeRecordFile(str(path))
    if writer:
        with get_lock_file(backend._lock):
            cut_torn_tail(path)
    return backend
