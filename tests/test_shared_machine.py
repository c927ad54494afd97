"""A run on a machine other work keeps busy says so: OpenMP threads that share cores with a busy process make
every batch wait for the thread that is not running (one busy process took the default run from 563 to 33
sentences/s on the 2-core Xeon), so the run names the cores in use elsewhere and the setting that avoids it."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import psutil
import pytest

from orchestrator import phases
from orchestrator.environment import busy_cores_warning


def test_the_warning_names_the_busy_cores_and_the_thread_setting_that_fits():
    line = busy_cores_warning(1.0, 2, 2)
    assert line.startswith("other processes keep 1.0 of 2 core(s) busy while this run uses 2 thread(s)")
    assert "runtime.threads=1" in line and "\n" not in line
    assert busy_cores_warning(0.3, 2, 2) is None  # a quiet machine: nothing to say
    assert busy_cores_warning(1.0, 2, 1) is None  # one thread on the core left: fine
    assert busy_cores_warning(None, 2, 2) is None  # not measurable here
    assert "runtime.threads=2" in busy_cores_warning(2.0, 4, 4)


def test_busy_cores_sees_a_busy_process():
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        busy = phases.BusyCores(1.0).read()
    finally:
        hog.kill()
    assert busy is not None and 0.5 <= busy <= (psutil.cpu_count() or 1) + 0.01


def test_a_sweep_without_a_recommendation_on_a_busy_machine_says_why_and_what_fits():
    """fp32 and bf16 both at ~940 ms per batch under a one-core hog with 2 threads (the AMD EPYC, 2026-12-04): the
    summary line, not only a job's log, names the busy cores and runtime.threads=1 (bf16 1.84x with it)."""
    from orchestrator import verdict

    def row(job, precision, thr, busy):
        return {"job": job, "stack": "eager", "precision": precision, "status": "FINISHED", "metric": "accuracy",
                "value": 80.0, "throughput": thr, "throughput_ci_low": thr * 0.95, "throughput_ci_high": thr * 1.05,
                "task": "text_classification", "workload": "w", "baseline_key": "b", "threads": 2.0,
                "cores_available": 2.0, "cores_busy_at_start": busy}

    rows = [row(0, "fp32", 68.0, 0.4), row(1, "bf16", 69.0, 1.02)]
    verdict.assess(rows, 0.99, 0.95, lambda t: None, lambda r: None)
    line = verdict.recommend(rows)
    assert line.startswith("no recommendation: nothing beat eager fp32 beyond noise"), line
    assert ("1 of 2 jobs ran 2 thread(s) while other processes kept up to 1.0 of 2 core(s) busy" in line
            and "runtime.threads=1" in line and "\n" not in line), line
    for r in rows:  # a quiet machine: the line is as before
        r["cores_busy_at_start"] = 0.1
    assert verdict.recommend(rows).endswith("within noise)")
    rows[0]["cores_busy_at_start"], rows[1]["threads"] = 1.0, 1.0  # one job on 2 threads, one on 1: only the first
    line = verdict.recommend(rows)
    assert "1 of 2 jobs ran 2 thread(s) while other processes kept up to 1.0 of 2 core(s) busy" in line, line
    for r, threads in zip(rows, (4.0, 3.0)):  # 4 cores, 2 kept busy, jobs on 4 and 3 threads: both need them
        r.update(cores_available=4.0, cores_busy_at_start=2.0, threads=threads)
    line = verdict.recommend(rows)
    assert "2 of 2 jobs ran more threads than the cores left" in line and "runtime.threads=2" in line, line


def test_others_busy_counts_other_processes_not_the_timed_one():
    """What the race measures per timed round: a hog beside the timed process counts, the timed process itself
    does not. Both readings over one window, so whatever else the machine runs (the suite's other worker) is in
    both and the difference is the hog's own CPU use."""
    from orchestrator.environment import OthersBusy

    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        beside, itself = OthersBusy(sleeper.pid), OthersBusy(hog.pid)
        used0, t0 = sum(psutil.Process(hog.pid).cpu_times()[:2]), time.monotonic()
        beside.start()
        itself.start()
        time.sleep(1.0)
        used = (sum(psutil.Process(hog.pid).cpu_times()[:2]) - used0) / (time.monotonic() - t0)
        readings = {"beside a hog": beside.read(), "the hog itself": itself.read(), "the hog's cores": used}
    finally:
        hog.kill()
        sleeper.kill()
    assert used >= 0.2, readings  # it ran, even on a loaded machine
    assert readings["beside a hog"] - readings["the hog itself"] == pytest.approx(used, abs=0.1), readings
    assert readings["beside a hog"] >= used - 0.1, readings
    short = OthersBusy(os.getpid())
    short.start()
    assert short.read() is None  # shorter than the kernel's CPU-time ticks can tell


def test_a_raced_sweep_names_a_load_that_came_during_its_rounds():
    from orchestrator import verdict

    rows = [{"job": j, "stack": "eager", "precision": p, "status": "FINISHED", "metric": "accuracy", "value": 80.0,
             "throughput": 68.0, "throughput_ci_low": 64.0, "throughput_ci_high": 72.0, "task": "text_classification",
             "workload": "w", "baseline_key": "b", "threads": 2.0, "cores_available": 2.0,
             "cores_busy_at_start": 0.0, "cores_busy_in_rounds": 1.1} for j, p in ((0, "fp32"), (1, "bf16"))]
    verdict.assess(rows, 0.99, 0.95, lambda t: None, lambda r: None)
    assert "2 of 2 jobs ran 2 thread(s) while other processes kept up to 1.1 of 2 core(s) busy" in \
        verdict.recommend(rows)


def test_a_recommendation_made_on_a_busy_machine_says_the_load_may_have_chosen_it():
    """Under a one-core hog a raced sweep recommended openvino int8 at 8.54x (pt2e int8 at 2.7-3.0x when quiet, the
    AMD EPYC, 2026-12-05): eager fp32's threads waited for the hog's core, so the speedups and the winner were the
    load's. The recommended line says so; on a quiet machine it is as before."""
    from orchestrator import verdict

    def row(job, stack, thr, busy):
        return {"job": job, "stack": stack, "precision": "fp32" if stack == "eager" else "int8", "status": "FINISHED",
                "metric": "accuracy", "value": 80.0, "throughput": thr, "throughput_ci_low": thr * 0.95,
                "throughput_ci_high": thr * 1.05, "task": "text_classification", "workload": "w",
                "baseline_key": "b", "threads": 2.0, "cores_available": 2.0, "cores_busy_in_rounds": busy}

    rows = [row(0, "eager", 10.0, 1.0), row(1, "openvino", 85.0, 1.0)]
    verdict.assess(rows, 0.99, 0.95, lambda t: None, lambda r: None)
    line = verdict.recommend(rows)
    assert line.startswith("recommended: job 1 (openvino/int8)") and rows[1]["recommended"], line
    assert ("2 of 2 jobs ran 2 thread(s) while other processes kept up to 1.0 of 2 core(s) busy" in line
            and "can change the speedups and the winner" in line and "runtime.threads=1" in line
            and "\n" not in line), line
    for r in rows:
        r["cores_busy_in_rounds"] = 0.1
    assert "core(s) busy" not in verdict.recommend(rows)
