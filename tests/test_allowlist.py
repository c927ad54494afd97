"""A preset or command line cannot make Hydra call arbitrary callables (hydra.callbacks, logging dictConfigs):
refused in one line before anything runs, exit 2, no file touched, no MLflow run; ORCH_ALLOWED_TARGETS allows."""
from __future__ import annotations

import pytest

from conftest import run_cli
from orchestrator import allowlist
from orchestrator.errors import ConfigError

QUICK = ["runtime=quick", "dataset.max_samples=8"]


@pytest.fixture()
def victim(tmp_path):
    f = tmp_path / "victim.txt"
    f.write_text("keep me")
    return f


def assert_refused(proc, first: str, victim, tmp_path):
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(first)
    assert victim.read_text() == "keep me"
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "outputs").exists()


def test_a_callback_from_the_command_line_is_refused(tmp_path, victim):
    proc = run_cli(*QUICK, f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", "+hydra.callbacks.x._target_=builtins.open",
                   f"+hydra.callbacks.x._args_=[{victim},w]", cwd=tmp_path)
    assert_refused(proc, "error: hydra.callbacks.x._target_='builtins.open': a callback outside the allowlist is not "
                         "allowed; allowed: orchestrator.sweep.MlflowSweepCallback (add a trusted one with "
                         "ORCH_ALLOWED_TARGETS=<module.Name>)", victim, tmp_path)


def test_a_shared_preset_cannot_run_a_callable_in_a_sweep(tmp_path, victim):
    preset = tmp_path / "shared" / "experiment"
    preset.mkdir(parents=True)
    (preset / "shared_preset.yaml").write_text(
        "# @package _global_\nhydra:\n  callbacks:\n    x:\n      _target_: builtins.open\n"
        f"      _args_: ['{victim}', w]\n")
    proc = run_cli("--config-dir", str(tmp_path / "shared"), "-m", *QUICK,
                   f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", "experiment=shared_preset", cwd=tmp_path)
    assert_refused(proc, "error: hydra.callbacks.x._target_='builtins.open'", victim, tmp_path)


@pytest.mark.parametrize("override,first", [
    ("hydra.job_logging.handlers.console.class=builtins.print",
     "error: hydra.job_logging.handlers.console.class='builtins.print': a logging class outside the logging module"),
    ("+hydra.callbacks.mlflow_sweep.args._target_=builtins.exec",
     "error: hydra.callbacks.mlflow_sweep.args._target_='builtins.exec': a nested _target_ is not allowed"),
])
def test_logging_classes_and_nested_targets_are_refused(tmp_path, victim, override, first):
    proc = run_cli(*QUICK, f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", override, cwd=tmp_path)
    assert_refused(proc, first, victim, tmp_path)


def test_the_allowlist_is_an_environment_variable(monkeypatch):
    callbacks = {"mine": {"_target_": "my_pkg.Callback"}, "mlflow_sweep": {"_target_": allowlist.OWN_CALLBACKS and
                                                                           "orchestrator.sweep.MlflowSweepCallback"}}
    with pytest.raises(ConfigError, match=r"^hydra.callbacks.mine._target_='my_pkg.Callback'"):
        allowlist.check_callbacks(callbacks)
    monkeypatch.setenv(allowlist.ENV, "my_pkg.Callback, my_pkg.Handler")
    allowlist.check_callbacks(callbacks)
    allowlist.check_logging({"handlers": {"h": {"class": "my_pkg.Handler"}, "c": {"class": "logging.StreamHandler"}}},
                            "hydra.job_logging")


def test_a_logging_factory_in_a_preset_is_refused(tmp_path, victim):
    preset = tmp_path / "shared" / "experiment"
    preset.mkdir(parents=True)
    (preset / "logs.yaml").write_text("# @package _global_\nhydra:\n  hydra_logging:\n    formatters:\n"
                                      "      simple:\n        (): os.system\n")
    proc = run_cli("--config-dir", str(tmp_path / "shared"), *QUICK, f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
                   "experiment=logs", cwd=tmp_path)
    assert_refused(proc, "error: hydra.hydra_logging.formatters.simple.()='os.system': a logging factory outside the "
                         "logging module is not allowed; allowed: logging handler/formatter/filter classes", victim, tmp_path)
