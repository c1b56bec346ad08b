"""Every error the project raises on purpose: one base, so each entry point turns any of them
into one line on stderr (crackcore.cli). Each message names the problem and the fix."""
from __future__ import annotations

import errno
import re
from pathlib import Path


class CrackError(Exception):
    """Base of every project error."""


class ConfigError(CrackError, ValueError):
    """A configuration value is out of range or unknown."""


class DataError(CrackError):
    """The data cannot be used as given."""


class WeightsError(CrackError):
    """ImageNet weights were required but cannot be had, or a given file is wrong."""


class DownloadError(CrackError):
    """The dataset could not be fetched, verified or extracted."""


class ModelFileError(CrackError):
    """A model file is missing or not one of ours, or predict's flags cannot be used."""


class AdaptationError(CrackError):
    """Adapting to a site made a model that must not be written (self-train turned it against its start)."""


class StudyFilesError(CrackError):
    """A folder is not a study, or one of its files is damaged."""


class StudyError(CrackError):
    """The study cannot start or go on."""


class CheckpointError(CrackError):
    """A checkpoint cannot resume this run (another freeze depth or model)."""


class StorageError(CrackError):
    """A folder cannot be written: no space left, no permission, a read-only file system."""


# the file-system faults that the user fixes outside the program
WRITE_FAULTS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
                errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
                errno.EROFS: "read-only file system"}


def storage_error(exc: BaseException, what: str = "", fix: str = "", path: str | Path | None = None
                  ) -> StorageError | None:
    """One line for an OSError a user fixes outside the program (full disk, permissions), naming
    the folder, what was being written and what to do; None for any other error. A temp file's
    name is shown as the file it was to become."""
    code = getattr(exc, "errno", None)
    if code not in WRITE_FAULTS:
        return None
    name = path or (exc.filename if isinstance(exc, OSError) and exc.filename else "")
    target = Path(re.sub(r"^\.(.+)\.[^.]+\.tmp$|^(.+)\.\d+\.tmp(\.npy)?$", lambda m: m[1] or f"{m[2]}{m[3] or ''}",
                         Path(str(name)).name)) if name else None
    where = f"{Path(str(name)).parent}" if name else "the output folder"
    writing = what or (f"writing {target}" if target else "writing")
    todo = fix or ("free space there, or point the command at another folder" if code in (errno.ENOSPC, errno.EDQUOT)
                   else "make that folder writable, or point the command at another folder")
    return StorageError(f"{WRITE_FAULTS[code]} in {where} ({writing}); {todo}")


class DivergedError(CrackError, FloatingPointError):
    """The training loss turned non-finite (a FloatingPointError, as torch's anomaly checks are)."""
