"""crackcore.progress: a bar on a terminal, plain lines in a log, nothing when disabled."""
from __future__ import annotations

import io

from crackcore.progress import track


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_log_gets_plain_lines_and_a_closing_line() -> None:
    log = io.StringIO()
    assert list(track(range(4), "decode 64px", unit="images", file=log, every_s=0)) == [0, 1, 2, 3]
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and len(lines) == 4  # one per item before the last, then the closing line
    assert lines[0].startswith("decode 64px: 1/4 images (25 %), ") and "left" in lines[0]
    assert lines[-1].startswith("decode 64px: 4 images in ")
    quiet = io.StringIO()
    assert list(track(iter("abc"), "hashing", file=quiet, every_s=1e9)) == ["a", "b", "c"]
    assert quiet.getvalue().splitlines() == [quiet.getvalue().splitlines()[0]] and "hashing: 3 it in" in quiet.getvalue()
    silent = io.StringIO()
    list(track(range(3), "epoch 1/2", file=silent, every_s=1e9, done_line=False))  # the caller logs the epoch
    assert silent.getvalue() == ""


def test_terminal_gets_a_tqdm_bar_and_disabled_is_untouched() -> None:
    term = Terminal()
    assert list(track(range(5), "patches", unit="batches", file=term)) == list(range(5))
    assert "\r" in term.getvalue() and "patches" in term.getvalue() and "5/5" in term.getvalue()
    items = [1, 2]
    assert track(items, "off", enabled=False) is items


def test_a_named_bar_class_draws_inside_its_block_and_is_closed() -> None:
    from crackcore.progress import bars

    drawn = []

    class Bar:  # the tqdm subset tqdm_ray implements: iterate, close
        def __init__(self, items, desc, total, unit):
            self.items, self.closed = items, False
            drawn.append((self, desc, total, unit))

        def __iter__(self):
            yield from self.items

        def close(self):
            self.closed = True

    log = io.StringIO()
    with bars(Bar):
        assert list(track(range(3), "epoch 1/2", unit="batches", file=log)) == [0, 1, 2]
    assert [(d, t, u) for _, d, t, u in drawn] == [("epoch 1/2", 3, "batches")] and drawn[0][0].closed
    assert log.getvalue() == ""  # the bar class drew it, not the log lines
    list(track(range(2), "after", file=log, every_s=1e9))
    assert len(drawn) == 1 and log.getvalue().startswith("after: 2 it in")  # the block is over
