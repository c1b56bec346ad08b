"""Kill and fill points for the reliability tests: with CRACK_KILL_AT=NAME[,NAME...] the process
group is killed (SIGKILL: no clean-up, as a lost node or an evicted pod) when a run reaches a named
point, so a test kills a study at an exact moment instead of after a guessed sleep. The test
starts the driver in a session of its own; the group is the driver and the Ray it started.
With CRACK_FILL_AT=NAME[,NAME...] and CRACK_FILL_DIR=FOLDER the disk of FOLDER is filled there
instead (a file of zeros, leaving CRACK_FILL_LEAVE bytes free, default 0): a disk that fills up
at that moment.

Points: `search-start` (Ray has written tuner.pkl, not yet its first experiment state),
`resultN` (the driver got its Nth trial result, not yet in a snapshot), `final retrain:epochN`
(the retrain finished epoch N), `outputs` (the retrain's model.pt is written, its metrics not).

Trial faults, recorded in marker files under CRACK_FAULT_DIR: at epoch CRACK_FAULT_EPOCH a
trial raises once (a crash it resumes from its checkpoint); at epoch CRACK_DIVERGE_EPOCH it
diverges every time, one marker line per attempt (a divergence is not retried)."""
from __future__ import annotations

import os
import signal
from contextlib import suppress

KILL_AT_ENV, GROUP_ENV = "CRACK_KILL_AT", "CRACK_KILL_GROUP"
FILL_AT_ENV, FILL_DIR_ENV, FILL_LEAVE_ENV = "CRACK_FILL_AT", "CRACK_FILL_DIR", "CRACK_FILL_LEAVE"
FAULT_EPOCH_ENV, DIVERGE_EPOCH_ENV, FAULT_DIR_ENV = "CRACK_FAULT_EPOCH", "CRACK_DIVERGE_EPOCH", "CRACK_FAULT_DIR"


def arm() -> None:
    """Called by the driver before Ray starts: Ray's workers inherit the environment, and their
    kill points then kill the driver's group, not only themselves."""
    if os.environ.get(KILL_AT_ENV):
        os.environ.setdefault(GROUP_ENV, str(os.getpgrp()))


def fill_disk(folder: str, leave: int = 0) -> None:
    """Fill the disk of `folder` up to `leave` free bytes with a file of zeros (filler-PID)."""
    chunk = b"\0" * (1 << 16)
    with open(os.path.join(folder, f"filler-{os.getpid()}"), "ab") as f, suppress(OSError):  # OSError: full
        while (free := os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize) > leave:
            f.write(chunk[:max(1, min(len(chunk), free - leave))])
            f.flush()


def kill_point(name: str) -> None:
    if name in os.environ.get(FILL_AT_ENV, "").split(",") and os.environ.get(FILL_DIR_ENV):
        fill_disk(os.environ[FILL_DIR_ENV], int(os.environ.get(FILL_LEAVE_ENV, "0")))
    if name in os.environ.get(KILL_AT_ENV, "").split(","):
        os.killpg(int(os.environ.get(GROUP_ENV, os.getpgrp())), signal.SIGKILL)


def trial_fault(epoch: int, trial_id: str) -> None:
    """Called by a trial after each epoch: raise the fault the environment asks for at this epoch."""
    if not os.environ.get(FAULT_DIR_ENV) or str(epoch) not in (os.environ.get(FAULT_EPOCH_ENV),
                                                                 os.environ.get(DIVERGE_EPOCH_ENV)):
        return
    folder = os.environ[FAULT_DIR_ENV]
    os.makedirs(folder, exist_ok=True)
    if os.environ.get(DIVERGE_EPOCH_ENV) == str(epoch):
        with open(os.path.join(folder, f"{trial_id}.diverged"), "a") as f:
            f.write(f"{epoch}\n")
        raise FloatingPointError(f"injected divergence at epoch {epoch} ({DIVERGE_EPOCH_ENV})")
    marker = os.path.join(folder, f"{trial_id}.failed")
    if not os.path.exists(marker):
        open(marker, "x").close()
        raise RuntimeError(f"injected fault at epoch {epoch} ({FAULT_EPOCH_ENV})")
