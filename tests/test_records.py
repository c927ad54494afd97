"""The run record under hostile files and reused folders: import and report name a damaged results.json in one line
and go on, leave nothing RUNNING, follow no link out of a run folder, take any path; folders are never overwritten."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import mlflow_store
from orchestrator.errors import ConfigError
from orchestrator.records import RunRecord, refuse_taken_run_dir, refuse_taken_sweep_dir


def _job(sweep: Path, num: int, status: str = "FINISHED", metrics=None, stack: str = "eager") -> Path:
    job = sweep / str(num)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(f"- optimization=[{'' if stack == 'eager' else stack}]\n")
    record = RunRecord(run_name=f"job{num}", status=status, stack=stack, stack_requested=stack, precision="fp32",
                       task="text_classification", config={"runtime": {"batch_size": 8}}, run_dir=str(job),
                       run_id=None, keys={"workload": "w", "baseline_key": "b"}, overrides="",
                       metrics=metrics if metrics is not None else {"accuracy": 80.0, "throughput": 100.0 + num},
                       tags={"task": "text_classification"})
    record.write(job)
    return job


def _cli(*args: str, cwd: Path):
    return subprocess.run([sys.executable, "-c", "import sys; from orchestrator.importer import main; "
                           "from orchestrator.summary import report_main; "
                           f"sys.exit({{'import': main, 'report': report_main}}[sys.argv[1]](sys.argv[2:]))", *args],
                          capture_output=True, text=True, cwd=cwd, timeout=300)


@pytest.fixture()
def hostile_sweep(tmp_path):
    """A sweep folder with an apostrophe in its path, one good job, damaged results.json files, a bad metric name
    and links that leave the run folder."""
    sweep = tmp_path / "team's sweep"
    _job(sweep, 0)
    for num, content in ((1, '{"status": "FINI'), (2, "[]"), (3, json.dumps({"status": "FINISHED", "metrics": "x"}))):
        job = sweep / str(num)
        (job / ".hydra").mkdir(parents=True)
        (job / "results.json").write_text(content)
    _job(sweep, 4, metrics={"accuracy": 80.0, "throughput": 90.0, "../../escape": 1.0})
    secret = tmp_path / "secret.txt"
    secret.write_text("do not upload")
    (sweep / "4" / "predictions_sample.json").symlink_to(secret)
    (sweep / "4" / ".hydra" / "leak.yaml").symlink_to(secret)
    return sweep, secret


def test_import_of_a_hostile_sweep_names_each_bad_file_and_goes_on(hostile_sweep, tmp_path):
    sweep, _ = hostile_sweep
    uri = mlflow_store(tmp_path / "store.db")
    done = _cli("import", str(sweep), "--tracking-uri", uri, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    for num in (1, 2, 3):
        line = next(x for x in lines if x.startswith(f"job {num}:"))
        assert "skipped" in line and "results.json" in line
    assert "refused 1 invalid metric(s): '../../escape'" in done.stdout
    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], "")
    assert runs and all(r.info.status != "RUNNING" for r in runs)  # nothing left RUNNING
    job4 = next(r for r in runs if r.data.tags.get("run_dir", "").endswith("/4"))
    assert "../../escape" not in job4.data.metrics
    names = {a.path for a in client.list_artifacts(job4.info.run_id)}
    assert "predictions_sample.json" not in names  # a link out of the run folder is not followed
    assert "leak.yaml" not in {a.path.rsplit("/", 1)[-1] for a in client.list_artifacts(job4.info.run_id, "hydra")}
    again = _cli("import", str(sweep), "--tracking-uri", uri, cwd=tmp_path)  # found again despite the apostrophe
    assert again.returncode == 0 and "created" not in again.stdout.split("\n", 1)[1]


def test_import_into_another_store_leaves_the_sweep_files_alone(tmp_path):
    sweep = tmp_path / "sweep"
    job = _job(sweep, 0)
    before = (job / "results.json").read_text()
    done = _cli("import", str(sweep), "--tracking-uri", f"sqlite:///{tmp_path / 'other.db'}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (job / "results.json").read_text() == before
    assert not (sweep / "mlflow_parent_run_id").exists() and not (sweep / "summary.csv").exists()


def test_report_on_hostile_files_prints_its_table(hostile_sweep, tmp_path):
    sweep, _ = hostile_sweep
    done = _cli("report", str(sweep), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr and "DAMAGED" in done.stdout
    assert sum("results.json" in line for line in done.stderr.splitlines()) == 3


def test_report_on_a_folder_that_is_no_sweep_says_so(tmp_path):
    done = _cli("report", str(tmp_path), cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0
    assert "not a sweep directory" in done.stderr


def test_a_folder_holding_a_run_or_a_sweep_is_never_reused(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    refuse_taken_run_dir(run_dir, resume=False)  # empty: fine
    (run_dir / "results.json").write_text("{}")
    with pytest.raises(ConfigError, match="already holds a run"):
        refuse_taken_run_dir(run_dir, resume=False)
    sweep = tmp_path / "sweep"
    refuse_taken_sweep_dir(sweep, resume=False)  # not there yet: fine
    _job(sweep, 0)
    with pytest.raises(ConfigError, match="resume=true"):
        refuse_taken_sweep_dir(sweep, resume=False)
    refuse_taken_sweep_dir(sweep, resume=True)  # the one way to continue it


def test_run_refuses_a_run_dir_that_holds_a_run(tmp_path, compose):
    from orchestrator.context import JobContext
    from orchestrator.runner import run

    (tmp_path / "results.json").write_text('{"status": "FINISHED"}')
    with pytest.raises(ConfigError, match="already holds a run"):
        run(compose("tracking=off"), JobContext(run_dir=tmp_path))
    assert json.loads((tmp_path / "results.json").read_text()) == {"status": "FINISHED"}


def test_a_row_names_the_precision_that_ran():
    from orchestrator.records import shown_precision

    assert shown_precision("fp32", "int8") == "int8"  # recipe=openvino_int8: int8 arithmetic on fp32 weights
    assert shown_precision("fp32", "fp32") == "fp32" and shown_precision("fp32", None) == "fp32"
    assert shown_precision("bf16_autocast", "bf16") == "bf16_autocast"
    # recipe=openvino_int8 without calibration: int8 weights, fp32 (or bf16) arithmetic
    assert shown_precision("fp32", "fp32", "int8") == "fp32+int8w"
    assert shown_precision("bf16", "bf16", "int8") == "bf16+int8w" and shown_precision("fp32", "int8", "int8") == "int8"


def test_a_refused_single_run_leaves_nothing_behind(tmp_path, compose):
    from orchestrator.context import JobContext
    from orchestrator.runner import run

    run_dir = tmp_path / "outputs" / "runs" / "x"
    (run_dir / ".hydra").mkdir(parents=True)  # as Hydra leaves it before the task runs
    (run_dir / ".hydra" / "config.yaml").write_text("{}")
    with pytest.raises(ConfigError, match="runtime.batch_size=0"):
        run(compose("tracking=off", "runtime.batch_size=0"), JobContext(run_dir=run_dir))
    assert not run_dir.exists()
    # a sweep's job keeps its record: the summary lists why it was refused
    job = tmp_path / "sweep" / "0"
    with pytest.raises(ConfigError):
        run(compose("tracking=off", "runtime.batch_size=0"), JobContext(run_dir=job, job_num=0))
    assert json.loads((job / "results.json").read_text())["refused"] is True


def _scenario_row(job, stack, figure, value, higher, valid=True):
    from orchestrator.records import summary_row

    return summary_row(str(job), "FINISHED", "text_classification", stack, "fp32", {"accuracy": 80.0}, None,
                       workload="w-server", baseline_key="b-server", scenario="server", figure=figure,
                       figure_value=value, figure_unit="queries/s" if higher else "ms", higher_is_better=higher,
                       scenario_valid=valid)


def test_scenario_jobs_are_judged_by_their_figure_of_merit():
    from orchestrator.tasks.text_classification import TextClassification
    from orchestrator import verdict

    rows = [_scenario_row(0, "eager", "server_max_qps", 40.0, True),
            _scenario_row(1, "jit", "server_max_qps", 60.0, True),
            _scenario_row(2, "onnxruntime", "server_max_qps", 0.0, True, valid=False)]
    verdict.assess(rows, 0.99, 0.95, lambda t: TextClassification, lambda r: None)
    line = verdict.recommend(rows)
    assert rows[1]["speedup"] == pytest.approx(1.5) and rows[1]["speedup_ci_low"] is None
    assert rows[2].get("speedup") is None  # no VALID rate: nothing to compare
    assert line.startswith("recommended: job 1 (jit/fp32): 1.50x on server_max_qps (60 queries/s; one LoadGen run")
    # a latency figure: lower is better, so half the p90 is twice as fast
    lat = [_scenario_row(0, "eager", "single_stream_p90_ms", 10.0, False),
           _scenario_row(1, "jit", "single_stream_p90_ms", 5.0, False)]
    verdict.assess(lat, 0.99, 0.95, lambda t: TextClassification, lambda r: None)
    assert lat[1]["speedup"] == pytest.approx(2.0)


def test_a_job_whose_timed_outputs_differ_fails_the_gate():
    from orchestrator.records import summary_row
    from orchestrator.tasks.text_classification import TextClassification
    from orchestrator import verdict

    rows = [summary_row("0", "FINISHED", "text_classification", "eager", "fp32",
                        {"accuracy": 80.0, "throughput": 10.0, "timed_equals_evaluated": 1.0}, None, workload="w"),
            summary_row("1", "FINISHED", "text_classification", "cache", "fp32",
                        {"accuracy": 80.0, "throughput": 30.0, "timed_equals_evaluated": 0.0}, None, workload="w")]
    verdict.assess(rows, 0.99, 0.95, lambda t: TextClassification, lambda r: None)
    assert rows[1]["gate"] == "fail" and "timed outputs differ" in rows[1]["gate_reason"]


def test_resume_refuses_a_sweep_with_a_live_job_or_other_overrides(tmp_path):
    import os
    import platform

    from omegaconf import OmegaConf

    from orchestrator.records import refuse_changed_overrides

    sweep = tmp_path / "sweep"
    job = _job(sweep, 0, status="RUNNING")
    record = json.loads((job / "results.json").read_text())
    record["tags"].update({"process.pid": str(os.getpid()), "host": platform.node()})  # this process: alive
    (job / "results.json").write_text(json.dumps(record))
    with pytest.raises(ConfigError, match=r"job\(s\) 0 \(process \d+\) of the sweep .* are still running"):
        refuse_taken_sweep_dir(sweep, resume=True)
    record["tags"]["process.pid"] = "999999999"  # gone: resume re-runs it
    (job / "results.json").write_text(json.dumps(record))
    refuse_taken_sweep_dir(sweep, resume=True)

    OmegaConf.save(OmegaConf.create({"hydra": {"overrides": {"task": ["runtime.batch_size=8,16"]}}}),
                   sweep / "multirun.yaml")
    refuse_changed_overrides(sweep, ["runtime.batch_size=8,16", "resume=true"])  # the same sweep
    with pytest.raises(ConfigError, match="was launched with runtime.batch_size=8,16, not runtime.batch_size=32"):
        refuse_changed_overrides(sweep, ["runtime.batch_size=32", "resume=true"])


def test_import_of_a_job_left_running_by_a_dead_process_ends_it_killed(tmp_path):
    sweep = tmp_path / "sweep"
    job = _job(sweep, 0, status="RUNNING")
    record = json.loads((job / "results.json").read_text())
    record["tags"].update({"process.pid": "999999999", "host": "this-host"})
    (job / "results.json").write_text(json.dumps(record))
    uri = mlflow_store(tmp_path / "store.db")
    done = _cli("import", str(sweep), "--tracking-uri", uri, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], "")
    job_run = next(r for r in runs if r.data.tags.get("run_dir", "").endswith("/0"))
    assert job_run.info.status == "KILLED" and all(r.info.status != "RUNNING" for r in runs)


def test_an_output_folder_that_cannot_be_created_is_named_by_its_key(tmp_path):
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    from orchestrator.hydra_patches import check_output_dir

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for key, mode in (("run", RunMode.RUN), ("sweep", RunMode.MULTIRUN)):
        for bad, why in (("/proc/x", "kernel file system"), (str(blocker / "x"), "is not a folder")):
            cfg = OmegaConf.create({"hydra": {key: {"dir": bad}}})
            with pytest.raises(ConfigError, match=f"^hydra.{key}.dir={bad}: the folder cannot be created .*{why}"):
                check_output_dir(cfg, mode)
        check_output_dir(OmegaConf.create({"hydra": {key: {"dir": str(tmp_path / "new" / "deep")}}}), mode)
