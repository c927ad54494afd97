"""A plugin from another package is first-class: installed, it is chosen by name, listed, and validated."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import REPO, mlflow_store, run_cli, tiny_sts_overrides

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
    uri = mlflow_store(tmp_path / "store.db")
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


# -- the public plugin API (orchestrator.plugin_api) ----------------------------------------------------------------------

def test_builtins_import_nothing_private_from_the_orchestrator():
    """What a built-in plugin uses, an out-of-tree one can import: orchestrator.plugin_api and nothing else."""
    import ast

    for path in sorted((REPO / "plugins").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            for name in names:
                if name == "orchestrator" or name.startswith("orchestrator."):
                    assert name == "orchestrator.plugin_api", f"plugins/{path.name} imports {name}"
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("orchestrator_plugins."):
                assert all(not a.name.startswith("_") for a in node.names), f"plugins/{path.name}: private import"
    from orchestrator import plugin_api

    assert all(hasattr(plugin_api, n) for n in plugin_api.__all__)


def test_the_example_plugins_conformance_test_passes(tmp_path, monkeypatch):
    import importlib

    monkeypatch.syspath_prepend(str(EXAMPLE))
    module = importlib.import_module("test_orchestrator_attention")
    module.test_the_class_keeps_the_contract()
    module.test_check_apply_and_what_it_reports_keep_the_contract(tmp_path)


def test_every_builtin_keeps_the_contract_as_a_class():
    from orchestrator.plugin_api import check_plugin
    from orchestrator.registry import plugins

    for name in plugins.names():
        check_plugin(plugins.get(name))


def test_check_plugin_lists_every_breach(tmp_path, tiny_encoder):
    import dataclasses

    import torch
    from transformers import AutoModel

    from orchestrator.plugin_api import Plugin, PluginContractError, check_plugin

    class NotAPlugin:
        name = "x"

    with pytest.raises(PluginContractError, match="is not a subclass of orchestrator.plugin_api.Plugin"):
        check_plugin(NotAPlugin)

    @dataclasses.dataclass
    class Opts:
        level: int = -1

    class Sloppy(Plugin):
        name = "Sloppy Plugin"
        conflicts = "jit"
        Options = Opts

        @classmethod
        def validate_options(cls, o):
            cls.require_at_least("level", o.level, 0)

    with pytest.raises(PluginContractError) as e:
        check_plugin(Sloppy)
    lines = str(e.value).splitlines()
    assert lines[0].endswith("Sloppy breaks the orchestrator plugin contract:")
    assert "- name='Sloppy Plugin': must be a lower-case identifier (what users type in optimization=[...])" in lines
    assert "- conflicts='jit': must be a tuple of names" in lines
    assert "- Options: the defaults must make a valid config schema and pass validate_options " \
           "(optimization.Sloppy Plugin.level=-1: must be >= 0)" in lines
    assert "- apply: not implemented" in lines

    class Tuples(Plugin):
        name = "tuples"

        def apply(self, model, ctx):
            return lambda **inputs: (model(**inputs).last_hidden_state,)

    model = AutoModel.from_pretrained(tiny_encoder).eval()
    batch = {"input_ids": torch.tensor([[2, 7, 8, 3], [2, 9, 3, 0]]), "attention_mask": torch.tensor([[1, 1, 1, 1],
                                                                                                     [1, 1, 1, 0]])}
    with pytest.raises(PluginContractError, match="the optimized model returned tuple: it must return a mapping"):
        check_plugin(Tuples, model, batch, run_dir=tmp_path)


def test_the_registry_refuses_an_entry_point_that_is_no_plugin_in_one_line():
    from orchestrator.errors import ConfigError
    from orchestrator.registry import Registry

    class EP:
        name, value = "oops", "some_pkg.module:helper"

        @staticmethod
        def load():
            def helper():
                pass
            return helper

    registry = Registry("orchestrator.plugins", "optimization plugin", base="orchestrator.plugin:Plugin")
    registry._eps = {"oops": EP}
    with pytest.raises(ConfigError) as e:
        registry.get("oops")
    assert str(e.value) == ("optimization plugin 'oops': entry point orchestrator.plugins:oops = "
                            "some_pkg.module:helper is a function "
                            "test_the_registry_refuses_an_entry_point_that_is_no_plugin_in_one_line.<locals>.EP.load."
                            "<locals>.helper, not a subclass of orchestrator.plugin_api.Plugin; fix or uninstall the "
                            "package that registers it")
    with pytest.raises(ConfigError, match=r"^task 'x': the registered object is a class builtins.dict, not a subclass "
                                          r"of orchestrator.tasks.base.Task"):
        Registry("orchestrator.tasks", "task", base="orchestrator.tasks.base:Task").register("x", dict)


def test_process_state_is_entered_for_the_stack_and_for_plugins_that_opt_in(monkeypatch):
    import contextlib

    from orchestrator.plugin import Plugin, process_states
    from orchestrator.registry import plugins

    entered = []

    def make(name, wide):
        class P(Plugin):
            process_wide = wide

            @classmethod
            @contextlib.contextmanager
            def process_state(cls, stack):
                entered.append(cls.name)
                yield None

        P.name = name
        return P

    monkeypatch.setattr(plugins, "_loaded", {**plugins._loaded, "in_stack": make("in_stack", False),
                                             "bystander": make("bystander", False), "global": make("global", True)})
    with contextlib.ExitStack() as stack:
        for cm in process_states(["in_stack"]):
            stack.enter_context(cm)
    assert sorted(entered) == ["global", "in_stack"]
    assert plugins.get("ipex").process_wide and not plugins.get("pt2e").process_wide
