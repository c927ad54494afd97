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
from orchestrator.interrupts import critical, deferring_sigint, interruptible, shielded


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


def test_a_ctrl_c_that_lands_in_a_finalizer_still_ends_the_run(ctrl_c_raises):
    with pytest.raises(KeyboardInterrupt):
        with interruptible(None):
            SlowFinalizer(lambda: os.kill(os.getpid(), signal.SIGINT))
            _wait()


def test_a_critical_depth_left_by_an_earlier_interrupt_does_not_hold_the_next_runs_timeout(monkeypatch):
    """A Ctrl-C that lands between critical()'s count and its try (Python's own handler raises anywhere) leaves the
    process's depth up; every later interrupt then waited for a block end that never came (a LoadGen test in CI
    ran on past its timeout). A run is never inside a critical block: interruptible() starts from depth 0."""
    from orchestrator import interrupts

    monkeypatch.setattr(interrupts, "_depth", 1)  # what such a Ctrl-C leaves behind
    with pytest.raises(RunInterrupted, match="timeout_s"):
        with interruptible(0.05):
            _wait()
    assert interrupts._depth == 0
    with critical():  # and the policy still defers inside a block
        assert interrupts._depth == 1


def test_other_ignored_exceptions_are_reported_as_before(monkeypatch):
    class Broken:
        def __del__(self):
            raise ValueError("broken finalizer")

    seen = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: seen.append(u.exc_value))
    with interruptible(None):
        Broken()
    assert [str(e) for e in seen] == ["broken finalizer"]


def test_a_ctrl_c_inside_a_critical_step_waits_for_its_end_where_asked(ctrl_c_raises):
    """Inside deferring_sigint (a LoadGen test): Ctrl-C lands after the critical step, whatever handles SIGINT;
    outside a critical step, and once the block is left, at once as before."""
    steps = []
    old = signal.getsignal(signal.SIGINT)
    with deferring_sigint():
        with pytest.raises(KeyboardInterrupt):
            with critical():
                os.kill(os.getpid(), signal.SIGINT)
                _wait(0.2)
                steps.append("the step ended")
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            _wait()
    assert steps == ["the step ended"] and signal.getsignal(signal.SIGINT) is old
    with pytest.raises(KeyboardInterrupt):
        with critical():  # not asked: Ctrl-C is Python's KeyboardInterrupt, at once
            os.kill(os.getpid(), signal.SIGINT)
            _wait()
            steps.append("not reached")
    assert steps == ["the step ended"]


# -- one stop, several SIGTERMs (SLURM signals the step's processes and the job's launcher passes it on) ------------
def test_a_second_sigterm_while_the_run_ends_does_not_cut_its_ending_short():
    ended = []
    with pytest.raises(RunInterrupted, match="terminated by signal SIGTERM"):
        with interruptible(None):
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                _wait()
            except RunInterrupted:
                os.kill(os.getpid(), signal.SIGTERM)  # the second one lands while the run records its end
                _wait(0.2)
                ended.append(True)
                raise
    assert ended


def test_a_sigterm_after_the_same_stop_raises_again_when_the_first_was_swallowed(monkeypatch):
    """A library's catch-all (``except Exception``) that swallows the first RunInterrupted must not leave the run
    deaf to SIGTERM: only signals of the same stop (within SAME_STOP_S) are ignored."""
    from orchestrator import interrupts

    monkeypatch.setattr(interrupts, "SAME_STOP_S", 0.3)
    swallowed = []
    with pytest.raises(RunInterrupted, match="terminated by signal SIGTERM"):
        with interruptible(None):
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                _wait()
            except Exception as e:  # what a third-party catch-all does
                swallowed.append(e)
            os.kill(os.getpid(), signal.SIGTERM)  # the same stop: ignored
            _wait(0.4)  # past SAME_STOP_S
            os.kill(os.getpid(), signal.SIGTERM)  # a new request: stops the run
            _wait()
    assert len(swallowed) == 1


@pytest.mark.parametrize("redeliver", [False, True])
def test_a_sigterm_while_the_record_is_written_waits_for_it(redeliver):
    got = []
    old = signal.signal(signal.SIGTERM, lambda signum, frame: got.append(signum))
    try:
        with shielded(redeliver=redeliver):
            os.kill(os.getpid(), signal.SIGTERM)
            _wait(0.2)
            assert not got  # held while the record is written
        _wait(0.2)
        # sent again to what handled SIGTERM before, unless the run is already ending KILLED because of one
        assert got == ([signal.SIGTERM] if redeliver else [])
        assert signal.getsignal(signal.SIGTERM) is not None and not isinstance(signal.getsignal(signal.SIGTERM), int)
    finally:
        signal.signal(signal.SIGTERM, old)


LAUNCHING_PROCESS = r"""
import signal, subprocess, sys
from hydra_plugins.orchestrator_launcher._remote import wait_passing_sigterm
# as submitit's job process does: SIGTERM only logged ("Bypassing signal SIGTERM")
signal.signal(signal.SIGTERM, lambda *a: print("bypassed", flush=True))
job = subprocess.Popen([sys.executable, "-c", "import signal, sys, time\n"
                        "signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))\n"
                        "print('job started', flush=True)\ntime.sleep(60)"], start_new_session=True)
print("job ended", wait_passing_sigterm(job), flush=True)
"""


def test_the_launching_process_passes_sigterm_on_to_a_job_the_signal_missed():
    """A job in a session of its own: only the launching process gets the SIGTERM (as when SLURM's process
    tracking misses the job's process); the job ends on it instead of running to its end."""
    import subprocess

    proc = subprocess.Popen([sys.executable, "-c", LAUNCHING_PROCESS], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "job started"
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert out.split() == ["bypassed", "job", "ended", "143"]  # passed on, and the handler there still ran
