"""The core's shape: an acyclic import graph, one owner for the run record, a run's identity passed in."""
from __future__ import annotations

import ast
import graphlib
import json
from pathlib import Path

import pytest

from conftest import REPO

PACKAGE = REPO / "orchestrator"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path, modules: set) -> set:
    """Every orchestrator module ``path`` imports, at module level or inside functions (a lazy import is still a
    dependency: it only hides a cycle until the function runs)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            candidates = [f"{target}.{a.name}" for a in node.names] + [target]
        elif isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        else:
            continue
        for c in candidates:
            if c in modules and c != name:
                out.add(c)
                break
    return out


def import_graph() -> dict:
    files = sorted(PACKAGE.rglob("*.py"))
    modules = {_module_name(p) for p in files}
    # a package's __init__ re-exporting its API is not a dependency of the modules inside it
    return {_module_name(p): {m for m in _imports(p, modules) if m != "orchestrator"} for p in files}


def test_core_import_graph_is_acyclic():
    graph = import_graph()
    try:
        order = list(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as e:
        pytest.fail(f"import cycle in the core: {' -> '.join(e.args[1])}")
    assert "orchestrator.records" in order


def test_composing_a_config_imports_no_framework():
    """Every CLI start (a sweep's own process, --help, a one-line config error, orchestrator-report) registers the
    tasks' and plugins' options: that must not import torch, transformers or a metrics library (~3 s of imports
    per start, measured on the 2-core Xeon), only the job processes that run a model do."""
    import subprocess
    import sys

    code = ("import sys; import orchestrator.config as c; c.register_configs(); "
            "print(sorted(m for m in ('torch', 'transformers', 'torchmetrics', 'scipy', 'pandas', 'numpy', "
            "'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_a_bad_value_is_refused_before_torch_loads(tmp_path):
    """A single run's bad value is one error line as fast as a bad choice (0.6 s, not 3.5 s on the 2-core AMD
    EPYC): the CLI checks the values before it imports the runner (and torch with it)."""
    import subprocess
    import sys

    code = ("import runpy, sys\n"
            "sys.argv = ['orchestrator', 'runtime.batch_size=0', 'tracking=off']\n"
            "try:\n    runpy.run_module('orchestrator', run_name='__main__')\n"
            "except SystemExit as e:\n"
            "    print(e.code, sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.stdout.strip() == "2 []", out.stderr[-2000:]
    assert out.stderr.strip().splitlines() == ["error: runtime.batch_size=0: must be >= 1"]
    assert not (tmp_path / "outputs").exists() or not any((tmp_path / "outputs").rglob("results.json"))


def test_record_owner_is_the_only_writer_of_results_json():
    """results.json is written through RunRecord only (runner, launchers, importer)."""
    writers = []
    for path in [*PACKAGE.rglob("*.py"), *(REPO / "hydra_plugins").rglob("*.py")]:
        text = path.read_text()
        if path.name != "records.py" and ('"results.json").write_text' in text or "RESULTS_FILE).write_text" in text):
            writers.append(str(path.relative_to(REPO)))
    assert writers == []


def test_a_damaged_results_json_is_one_line(tmp_path):
    from orchestrator.records import RecordError, read_record, row_of_dir

    cases = {"truncated": '{"status": "FINI', "binary": b"\x00\xff\x00", "list": "[]",
             "metrics": json.dumps({"status": "FINISHED", "metrics": "x"})}
    for name, content in cases.items():
        job = tmp_path / name
        (job / ".hydra").mkdir(parents=True)
        f = job / "results.json"
        f.write_bytes(content if isinstance(content, bytes) else content.encode())
        with pytest.raises(RecordError) as e:
            read_record(f)
        assert "\n" not in str(e.value) and str(f) in str(e.value)
        assert row_of_dir(job)["status"] == "DAMAGED"


def test_job_context_makes_run_callable_without_hydra(tmp_path):
    """run(cfg, ctx) learns who it is from its argument: a sweep job's identity without Hydra's globals."""
    from orchestrator.context import JobContext

    ctx = JobContext(run_dir=tmp_path / "3", job_num=3, swept_keys=("runtime.batch_size", "precision"),
                     overrides=("runtime.batch_size=16", "precision=bf16"), parent_run_id="abc")
    assert ctx.in_sweep and ctx.swept_values() == {"bs": "16"}
    assert JobContext().swept_values() == {} and not JobContext().in_sweep
    assert JobContext().with_run_dir().run_dir.parent == Path("outputs/runs")


def _leaves(node, prefix=""):
    from omegaconf import DictConfig

    if isinstance(node, DictConfig):
        for k in node.keys():
            if k != "defaults":
                yield from _leaves(node._get_node(k), f"{prefix}.{k}" if prefix else str(k))
    else:
        yield prefix, node._value()


def test_no_group_file_restates_a_schema_default():
    """Each default is written once, in the schema: a config group's file (model, dataset, precision, runtime,
    tracking, summary, race, scenario) sets only what differs from it. Presets (experiment, recipe, sweep) are
    overrides on top of other choices and may repeat a value on purpose."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    from orchestrator.config import RunConfig

    schema = OmegaConf.structured(RunConfig)
    restated = []
    for f in sorted((REPO / "conf").rglob("*.yaml")):
        group = f.parent.relative_to(REPO / "conf").as_posix()
        if group.split("/")[0] in ("hydra", "experiment", "recipe", "sweep", ".") or f.name == "config.yaml":
            continue
        for key, value in _leaves(OmegaConf.load(f) or OmegaConf.create(), group.replace("/", ".")):
            default = OmegaConf.select(schema, key, default=None, throw_on_missing=False)
            if default is not None and not isinstance(default, (DictConfig, ListConfig)) and str(default) == str(value):
                restated.append(f"{f.relative_to(REPO)}: {key}={value}")
    assert restated == []


def _default_literals(path: Path) -> list:
    """Code (not docstrings or comments) in ``path`` that writes a schema default again."""
    import io
    import re
    import tokenize

    text = path.read_text()
    docstrings = {n for node in ast.walk(ast.parse(text)) if isinstance(node, ast.Expr)
                  and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)
                  for n in range(node.lineno, node.end_lineno + 1)}
    lines = text.splitlines()
    found = []
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        line = tok.start[0]
        if line in docstrings:
            continue
        gate = line <= len(lines) and re.search(r"min_accuracy_ratio|min_agreement", lines[line - 1])
        if tok.type == tokenize.NUMBER and gate and tok.string in ("0.99", "0.95"):
            found.append(f"{path.relative_to(REPO)}:{line}: {tok.string} (summary.* gate default)")
        if tok.type == tokenize.STRING and ("sqlite:///outputs/mlflow.db" in tok.string
                                            or tok.string in ('"eager"', "'eager'")):
            found.append(f"{path.relative_to(REPO)}:{line}: {tok.string} (tracking.uri / records.EAGER)")
    return found


def test_defaults_are_not_written_again_in_code():
    """The gate thresholds, the default store and the empty stack's label live in the schema / records only."""
    owners = {"config.py", "records.py"}
    found = [f for path in [*PACKAGE.rglob("*.py"), *(REPO / "hydra_plugins").rglob("*.py"),
                            *(REPO / "plugins").rglob("*.py")]
             if path.name not in owners for f in _default_literals(path)]
    assert found == []


def test_the_suite_order_names_only_test_files_that_exist():
    """FILE_SECONDS queues the heaviest files first (conftest): a renamed file would silently fall back to the
    per-test estimate and could run last again."""
    from conftest import FILE_SECONDS

    missing = [name for name in FILE_SECONDS if not (REPO / "tests" / name).is_file()]
    assert not missing, f"FILE_SECONDS names files that are gone: {missing}"
