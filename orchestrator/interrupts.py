"""Stop a run from a signal handler without breaking what it was in the middle of.

A SIGTERM or a runtime.timeout_s alarm raises RunInterrupted wherever Python happens to be. Inside an MLflow
store call that can leave the store's session half-written, so the run could not even be marked KILLED.
Code in ``critical()`` defers the interrupt to the end of the block.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Optional

from .errors import RunInterrupted

_depth = 0
_pending: Optional[RunInterrupted] = None


def deliver(exc: RunInterrupted) -> None:
    global _pending
    if _depth:
        _pending = exc
        return
    raise exc


@contextlib.contextmanager
def critical():
    global _depth, _pending
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0 and _pending is not None:
            exc, _pending = _pending, None
            raise exc


@contextlib.contextmanager
def interruptible(timeout_s: Optional[float]):
    """SIGTERM and runtime.timeout_s raise RunInterrupted between Python steps, so the run can end KILLED
    with what it measured; SIGINT already raises KeyboardInterrupt. Only possible in the main thread."""
    global _pending
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_term(signum, frame):
        deliver(RunInterrupted(f"terminated by signal {signal.Signals(signum).name}"))

    def on_alarm(signum, frame):
        deliver(RunInterrupted(f"runtime.timeout_s={timeout_s:g} exceeded"))

    old_term, old_alarm = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGALRM)
    try:
        signal.signal(signal.SIGTERM, on_term)
        signal.signal(signal.SIGALRM, on_alarm)
        if timeout_s:
            signal.setitimer(signal.ITIMER_REAL, timeout_s)
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGTERM, old_term)
        signal.signal(signal.SIGALRM, old_alarm)
        _pending = None
