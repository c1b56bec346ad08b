"""What every command-line entry point shares: known failures become one line on stderr and
a non-zero exit instead of a traceback."""
from __future__ import annotations

import sys
from typing import Callable

from crackcore.config import ConfigError
from crackcore.data import DataError
from crackcore.model import WeightsError

KNOWN_ERRORS: tuple[type[BaseException], ...] = (ConfigError, DataError, WeightsError, FileNotFoundError,
                                                 FileExistsError, PermissionError, FloatingPointError)


def run_main(main: Callable[[list[str] | None], int], argv: list[str] | None = None,
             extra_errors: tuple[type[BaseException], ...] = ()) -> int:
    try:
        return main(argv)
    except KNOWN_ERRORS + extra_errors as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
