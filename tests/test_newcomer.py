"""What a newcomer meets (issue 18): sweep summaries that show what was swept, run names that tell jobs apart,
a run that says what it is doing, and one line when the CPU lacks what was asked for."""
from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest

from conftest import mlflow_store, run_cli, runs_of

BATCH_SIZES = [1, 2, 4, 8, 16]


@pytest.fixture(scope="module")
def batch_sweep(tmp_path_factory, tiny_encoder, sts_file):
    """A five-job sweep over runtime.batch_size (in-process jobs: accounting and labels, not timing, are tested)."""
    tmp = tmp_path_factory.mktemp("batch-sweep")
    uri = mlflow_store(tmp / "store.db")
    proc = run_cli("-m", f"model.name_or_path={tiny_encoder}", f"dataset.data_files={sts_file}", "runtime=quick",
                   f"runtime.batch_size={','.join(map(str, BATCH_SIZES))}", "hydra/launcher=basic",
                   f"tracking.uri={uri}", cwd=tmp)
    client, runs = runs_of(uri)
    parent = next(r for r in runs if r.data.tags.get("sweep") == "true")
    return proc, client, parent, [r for r in runs if r.data.tags.get("mlflow.parentRunId")]


@pytest.mark.slow
def test_a_sweep_summary_has_one_column_per_swept_key(batch_sweep):
    proc, client, parent, _ = batch_sweep
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep_dir = Path(parent.data.tags["sweep.dir"])
    table = pd.read_csv(sweep_dir / "summary.csv")
    assert list(table.columns[:4]) == ["job", "stack", "precision", "runtime.batch_size"]
    assert sorted(table["runtime.batch_size"]) == BATCH_SIZES
    md_header = (sweep_dir / "summary.md").read_text().split("| job |", 1)[1].split("\n", 1)[0]
    assert md_header.startswith(" stack | precision | runtime.batch_size |")
    assert "runtime.batch_size" in proc.stdout  # the console table's column
    logged = client.download_artifacts(parent.info.run_id, "summary_table.json", str(sweep_dir / "dl"))
    assert "runtime.batch_size" in Path(logged).read_text()
    # where the files went, on the sweep's own output
    assert f"summary files: {sweep_dir}/ (summary.csv, summary.md, summary.png)" in proc.stdout


@pytest.mark.slow
def test_the_summary_plot_has_one_labelled_bar_per_swept_value(batch_sweep):
    from orchestrator.summary import assess, bar_layout, merge_rows, rows_from_dir

    _, _, parent, _ = batch_sweep
    sweep_dir = Path(parent.data.tags["sweep.dir"])
    rows = merge_rows([], rows_from_dir(sweep_dir))
    assess(rows)
    bars = bar_layout([r for r in rows if r.get("throughput")])
    assert len({x for x, _, _ in bars}) == 5
    # numeric order, each bar labelled with its own value
    assert [label.splitlines()[0] for _, label, _ in bars] == [f"batch_size={b}" for b in BATCH_SIZES]
    assert (sweep_dir / "summary.png").stat().st_size > 10_000


@pytest.mark.slow
def test_run_names_carry_the_swept_values(batch_sweep):
    _, _, _, children = batch_sweep
    names = sorted(r.info.run_name for r in children)
    assert len(set(names)) == 5
    # what tells the jobs apart comes first: MLflow's list cuts long names at the end
    assert all(re.match(r"^bs=\d+-eager-fp32-", n) for n in names), names
    assert sorted(int(r.data.tags["swept"].split("=")[1]) for r in children) == BATCH_SIZES
    assert all("runtime.batch_size=" in r.data.tags["overrides"] for r in children)  # the full overrides stay


@pytest.mark.slow
def test_a_run_says_what_it_is_doing_and_warns_about_emulated_bf16(tmp_path, tiny_encoder, sts_file):
    """Status lines per phase before the progress bars; bf16 on a CPU without native bf16 gets one line (an AVX2
    cap of oneDNN stands in for an AVX2-only CPU on any machine)."""
    proc = run_cli(f"model.name_or_path={tiny_encoder}", f"dataset.data_files={sts_file}", "runtime=quick",
                   "precision=bf16", "tracking=off", cwd=tmp_path, env={"ONEDNN_MAX_CPU_ISA": "AVX2"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    phases = ["loading model", "loading data", "tokenizing", "applying precision=bf16", "accuracy pass",
              "timing pass"]
    out = proc.stdout + proc.stderr  # Hydra's console log handler writes to stdout
    where = [out.find(f" - {p}") for p in phases]
    assert all(w >= 0 for w in where) and where == sorted(where), out[-3000:]
    warning = next(ln for ln in out.splitlines() if "asks for bf16" in ln)
    assert "neither AVX512-BF16 nor AMX" in warning and "precision=fp32" in warning
    assert "p90 ms" in proc.stdout  # runtime=single_stream tells users to read it: every run shows it


@pytest.mark.slow
def test_int8_without_vnni_is_one_warning_line(tmp_path, tiny_encoder, sts_file):
    proc = run_cli(f"model.name_or_path={tiny_encoder}", f"dataset.data_files={sts_file}", "runtime=quick",
                   "optimization=[quantize]", "dataset.max_samples=8", "tracking=off", cwd=tmp_path,
                   env={"ONEDNN_MAX_CPU_ISA": "AVX2"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "computes in int8" in ln]
    assert len(lines) == 1 and "no VNNI" in lines[0] and "recipe=onnxruntime_fp32" in lines[0]


@pytest.mark.slow
def test_a_second_sweep_into_a_taken_sweep_folder_is_refused(batch_sweep, tmp_path, tiny_encoder, sts_file):
    """Issue 25 item 3 through the CLI: never merged into, never overwritten; one line, exit 2."""
    proc, client, parent, children = batch_sweep
    sweep_dir = Path(parent.data.tags["sweep.dir"])
    before = {p: p.read_bytes() for p in sorted(sweep_dir.glob("*/results.json")) + [sweep_dir / "summary.csv"]}
    uri = client.tracking_uri
    again = run_cli("-m", f"model.name_or_path={tiny_encoder}", f"dataset.data_files={sts_file}", "runtime=quick",
                    "runtime.batch_size=1,2", "hydra/launcher=basic", f"hydra.sweep.dir={sweep_dir}",
                    f"tracking.uri={uri}", cwd=tmp_path)
    assert again.returncode == 2, again.stderr[-3000:]
    lines = [ln for ln in again.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: hydra.sweep.dir={sweep_dir}: the folder already holds "
                                                   "a sweep (jobs 0, 1, 2, 3, 4)"), again.stderr
    assert "add resume=true to continue that sweep" in lines[0]
    assert {p: p.read_bytes() for p in before} == before  # the first sweep's files untouched
    assert len(runs_of(uri)[1]) == 1 + len(children)  # no second parent, no new job
