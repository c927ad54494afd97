"""The interrupt policy (orchestrator/interrupts.py): an interrupt reaches the run even when Python first raises it
inside a finalizer (``__del__``, a weakref callback) and ignores it there with "Exception ignored".

Seen in the suite: ``runtime.timeout_s=1`` on a 600 s timing pass fired while the garbage collector ran
SQLAlchemy's registry clean-up; the RunInterrupted was ignored and the run went on until the test's 300 s limit.
"""
from __future__ import annotations

import os
import signal
import sys
import time

import pytest

from orchestrator.errors import RunInterrupted
from orchestrator.interrupts import critical, interruptible


class SlowFinalizer:
    """The interrupt arrives while this object's __del__ runs: Python ignores what it raises there."""

    def __init__(self, trigger=None):
        self.trigger = trigger

    def __del__(self):
        if self.trigger:
            self.trigger()
        time.sleep(0.5)


def _wait(seconds=3.0):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(0.01)


def test_a_timeout_that_lands_in_a_finalizer_still_ends_the_run():
    started, hook = time.monotonic(), sys.unraisablehook
    with pytest.raises(RunInterrupted, match="runtime.timeout_s=0.1 exceeded"):
        with interruptible(0.1):
            SlowFinalizer()  # collected at once; the alarm fires during its __del__
            _wait()
    assert time.monotonic() - started < 2.5
    assert sys.unraisablehook is hook  # put back


def test_a_sigterm_that_lands_in_a_finalizer_still_ends_the_run():
    with pytest.raises(RunInterrupted, match="terminated by signal SIGTERM"):
        with interruptible(None):
            SlowFinalizer(lambda: os.kill(os.getpid(), signal.SIGTERM))
            _wait()


def test_a_swallowed_sigterm_delivered_inside_critical_is_still_the_sigterm():
    """Delivered again while an MLflow call runs (critical()): deferred to the block's end, and not replaced by the
    timeout's message on the way."""
    with pytest.raises(RunInterrupted, match="terminated by signal SIGTERM"):
        with interruptible(60):
            SlowFinalizer(lambda: os.kill(os.getpid(), signal.SIGTERM))
            with critical():
                _wait(0.5)


def test_a_ctrl_c_that_lands_in_a_finalizer_still_ends_the_run():
    with pytest.raises(KeyboardInterrupt):
        with interruptible(None):
            SlowFinalizer(lambda: os.kill(os.getpid(), signal.SIGINT))
            _wait()


def test_other_ignored_exceptions_are_reported_as_before(monkeypatch):
    class Broken:
        def __del__(self):
            raise ValueError("broken finalizer")

    seen = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: seen.append(u.exc_value))
    with interruptible(None):
        Broken()
    assert [str(e) for e in seen] == ["broken finalizer"]
