"""Kill points for the reliability tests: with CRACK_KILL_AT=NAME[,NAME...] the process group
is killed (SIGKILL: no clean-up, as a lost node or an evicted pod) when a run reaches a named
point, so a test kills a study at an exact moment instead of after a guessed sleep. The test
starts the driver in a session of its own; the group is the driver and the Ray it started.

Points: `search-start` (Ray has written tuner.pkl, not yet its first experiment state),
`resultN` (the driver got its Nth trial result, not yet in a snapshot), `final retrain:epochN`
(the retrain finished epoch N), `outputs` (the retrain's model.pt is written, its metrics not)."""
from __future__ import annotations

import os
import signal

KILL_AT_ENV, GROUP_ENV = "CRACK_KILL_AT", "CRACK_KILL_GROUP"


def arm() -> None:
    """Called by the driver before Ray starts: Ray's workers inherit the environment, and their
    kill points then kill the driver's group, not only themselves."""
    if os.environ.get(KILL_AT_ENV):
        os.environ.setdefault(GROUP_ENV, str(os.getpgrp()))


def kill_point(name: str) -> None:
    if name in os.environ.get(KILL_AT_ENV, "").split(","):
        os.killpg(int(os.environ.get(GROUP_ENV, os.getpgrp())), signal.SIGKILL)
