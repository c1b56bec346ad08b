"""What every command-line entry point shares: known failures become one line on stderr and
a non-zero exit instead of a traceback."""
from __future__ import annotations

import sys
from typing import Callable

from crackcore.exceptions import CrackError, storage_error

# file-system faults whose message already names the path and so the fix (permission and space
# faults get storage_error's line)
NAMED_PATH_ERRORS = (FileNotFoundError, FileExistsError)


def run_main(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    try:
        return main(argv)
    except CrackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # a full disk or a folder we may not write: where, what, and the fix
        line = storage_error(exc)
        if line is None and not isinstance(exc, NAMED_PATH_ERRORS):
            raise
        print(f"error: {line or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
