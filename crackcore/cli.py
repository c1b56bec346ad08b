"""What every command-line entry point shares: known failures become one line on stderr and
a non-zero exit instead of a traceback."""
from __future__ import annotations

import sys
from typing import Callable

from crackcore.exceptions import CrackError

# the project's own errors, and the file-system faults whose message already names the path
KNOWN_ERRORS = (CrackError, FileNotFoundError, FileExistsError, PermissionError)


def run_main(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    try:
        return main(argv)
    except KNOWN_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
