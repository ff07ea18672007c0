"""SIGINT and SIGTERM as one exception, so a sweep stops the same way for Ctrl-C and a scheduler.

`Interrupted` derives from BaseException, not KeyboardInterrupt, on purpose: Lightning turns a
KeyboardInterrupt raised inside `trainer.fit` into `sys.exit(1)` (and ignores SIGINT from then
on), which would erase which signal stopped the run; any other BaseException it re-raises as is.
Hydra's job runner catches only `Exception`, so it passes through to the sweeper, which records
the trial as interrupted (retried on the next start), and to the run, which ends KILLED.

A second signal while the first is being recorded restores the default action and re-sends
itself: the process dies at once, and the next start finds its trials by their dead worker pid.

The module name starts with "_" so that Hydra's plugin scan does not execute it a second time
(that would make a second `Interrupted` class, which `except` clauses elsewhere would miss).
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_RECEIVED: list[int] = []  # every signal handled in this process, first one first


class Interrupted(BaseException):
    """The process received SIGINT or SIGTERM; `signum` says which."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(signal.Signals(signum).name)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


@contextmanager
def interruptible() -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM raise `Interrupted` in the main thread (once)."""
    previous = {s: signal.getsignal(s) for s in SIGNALS}
    fired: list[int] = []

    def handler(signum: int, frame: object) -> None:
        if fired:  # second signal: stop now, without cleanup
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)
            return
        fired.append(signum)
        _RECEIVED.append(signum)
        raise Interrupted(signum)

    for s in SIGNALS:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)


def received() -> int | None:
    """The first SIGINT/SIGTERM this process handled, or None (e.g. for an exit hook to tell an
    interrupted sweep from a failed one)."""
    return _RECEIVED[0] if _RECEIVED else None
