"""The interrupt policy, in one place: what Ctrl-C, SIGTERM and runtime.timeout_s do to a run and a sweep.

- Ctrl-C (SIGINT) raises KeyboardInterrupt in the process that gets it: the CLI installs Python's default handler
  itself (:func:`restore_sigint`), so a command started with SIGINT ignored (``nohup``, a backgrounded script)
  still stops on ``kill -INT``. In a sweep one Ctrl-C ends the current job (KILLED) and the sweep goes on; a second
  within :data:`DOUBLE_INTERRUPT_S` stops the sweep (:class:`DoubleInterrupt`, used by the task function and the
  isolated launcher alike).
- SIGTERM and the runtime.timeout_s alarm raise RunInterrupted (:func:`interruptible`); a run ends KILLED with
  what it measured.

A SIGTERM or a runtime.timeout_s alarm raises RunInterrupted wherever Python happens to be. Inside an MLflow
store call that can leave the store's session half-written, so the run could not even be marked KILLED.
Code in ``critical()`` defers the interrupt to the end of the block (Ctrl-C too, inside
:func:`deferring_sigint`: a LoadGen test must never lose a sample half-way between two steps). And when it lands
in a finalizer (a ``__del__``, a weakref callback such as SQLAlchemy's registry clean-up, run by the garbage
collector at any step), Python prints "Exception ignored" and goes on: the run would never stop (seen:
``runtime.timeout_s=1`` on a 600 s timing pass ran until the test's 300 s limit). :func:`interruptible` catches
that case through ``sys.unraisablehook`` and delivers the interrupt again a moment later, outside the finalizer.

A process can get SIGTERM more than once for one stop: SLURM's ``scancel`` signals every process of the step and
the job's launching process passes it on too (hydra_plugins/orchestrator_launcher/_remote.py), so that a job the
cluster's process tracking misses still stops. The first SIGTERM ends the run; another within
:data:`SAME_STOP_S` is the same stop and is ignored while the run is ending (in :func:`interruptible`; and any
SIGTERM waits in :func:`shielded` around the record's end), so a second signal cannot cut the KILLED record short
or kill the process before its MLflow run is closed. A later one is a new request and raises again: should a
library's catch-all have swallowed the first RunInterrupted, the run still stops on the next SIGTERM.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from typing import Optional

from .errors import RunInterrupted

DOUBLE_INTERRUPT_S = 2.0
# SIGTERMs this close to the first are one stop (scancel's and the launching process's arrive milliseconds apart)
SAME_STOP_S = 5.0
# how soon an interrupt that a finalizer swallowed is delivered again
REDELIVER_S = 0.05

log = logging.getLogger(__name__)

_depth = 0
_pending: Optional[RunInterrupted] = None


def restore_sigint() -> None:
    """Ctrl-C raises KeyboardInterrupt even when this process was started with SIGINT ignored."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)


class DoubleInterrupt:
    """Tells a second Ctrl-C within DOUBLE_INTERRUPT_S (stop the sweep) from a first one (end the current job)."""

    def __init__(self, window_s: float = DOUBLE_INTERRUPT_S):
        self.window_s = window_s
        self._last = float("-inf")

    def press(self) -> bool:
        """Record a Ctrl-C now; True when it is the second of a double Ctrl-C."""
        now = time.monotonic()
        second = now - self._last < self.window_s
        self._last = now
        return second


def deliver(exc: RunInterrupted) -> None:
    global _pending
    if _depth:
        _pending = exc
        return
    raise exc


@contextlib.contextmanager
def critical():
    """The interrupt policy's interrupts (and Ctrl-C, inside :func:`deferring_sigint`) wait for the block's end.
    For the main thread: the depth is the process's."""
    global _depth, _pending
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0 and _pending is not None:
            exc, _pending = _pending, None
            raise exc
        if _depth == 0 and _deferred_sigint:
            _deferred_sigint.pop()(signal.SIGINT, None)


_deferred_sigint: list = []


@contextlib.contextmanager
def deferring_sigint():
    """Ctrl-C (whatever handles SIGINT now: Python's KeyboardInterrupt, a launcher's double-Ctrl-C counter) also
    waits for the end of a :func:`critical` block, as SIGTERM and the timeout do. Where a step must never be cut in
    two: a LoadGen sample taken but neither completed nor recorded hangs the test (scenarios/loadgen.py)."""
    old = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or not callable(old):
        yield
        return

    def on_int(signum, frame):
        if _depth:
            _deferred_sigint[:] = [old]
            return
        old(signum, frame)

    signal.signal(signal.SIGINT, on_int)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
        _deferred_sigint.clear()


@contextlib.contextmanager
def interruptible(timeout_s: Optional[float]):
    """SIGTERM and runtime.timeout_s raise RunInterrupted between Python steps, so the run can end KILLED
    with what it measured; SIGINT already raises KeyboardInterrupt. Only possible in the main thread."""
    global _pending, _depth
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    # a run is never inside a critical() block, so any depth left now leaked from an earlier run of this process:
    # a Ctrl-C (Python's own handler raises anywhere) between critical()'s count and its try, or at the start of its
    # finally, kept the count up, and every later interrupt of the process waited for a block end that never came
    # (seen: a LoadGen test in CI ran on past its runtime.timeout_s)
    if _depth:
        log.debug("critical() depth %d left by an earlier interrupt: reset", _depth)
    _depth, _pending = 0, None

    first_term: list = []  # when the first SIGTERM came

    def on_term(signum, frame):
        now = time.monotonic()
        if first_term and now - first_term[0] < SAME_STOP_S:  # one stop, several signals (the module's doc)
            log.debug("signal %s again while the run ends: ignored", signal.Signals(signum).name)
            return
        first_term[:] = [now]
        deliver(RunInterrupted(f"terminated by signal {signal.Signals(signum).name}", signum))

    swallowed: list = []

    def on_alarm(signum, frame):
        if swallowed:  # an interrupt Python ignored inside a finalizer: now, outside it (deferred in critical())
            deliver(swallowed.pop())
            return
        deliver(RunInterrupted(f"runtime.timeout_s={timeout_s:g} exceeded"))

    def on_unraisable(unraisable):
        exc = unraisable.exc_value
        if isinstance(exc, (RunInterrupted, KeyboardInterrupt)):
            log.debug("%s raised inside %r was ignored by Python: delivered again", exc, unraisable.object)
            swallowed[:] = [exc]
            signal.setitimer(signal.ITIMER_REAL, REDELIVER_S)
            return
        old_hook(unraisable)

    old_term, old_alarm = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGALRM)
    old_hook = sys.unraisablehook
    try:
        signal.signal(signal.SIGTERM, on_term)
        signal.signal(signal.SIGALRM, on_alarm)
        sys.unraisablehook = on_unraisable
        if timeout_s:
            signal.setitimer(signal.ITIMER_REAL, timeout_s)
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGTERM, old_term)
        signal.signal(signal.SIGALRM, old_alarm)
        sys.unraisablehook = old_hook
        _pending, _depth = None, 0


@contextlib.contextmanager
def shielded(redeliver: bool = True):
    """The end of a run's record (its status, its MLflow run closed, results.json): a SIGTERM that lands meanwhile
    waits for the block to end. ``redeliver``: send it again afterwards, to whatever handled SIGTERM before (a run
    that ended normally must still stop); False when the run is already ending KILLED because of one."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list = []
    old = signal.signal(signal.SIGTERM, lambda signum, frame: held.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)
        if held and redeliver:
            os.kill(os.getpid(), signal.SIGTERM)
        elif held:
            log.debug("SIGTERM while the interrupted run's record was written: ignored (the run ends KILLED)")
