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
