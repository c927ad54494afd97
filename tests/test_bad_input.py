"""Bad input as a user meets it: one `error:` line naming the key/value and what is valid, exit status 2; no MLflow
run for what the config alone shows to be wrong, a FAILED one once the run has started.

The words come from the run itself (``orchestrator.cli`` only prints them), so most cases run in process; the CLI
runs end to end where it adds something: a run that fails after its MLflow run started, and a store it cannot
write (exit 1, the results kept)."""
from __future__ import annotations

import shutil

import pytest
from mlflow.tracking import MlflowClient

from conftest import mlflow_store, run_cli

pytestmark = pytest.mark.slow


def last_line(proc) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    return lines[-1] if lines else ""


@pytest.fixture()
def cli(tmp_path, tiny_encoder, sts_file):
    uri = mlflow_store(tmp_path / "store.db")

    def _run(*args: str):
        base = [f"model.name_or_path={tiny_encoder}", f"dataset.data_files={sts_file}", "runtime=quick",
                f"tracking.uri={uri}"]
        proc = run_cli(*base, *args, cwd=tmp_path, timeout=300)
        assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
        return proc, uri

    return _run


@pytest.fixture()
def refused(compose, tmp_path, tiny_encoder, sts_file, caplog):
    """The run in process: (the CLI's error line, its exit status, the store, what the run logged)."""
    from orchestrator.cli import exit_code, one_line
    from orchestrator.runner import run

    uri = mlflow_store(tmp_path / "store.db")

    def _run(*args: str):
        base = [f"model.name_or_path={tiny_encoder}", f"dataset.data_files={sts_file}", "runtime=quick",
                f"tracking.uri={uri}"]
        caplog.clear()
        with caplog.at_level("INFO"):
            with pytest.raises(Exception) as e:
                run(compose(*base, *args))
        line = f"error: {one_line(e.value)}"
        assert "\n" not in line
        return line, exit_code(e.value), uri, caplog.text

    return _run


def no_runs(uri: str) -> bool:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("orchestrator")
    return exp is None or not client.search_runs([exp.experiment_id])


def only_run_status(uri: str):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("orchestrator")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    return runs[0].info.status, runs[0].data.tags.get("error")


def broken_copy(src, dest, drop=(), truncate=None):
    shutil.copytree(src, dest)
    for name in drop:
        (dest / name).unlink()
    if truncate:
        data = (dest / truncate).read_bytes()
        (dest / truncate).write_bytes(data[: len(data) // 3])
    return dest


def test_model_dir_without_weights(cli, tmp_path, tiny_encoder):
    bad = broken_copy(tiny_encoder, tmp_path / "noweights", drop=["model.safetensors"])
    proc, uri = cli(f"model.name_or_path={bad}")
    assert proc.returncode == 2
    assert last_line(proc).startswith(f"error: model.name_or_path='{bad}': weights could not be loaded: ")
    assert only_run_status(uri)[0] == "FAILED"


def test_truncated_safetensors(refused, tmp_path, tiny_encoder):
    bad = broken_copy(tiny_encoder, tmp_path / "truncated", truncate="model.safetensors")
    line, code, uri, _ = refused(f"model.name_or_path={bad}")
    assert code == 2
    assert line.startswith(f"error: model.name_or_path='{bad}': weights could not be loaded: ")
    status, error = only_run_status(uri)
    assert status == "FAILED" and error.startswith("model.name_or_path=")


def test_tokenizer_missing(refused, tmp_path, tiny_encoder):
    drop = [p.name for p in tiny_encoder.iterdir() if p.name.startswith(("tokenizer", "vocab", "special_tokens"))]
    bad = broken_copy(tiny_encoder, tmp_path / "notok", drop=drop)
    line, code, _, _ = refused(f"model.name_or_path={bad}")
    assert code == 2
    assert line.startswith(f"error: model.name_or_path='{bad}': tokenizer could not be loaded")


def test_dataset_file_missing(refused, tmp_path):
    line, code, uri, _ = refused(f"dataset.data_files={tmp_path / 'nope.tsv'}")
    assert code == 2
    assert line == (f"error: dataset.data_files: file not found: {tmp_path / 'nope.tsv'} "
                    f"(resolved to {tmp_path / 'nope.tsv'})")
    assert only_run_status(uri)[0] == "FAILED"


def test_dataset_with_unreadable_encoding(refused, tmp_path):
    bad = tmp_path / "latin1.tsv"
    bad.write_bytes("sentence1\tsentence2\tscore\ncaf\xe9 au lait\tle caf\xe9\t3.0\n".encode("latin-1"))
    line, code, _, _ = refused(f"dataset.data_files={bad}")
    assert code == 2
    assert line.startswith(f"error: dataset 'csv' (files '{bad}', split 'train') could not be loaded: "
                           "UnicodeDecodeError")


def test_dataset_with_zero_rows(refused, tmp_path):
    empty = tmp_path / "empty.tsv"
    empty.write_text("sentence1\tsentence2\tscore\n")
    line, code, _, _ = refused(f"dataset.data_files={empty}")
    assert code == 2
    assert line == "error: dataset 'csv' split 'train' has 0 rows (after max_samples/filters)"


def test_unknown_plugin_and_bad_order(refused):
    line, code, _, _ = refused("optimization=[jit,nope]")
    assert code == 2 and line.startswith("error: optimization=nope: unknown choice; valid: ")
    line, code, uri, _ = refused("optimization=[jit,bettertransformer]")
    assert code == 2
    assert line.startswith("error: optimization=[jit,bettertransformer]: 'bettertransformer' must come "
                           "before 'jit'; valid order: ")
    assert no_runs(uri)  # what the config alone shows is refused before any MLflow run exists


def test_an_unavailable_environment_is_refused_before_loading(refused):
    """IPEX in the main environment (torch 2.13): exit 2, one line, no MLflow run, no model loaded."""
    line, code, uri, logged = refused("optimization=[ipex]")
    assert code == 2 and line.startswith("error: optimization plugin 'ipex'")
    assert "loading model" not in logged and no_runs(uri)


def test_unwritable_tracking_store_keeps_the_run(cli, tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the store's folder should be")
    proc, _ = cli(f"tracking.uri=sqlite:///{blocker}/mlflow.db")
    # the measurement is kept, but tracking was asked for and failed: one line, exit 1 (test_tracking_faults.py)
    assert proc.returncode == 1, proc.stderr[-1500:]
    assert last_line(proc).startswith(
        f"error: MLflow tracking failed (start: tracking.uri=sqlite:///{blocker}/mlflow.db:")
    assert "MLflow tracking failed" in proc.stdout and "results.json" in proc.stdout
    assert list(tmp_path.glob("outputs/runs/*/*/results.json"))
