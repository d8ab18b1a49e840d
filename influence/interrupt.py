"""Stopping a long loop at a batch boundary when the process is asked to stop (SIGTERM, SIGINT).

Cluster schedulers preempt a job with SIGTERM and, a grace period later, SIGKILL. While `handling()` is active
(a program activates it around its work), the first SIGTERM or SIGINT only sets a flag if a loop that can save
what it has is running (inside `polling()`); that loop reads `requested()` at its batch boundaries, saves, and
raises `Interrupted`. Outside such a loop there is nothing in progress worth saving (finished results are on
disk, every file written whole or not at all), so the signal raises `Interrupted` where the program is, as
Ctrl-C raises KeyboardInterrupt. Repeats of a signal while a stop is under way are ignored, so that they
cannot cut the emergency save short: a scheduler may signal every process of a job and torchrun forwards the
same signal to its workers, so one preemption can arrive twice. SIGKILL still ends everything at once.

Any loop can take part:

    with interrupt.polling():
        for batch in batches:
            ...
            if interrupt.requested():
                save()
                raise interrupt.stopped(interrupt.requested(), "... to ...")
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

SIGNALS = (signal.SIGTERM, signal.SIGINT)

_requested: int | None = None
_polling = 0  # depth of nested polling() regions
_installed = False
_dealt_with = False  # the request was answered by an Interrupted: the next polling() region starts afresh


class Interrupted(KeyboardInterrupt):
    """The process was asked to stop by signal `signum`; `saved` says what was saved for resuming, if anything.

    A KeyboardInterrupt, so that `except Exception` never swallows it. A program stopped so exits with
    `exit_status`, 128 + signum."""

    def __init__(self, signum: int, saved: str | None = None) -> None:
        self.signum, self.saved = signum, saved
        super().__init__(self.message())

    @property
    def exit_status(self) -> int:
        return 128 + self.signum

    def message(self) -> str:
        name = signal.Signals(self.signum).name
        if self.saved is None:
            return (
                f"interrupted by {name} outside a pass (finished results are saved): "
                "run the same command again to continue"
            )
        return f"interrupted by {name}: saved {self.saved}; run the same command again to resume"


def requested() -> int | None:
    """The signal that asked this process to stop (or that another rank reported, see `note`), else None."""
    return _requested


def note(signum: int) -> None:
    """Record a stop decided elsewhere (another rank was signalled): from now on repeats are ignored here too."""
    global _requested
    if _requested is None:
        _requested = signum


def stopped(signum: int, saved: str | None = None) -> Interrupted:
    """The exception to raise once a loop has saved what it had (`saved`: what, and where)."""
    global _dealt_with
    _dealt_with = True
    return Interrupted(signum, saved)


def _handle(signum: int, _frame: object) -> None:
    global _requested
    if _requested is not None:
        return
    _requested = signum
    if _polling == 0:
        raise stopped(signum)


@contextlib.contextmanager
def polling() -> Iterator[None]:
    """A region whose loop reads `requested()` at its batch boundaries: signals wait for it instead of raising."""
    global _polling, _requested, _dealt_with
    if _dealt_with:  # a program that caught the last Interrupted and carries on: later signals count again
        _requested, _dealt_with = None, False
    _polling += 1
    try:
        yield
    finally:
        _polling -= 1


@contextlib.contextmanager
def handling() -> Iterator[None]:
    """Catch SIGTERM and SIGINT as described above for the duration, then restore the previous handlers.

    Outside the main thread (where Python cannot install handlers) it does nothing."""
    global _requested, _installed, _dealt_with
    if threading.current_thread() is not threading.main_thread() or _installed:
        yield
        return
    previous = {signum: signal.getsignal(signum) for signum in SIGNALS}
    _requested, _installed, _dealt_with = None, True, False
    try:
        for signum in SIGNALS:
            signal.signal(signum, _handle)
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _requested, _installed, _dealt_with = None, False, False
