"""The sweep's story at a glance: plot labels that never collide, units on every axis and column, what the MLflow
parent run and experiment carry for the UI (winner, speedup with interval, accuracy cost, every job's figure), and
how much a sweep stored. What a real sweep leaves on a live server for the UI is checked in
tests/test_distributed.py (check_server_picture); the browser screenshots are benchmarks/dashboard_screenshots.py (run by hand: a
sweep and headless Chromium take minutes, and the PNGs are for a person to look at)."""
from __future__ import annotations

import itertools

import pytest

from orchestrator import summary

STACKS = ["eager", "jit", "onnxruntime", "openvino", "pt2e", "compile"]
PRECISIONS = ["fp32", "bf16", "int8", "int8"]


def synthetic_rows(n: int, spread: float = 1.0, swept: bool = True):
    """n finished jobs of one workload, job 0 the eager fp32 baseline; ``spread`` 0 puts every point on the same
    spot (the worst case for numbers beside points)."""
    rows = []
    for i, (stack, precision) in zip(range(n), itertools.product(STACKS, PRECISIONS)):
        stack, precision = ("eager", "fp32") if i == 0 else (stack, precision)
        tp = 1000.0 + spread * 37.0 * i
        rows.append({"job": str(i), "stack": stack, "precision": precision, "metric": "spearman",
                     "value": 80.0 - spread * 0.05 * (i % 5), "throughput": tp, "throughput_ci_low": tp * 0.97,
                     "throughput_ci_high": tp * 1.03, "status": "FINISHED", "task": "sentence_similarity",
                     "workload": "w", "baseline_key": "b", "run_id": None,
                     "overrides": f"recipe={stack}_{precision}_{i}" if swept else ""})
    summary.assess(rows)
    return rows


def text_boxes(fig, ax, ticks: bool = True):
    """Every text drawn in ``ax`` (its x tick labels when ``ticks``, annotations), as the renderer places them."""
    renderer = fig.canvas.get_renderer()
    texts = [t for t in (ax.get_xticklabels() if ticks else []) + ax.texts if t.get_visible() and t.get_text()]
    return [(t.get_text(), t.get_window_extent(renderer)) for t in texts]


def collisions(boxes):
    return [(a, b) for (a, ba), (b, bb) in itertools.combinations(boxes, 2)
            if ba.x0 < bb.x1 and bb.x0 < ba.x1 and ba.y0 < bb.y1 and bb.y0 < ba.y1]


@pytest.mark.parametrize("n", [2, 6, 9, 16, 24])
@pytest.mark.parametrize("spread", [1.0, 0.0])
def test_plot_labels_never_collide(n, spread):
    import matplotlib.pyplot as plt

    rows = synthetic_rows(n, spread)
    fig = summary.figure(rows, "title")
    try:
        fig.canvas.draw()
        scatter, legend_ax, bars = fig.axes
        point_boxes = text_boxes(fig, scatter, ticks=False)
        # every job's number is beside its point, none over another
        assert sorted(t for t, _ in point_boxes) == sorted(r["job"] for r in rows)
        assert not collisions(point_boxes), collisions(point_boxes)
        bar_boxes = text_boxes(fig, bars)
        assert len([t for t, _ in bar_boxes if t.endswith("x")]) == n - 1  # a speedup per non-baseline bar
        assert not collisions(bar_boxes), collisions(bar_boxes)
        # a speedup sits above its bar's interval, never through it
        for text in bars.texts:
            assert text.xy[1] >= next(r["throughput_ci_high"] for r in rows
                                      if f"{r['speedup']:.2f}x" == text.get_text()) - 1e-9
        legend = legend_ax.get_legend()
        assert len(legend.get_texts()) >= n
    finally:
        plt.close(fig)


def test_every_axis_has_a_unit():
    import matplotlib.pyplot as plt

    fig = summary.figure(synthetic_rows(4))
    try:
        scatter, _, bars = fig.axes
        assert scatter.get_xlabel() == "throughput (sentences/s (2 per pair))"
        assert scatter.get_ylabel() == "spearman (0-100 scale, higher is better)"
        assert bars.get_ylabel() == "throughput (sentences/s (2 per pair), 95% interval)"
    finally:
        plt.close(fig)


def test_console_columns_say_their_units():
    from rich.console import Console

    rows = synthetic_rows(3)
    console = Console(width=400, record=True)
    console.print(summary.table(rows))
    head = console.export_text().splitlines()[1]
    assert "sentences/s" in head and "p50 ms/batch" in head and "p90 ms/batch" in head


def test_run_results_table_says_batch_and_row_units():
    from rich.console import Console

    from orchestrator.report import results_table

    results = {"metrics": {"latency_p50_ms": 3.0, "throughput": 100.0}, "task": "question_answering",
               "config": {"runtime": {"batch_size": 32}}}
    console = Console(width=200, record=True)
    console.print(results_table(results, ["f1"]))
    text = console.export_text()
    assert "p50 ms per batch of 32" in text and "features/s (question+context windows)" in text


def test_run_names_carry_a_local_models_folder_name_and_the_precision_that_ran():
    from types import SimpleNamespace as N

    from orchestrator.naming import run_name

    class Ctx:
        choices = {"model": "minilm", "dataset": "sts_smoke"}
        overrides = ["model.name_or_path=/x/my-bert", "dataset.path=csv", "dataset.data_files=/d/pairs.tsv"]

        def swept_values(self):
            return {"recipe": "openvino_int8"}

    rc = N(tracking=N(run_name=None), model=N(name_or_path="/x/my-bert"),
           dataset=N(data_files="/d/pairs.tsv", path="csv"), optimization={"openvino": {}}, precision=N(name="fp32"))
    assert run_name(rc, Ctx(), compute="int8") == "openvino_int8-openvino-int8-my-bert-pairs"
    # without calibration the recipe compresses weights only: fp32 arithmetic on int8 weights
    assert run_name(rc, Ctx(), compute="fp32", weights="int8") == "openvino_int8-openvino-fp32+int8w-my-bert-pairs"
    chosen = Ctx()
    chosen.overrides = []  # the config group's own model and data: their group names
    assert run_name(rc, chosen) == "openvino_int8-openvino-fp32-minilm-sts_smoke"


def test_dashboard_note_names_winner_interval_and_accuracy_cost():
    rows = synthetic_rows(4)
    for r in rows[1:]:
        r["speedup_ci_low"], r["speedup_ci_high"], r["noise"] = r["speedup"] * 0.98, r["speedup"] * 1.02, ""
    rec = summary.verdict.recommend(rows)
    out = summary.summary_of(rows, "p", rec)
    out["stored"] = {"run_folders_mb": 12.5, "mlflow_mb": 30.25}
    note = summary.dashboard_note(out)
    best = next(r for r in rows if r.get("recommended"))
    assert note.startswith("### ")
    assert f"job {best['job']}" in note.splitlines()[0]
    assert f"{best['speedup']:.2f}x" in note and "95%" in note and "spearman" in note
    assert "| job |" in note and note.count("\n| ") >= len(rows) + 1  # header + a line per job
    assert "12.5 MB in the run folders" in note and "30.2 MB in MLflow" in note


def test_parent_run_and_experiment_carry_the_dashboard(tmp_path):
    """A real sqlite store: the experiment opens on the classic runs view, the parent run carries the note, the
    winner's figures and one metric per job, each child its own speedup and gate."""
    from mlflow.tracking import MlflowClient

    from orchestrator.tracking import EXPERIMENT_KIND, ensure_experiment

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp_id = ensure_experiment(client, "dash", None)
    assert client.get_experiment(exp_id).tags["mlflow.experimentKind"] == EXPERIMENT_KIND
    parent = client.create_run(exp_id, run_name="sweep").info.run_id
    rows = synthetic_rows(3)
    for r in rows:
        r["run_id"] = client.create_run(exp_id, run_name=f"job{r['job']}",
                                        tags={"mlflow.parentRunId": parent}).info.run_id
        client.set_terminated(r["run_id"], "FINISHED")
    for r in rows[1:]:
        r["speedup_ci_low"], r["speedup_ci_high"], r["noise"] = r["speedup"] * 0.98, r["speedup"] * 1.02, ""
    out = summary.summary_of(rows, parent, summary.verdict.recommend(rows))
    summary.log_to_parent(client, parent, out)
    run = client.get_run(parent)
    best = next(r for r in rows if r.get("recommended"))
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlflow.note.content"].startswith("### ")
    assert run.data.tags["winner"].startswith(f"job {best['job']}")
    m = run.data.metrics
    assert m["recommended_job"] == float(best["job"])
    assert m["recommended_speedup"] == pytest.approx(best["speedup"])
    assert m["recommended_speedup_ci_low"] == pytest.approx(best["speedup_ci_low"])
    assert "recommended_accuracy_delta" in m
    for r in rows:
        assert m[f"job{r['job']}_throughput"] == pytest.approx(r["throughput"])
        assert m[f"job{r['job']}_speedup"] == pytest.approx(r["speedup"])
        child = client.get_run(r["run_id"])
        assert child.data.metrics["summary/speedup"] == pytest.approx(r["speedup"])
        assert child.data.metrics["summary/spearman"] == pytest.approx(r["value"])
        assert child.data.tags["gate"] == r["gate"]
        assert child.info.status == "FINISHED"  # logging the verdict does not reopen a finished job


def test_storage_counts_run_folders_and_mlflow_artifacts(tmp_path):
    from mlflow.tracking import MlflowClient

    from orchestrator.tracking import ensure_experiment

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp_id = ensure_experiment(client, "dash", (tmp_path / "art").as_uri())
    run_id = client.create_run(exp_id).info.run_id
    sweep = tmp_path / "sweep" / "0"
    sweep.mkdir(parents=True)
    (sweep / "results.json").write_bytes(b"x" * 2 * 2**20)
    big = tmp_path / "model.bin"
    big.write_bytes(b"y" * 3 * 2**20)
    client.log_artifact(run_id, str(big), "plugins/openvino")
    stored = summary.storage(tmp_path / "sweep", client, [run_id])
    assert stored["run_folders_mb"] == pytest.approx(2.0, abs=0.01)
    assert stored["mlflow_mb"] == pytest.approx(3.0, abs=0.01)


def test_an_export_is_stored_once(tmp_path):
    """Logged from the run folder, then removed there (a note says where it went); kept when tracking is off."""
    from types import SimpleNamespace as N

    from orchestrator.tracking import Tracker

    def tracker(**cfg):
        t = Tracker(N(enabled=True, uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="e", artifact_location=None,
                      system_metrics=False, min_free_mb=0.0, **cfg), "run")
        t.start({}, {})
        return t

    def export(name):
        d = tmp_path / name / "openvino"
        d.mkdir(parents=True)
        (d / "model.xml").write_text("<xml/>")
        (d / "model.bin").write_bytes(b"w" * 1000)
        return d

    t = tracker()
    d = export("a")
    for f in sorted(d.iterdir()):
        t.log_export(f, "plugins/openvino")
    assert sorted(a.path for a in t.client.list_artifacts(t.run_id, "plugins/openvino")) == \
        ["plugins/openvino/model.bin", "plugins/openvino/model.xml"]
    assert not (d / "model.bin").exists() and not (d / "model.xml").exists()
    assert "plugins/openvino" in (d / "STORED_IN_MLFLOW.txt").read_text()

    off = Tracker(N(enabled=False, uri="sqlite:///x.db"), "run")
    d = export("c")
    off.log_export(d / "model.bin", "plugins/openvino")
    assert (d / "model.bin").exists()  # untracked: the run folder holds the only copy
