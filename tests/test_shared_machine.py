"""A run on a machine other work keeps busy says so: OpenMP threads that share cores with a busy process make
every batch wait for the thread that is not running (one busy process took the default run from 563 to 33
sentences/s on the 2-core Xeon), so the run names the cores in use elsewhere and the setting that avoids it."""
from __future__ import annotations

import subprocess
import sys
import time

import psutil

from orchestrator import phases


def test_the_warning_names_the_busy_cores_and_the_thread_setting_that_fits():
    line = phases.busy_cores_warning(1.0, 2, 2)
    assert line.startswith("other processes keep 1.0 of 2 core(s) busy while this run uses 2 thread(s)")
    assert "runtime.threads=1" in line and "\n" not in line
    assert phases.busy_cores_warning(0.3, 2, 2) is None  # a quiet machine: nothing to say
    assert phases.busy_cores_warning(1.0, 2, 1) is None  # one thread on the core left: fine
    assert phases.busy_cores_warning(None, 2, 2) is None  # not measurable here
    assert "runtime.threads=2" in phases.busy_cores_warning(2.0, 4, 4)


def test_busy_cores_sees_a_busy_process():
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        busy = phases.BusyCores(1.0).read()
    finally:
        hog.kill()
    assert busy is not None and 0.5 <= busy <= (psutil.cpu_count() or 1) + 0.01
