"""Faults: timeouts, signals, resume — every run ends in a known state and keeps what it measured."""
from __future__ import annotations

import signal

import pytest

from conftest import finish, measuring, mlflow_store, run_cli, runs_of, start_cli, tiny_sts_overrides, wait_for
from orchestrator.errors import RunInterrupted
from orchestrator.runner import run


def test_timeout_ends_the_run_killed_with_its_measurements(compose, tiny_encoder, sts_file, tracking_uri):
    overrides = tiny_sts_overrides(tiny_encoder, sts_file, tracking_uri)
    # 5 s: the tiny model's load and accuracy pass take well under a second (seconds under a heavy load); the
    # rest of the timeout is the timing pass it cuts
    with pytest.raises(RunInterrupted, match=r"^runtime.timeout_s=5 exceeded$"):
        run(compose(*overrides, "runtime.timeout_s=5", "runtime.min_duration_s=600", "runtime.max_iterations=null"))
    _, runs = runs_of(tracking_uri)
    assert len(runs) == 1 and runs[0].info.status == "KILLED"
    assert runs[0].data.tags["error"] == "runtime.timeout_s=5 exceeded"
    assert "spearman" in runs[0].data.metrics  # the accuracy pass finished before the timing pass was cut


@pytest.mark.slow
def test_sigterm_ends_the_run_killed_and_says_so(tmp_path, tiny_encoder, sts_file):
    uri = mlflow_store(tmp_path / "store.db")  # the store exists first: polling a sqlite file mid-creation races
    # started through conftest: killed with what it started if the test fails before it ends
    proc = start_cli(f"model.name_or_path={tiny_encoder}", f"dataset.data_files={sts_file}", f"tracking.uri={uri}",
                     "runtime.min_duration_s=600", "runtime.progress=false", cwd=tmp_path)
    wait_for(lambda: measuring(uri), "the run's accuracy pass to be logged", 300)  # then stop it mid-timing
    proc.send_signal(signal.SIGTERM)
    done = finish(proc, timeout=120)
    assert done.returncode == 128 + signal.SIGTERM, done.stderr  # as a shell reports a SIGTERM; 2 is for bad input
    assert done.stderr.strip().splitlines()[-1] == "error: terminated by signal SIGTERM"
    _, runs = runs_of(uri)
    assert runs[0].info.status == "KILLED" and "spearman" in runs[0].data.metrics


@pytest.mark.slow
def test_resume_skips_jobs_already_finished(tmp_path, tiny_encoder, sts_file):
    uri = mlflow_store(tmp_path / "store.db")
    missing = tmp_path / "missing.tsv"  # fails once the run has started (a FAILED run to re-run)
    # two jobs: one FINISHED (skipped when resumed), one FAILED (run again); each job of an isolated sweep is a
    # process start-up, so no more of them than the rule needs
    args = ["-m", f"model.name_or_path={tiny_encoder}", f"dataset.data_files={sts_file},{missing}", "runtime=quick"]
    # the first sweep only fills the store (in process: faster); the resumed one runs with the default launcher
    first = run_cli(*args, "hydra/launcher=basic", cwd=tmp_path, env={"ORCH_TRACKING_URI": uri})
    assert first.returncode == 1  # one job FAILED
    second = run_cli(*args, "resume=true", "race.processes=1", cwd=tmp_path, env={"ORCH_TRACKING_URI": uri})
    assert second.returncode == 1
    assert second.stdout.count("skipped (resume=true)") == 1
    client, runs = runs_of(uri)
    parents = sorted((r for r in runs if r.data.tags.get("sweep") == "true"), key=lambda r: r.info.start_time)
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[1].info.run_id]
    # only the failed job ran again; the summary still accounts for both
    assert len(children) == 1 and {c.data.params["dataset.data_files"] for c in children} == {str(missing)}
    assert parents[1].data.metrics["n_jobs"] == 2 and parents[1].data.metrics["failed_jobs"] == 1


def test_a_sigterm_while_the_weights_load_ends_the_run_killed_not_failed(compose, tiny_encoder, sts_file,
                                                                       tracking_uri, monkeypatch):
    """Seen on SLURM: a scancel during the model load ended the run FAILED ("weights could not be loaded:
    terminated by signal SIGTERM"); the loader's catch-all for bad weights must let an interrupt through."""
    import transformers

    def interrupted(*args, **kwargs):
        raise RunInterrupted("terminated by signal SIGTERM", 15)

    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", interrupted)
    with pytest.raises(RunInterrupted):
        run(compose(*tiny_sts_overrides(tiny_encoder, sts_file, tracking_uri)))
    _, runs = runs_of(tracking_uri)
    assert runs[0].info.status == "KILLED" and runs[0].data.tags["error"] == "terminated by signal SIGTERM"


def test_an_interrupt_while_flops_are_counted_still_ends_the_run_killed(compose, tiny_encoder, sts_file,
                                                                       tracking_uri, monkeypatch):
    """FLOP counting forgives a model it cannot count, but never a timeout or a signal that lands meanwhile."""
    from orchestrator import flops

    def interrupted(*args, **kwargs):
        raise RunInterrupted("runtime.timeout_s=15 exceeded")

    monkeypatch.setattr(flops, "coefficients", interrupted)
    with pytest.raises(RunInterrupted):
        run(compose(*tiny_sts_overrides(tiny_encoder, sts_file, tracking_uri)))
    _, runs = runs_of(tracking_uri)
    assert runs[0].info.status == "KILLED" and "features" in runs[0].data.metrics
