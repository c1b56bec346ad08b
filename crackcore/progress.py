"""Progress of the long steps outside Ray's trial table (decoding, near-duplicate hashing,
predict over many files, the epochs of a retrain): a tqdm bar on a terminal, and in a log (a
file, a pipe, a Ray worker's forwarded output) a plain line every LOG_EVERY_S seconds and one
when the step ends, instead of tqdm's carriage-return redraws. Code whose output a terminal
shows through another process (a Ray task: tqdm_ray) names the bar to draw with `bars(cls)`.
A leaf: every module shares it."""
from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextvars import ContextVar
from typing import Any, TextIO, TypeVar

T = TypeVar("T")
LOG_EVERY_S = 15.0
_BAR: ContextVar[Callable[..., Any] | None] = ContextVar("crackcore_progress_bar", default=None)


@contextlib.contextmanager
def bars(cls: Callable[..., Any] | None) -> Iterator[None]:
    """Inside the block, `track` draws its bars with `cls` (tqdm-like: called with the items and
    desc, total, unit; iterated; closed) whatever the output is; None: as usual."""
    token = _BAR.set(cls)
    try:
        yield
    finally:
        _BAR.reset(token)


def track(items: Iterable[T], desc: str, total: int | None = None, *, unit: str = "it", enabled: bool = True,
          done_line: bool = True, file: TextIO | None = None, every_s: float = LOG_EVERY_S) -> Iterable[T]:
    """`items`, reporting progress as they are consumed. `done_line=False`: no closing line in a log
    (for steps whose caller prints its own, e.g. an epoch's metrics)."""
    if not enabled:
        return items
    file = file or sys.stderr
    total = total if total is not None else (len(items) if hasattr(items, "__len__") else None)
    if (cls := _BAR.get()) is not None:
        return _closing(cls(items, desc=desc, total=total, unit=unit))
    if file.isatty():
        from tqdm.auto import tqdm

        return tqdm(items, desc=desc, total=total, unit=unit, file=file, mininterval=0.5, dynamic_ncols=True,
                    leave=done_line)
    return _lines(items, desc, total, unit, done_line, file, every_s)


def _closing(bar: Any) -> Iterator[Any]:
    try:
        yield from bar
    finally:
        bar.close()


def _lines(items: Iterable[T], desc: str, total: int | None, unit: str, done_line: bool, file: TextIO,
           every_s: float) -> Iterator[T]:
    start = last = time.monotonic()
    n = 0
    for item in items:
        yield item
        n += 1
        now = time.monotonic()
        if now - last >= every_s and (total is None or n < total):
            last = now
            done = f"{n}/{total} {unit} ({100 * n / total:.0f} %)" if total else f"{n} {unit}"
            eta = f", about {(now - start) * (total - n) / n:.0f} s left" if total else ""
            print(f"{desc}: {done}, {now - start:.0f} s{eta}", file=file, flush=True)
    if done_line:
        print(f"{desc}: {n} {unit} in {time.monotonic() - start:.1f} s", file=file, flush=True)
