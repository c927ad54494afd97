"""A plugin from another package is first-class: installed, it is chosen by name, listed, and validated."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import REPO, run_cli, tiny_sts_overrides

EXAMPLE = REPO / "examples" / "orchestrator-attention-plugin"


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    """examples/orchestrator-attention-plugin pip-installed into a directory of its own (on PYTHONPATH)."""
    target = tmp_path_factory.mktemp("site")
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                           "--target", str(target), str(EXAMPLE)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (target / "orchestrator_attention.py").is_file()
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(target), os.environ.get("PYTHONPATH")]))}


def test_an_installed_plugin_is_listed_by_help_and_by_the_one_line_error(tmp_path, installed):
    help_text = run_cli("--help", cwd=tmp_path, env=installed, timeout=120).stdout
    options = help_text.split("optimization:", 1)[1].splitlines()[0]
    assert "attention" in options and "jit" in options
    proc = run_cli("optimization=[nope]", "tracking=off", cwd=tmp_path, env=installed, timeout=120)
    assert proc.returncode == 2
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: optimization=nope: unknown choice; valid: ") and "attention" in line


def test_an_installed_plugins_options_are_validated_like_the_builtins(tmp_path, installed):
    proc = run_cli("optimization=[attention]", "optimization.attention.implementation=flash", "tracking=off",
                   cwd=tmp_path, env=installed, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == ("error: optimization.attention.implementation: Invalid value "
                                                    "'flash', expected one of [eager, sdpa]")


@pytest.mark.slow
def test_an_installed_plugin_runs_through_the_cli(tmp_path, installed, tiny_encoder, sts_file):
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    proc = run_cli(*tiny_sts_overrides(tiny_encoder, sts_file, uri), "optimization=[attention,jit]",
                   "optimization.attention.implementation=eager", cwd=tmp_path, env=installed)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient(uri)
    run = client.search_runs([client.get_experiment_by_name("orchestrator").experiment_id])[0]
    assert run.info.status == "FINISHED" and run.data.tags["stack"] == "attention+jit"
    assert run.data.tags["plugin.attention.implementation"] == "eager"
    assert run.data.tags["plugin.attention.was"] == "sdpa"
    assert run.data.params["optimization.attention.implementation"] == "eager"
    assert run.data.metrics["parity_max_abs_diff"] < 1e-4  # the same maths through another kernel
    assert Path(EXAMPLE / "pyproject.toml").is_file()


def test_the_core_names_no_plugin():
    """Plugins own their behaviour; the core only knows the contract (orchestrator/plugin.py)."""
    import re

    from orchestrator.registry import plugins

    names = [n for n in plugins.names() if plugins.get(n).__module__.startswith("orchestrator_plugins.")]
    assert {"jit", "ipex", "quantize"} <= set(names)
    for path in sorted((REPO / "orchestrator").rglob("*.py")):
        text = re.sub(r"re\.compile\(", "", path.read_text())
        for name in names:
            assert not re.search(rf"\b{name}\b", text, re.IGNORECASE), f"{path.relative_to(REPO)} names {name!r}"


def test_builtin_data_resolves_in_any_installed_package(tmp_path, monkeypatch):
    from orchestrator.data import builtin_path

    pkg = tmp_path / "sample_data_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "rows.tsv").write_text("text\tlabel\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert builtin_path("sample_data_pkg/rows.tsv") == pkg / "rows.tsv"
    assert builtin_path("sts_smoke.tsv").name == "sts_smoke.tsv" and builtin_path("sts_smoke.tsv").is_file()
