"""Answers you can act on: isolated jobs, intervals, the accuracy gate, whole-dataset agreement, the recommendation,
truthful labels, validation before loading, and CPU capabilities read from the CPU."""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from conftest import finish, measuring, mlflow_store, run_cli, runs_of, start_cli, wait_for
from orchestrator import cpu, stats, verdict
from orchestrator.config import validate
from orchestrator.errors import ConfigError
from orchestrator.runner import run

import importlib.util

HAS_OPENVINO = importlib.util.find_spec("openvino") is not None


def cls_overrides(model: Path, data: Path, uri: str):
    return [f"model.name_or_path={model}", "dataset=sst2", f"dataset.data_files={data}", "runtime=quick",
            f"tracking.uri={uri}"]


# ---- intervals ------------------------------------------------------------------------------------------------

def test_throughput_interval_is_ordered_and_widens_with_round_to_round_drift():
    steady = [([8] * 20, [0.010] * 10 + [0.011] * 10) for _ in range(3)]
    drifting = [([8] * 20, [0.010 * f] * 10 + [0.011 * f] * 10) for f in (1.0, 1.3, 0.8)]
    t, lo, hi = stats.throughput_interval(steady)
    assert lo <= t <= hi and (hi - lo) / t < 0.1
    t2, lo2, hi2 = stats.throughput_interval(drifting)
    assert lo2 <= t2 <= hi2
    assert (hi2 - lo2) / t2 > 3 * (hi - lo) / t  # drift between rounds is noise the interval must show
    assert stats.throughput_interval(steady) == stats.throughput_interval(steady)  # seeded: reproducible


def test_speedup_interval_and_noise():
    s, lo, hi = stats.speedup_interval((200.0, 190.0, 210.0), (100.0, 95.0, 105.0))
    assert s == pytest.approx(2.0) and lo < 2.0 < hi and lo > 1.0
    s, lo, hi = stats.speedup_interval((103.0, 90.0, 115.0), (100.0, 88.0, 112.0))
    assert stats.within_noise(lo, hi)
    assert stats.speedup_interval((100.0, None, None), (100.0, 90.0, 110.0))[1] is None


def test_gate_agreement_and_recommendation_on_rows():
    from orchestrator.tasks.text_classification import TextClassification

    def row(job, stack, precision, value, thr, half, decisions):
        return {"job": job, "stack": stack, "precision": precision, "status": "FINISHED", "metric": "accuracy",
                "value": value, "throughput": thr, "throughput_ci_low": thr - half, "throughput_ci_high": thr + half,
                "task": "text_classification", "workload": "w", "baseline_key": "b", "decisions": decisions}

    base = ["pos", "neg"] * 50
    lossy = ["neg", "neg"] * 50
    rows = [row(0, "eager", "fp32", 80.0, 100.0, 2.0, base), row(1, "jit", "fp32", 80.0, 104.0, 8.0, base),
            row(2, "quantize", "fp32", 79.9, 150.0, 3.0, base[:90] + lossy[:10]),
            row(3, "lossy", "fp32", 60.0, 300.0, 3.0, lossy)]
    verdict.assess(rows, 0.99, 0.95, lambda t: TextClassification, lambda r: r["decisions"])
    by = {r["job"]: r for r in rows}
    assert by[0]["gate"] == "baseline" and by[0]["speedup"] == 1.0
    assert by[1]["gate"] == "pass" and by[1]["noise"] == "within noise"
    assert by[2]["gate"] == "pass" and by[2]["agreement_vs_baseline"] == pytest.approx(0.95)
    assert by[3]["gate"] == "fail" and "accuracy 60.00 < 99% of 80.00" in by[3]["gate_reason"]
    assert "agreement 50.0% < 95%" in by[3]["gate_reason"]
    line = verdict.recommend(rows)
    assert line.startswith("recommended: job 2 (quantize/fp32): 1.50x [95% ")
    assert "accuracy -0.10" in line
    verdict.mark_pareto(rows)
    assert [r["pareto"] for r in rows] == [False, True, True, True]  # eager: jit is as accurate and faster
    rows[2]["gate"] = "fail"
    assert verdict.recommend(rows).startswith("no recommendation: nothing beat eager fp32 beyond noise")


# ---- CPU capabilities ----------------------------------------------------------------------------------------

def test_a_onednn_cap_hides_what_the_cpu_has(monkeypatch):
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert not cpu.has("bf16") and not cpu.has("amx") and not cpu.has("avx512")
    assert "oneDNN capped at AVX2" in cpu.describe()
    msg = cpu.capability_error(["bf16"], "experiment=fastest_qa")
    assert msg.startswith("experiment=fastest_qa needs bf16: native bf16 matmuls") and "\n" not in msg
    tags = cpu.tags()
    assert tags["cpu.can.bf16"] == "false" and tags["cpu.onednn_cap"] == "AVX2"
    assert set(f"cpu.isa.{f}" for f in cpu.ISA_FLAGS) <= set(tags)


def test_presets_that_need_a_capability_refuse_in_one_line(compose, monkeypatch):
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # behaves like an AVX2-only CPU for every oneDNN kernel
    with pytest.raises(ConfigError) as e:
        validate(compose("experiment=fastest_qa"))
    assert "needs bf16: native bf16 matmuls (AVX512-BF16 or AMX-BF16); this CPU is " in str(e.value)
    with pytest.raises(ConfigError, match=r"^requires=\['fp8'\]: unknown capability fp8; valid: bf16, amx"):
        validate(compose("requires=[fp8]"))


# ---- validation before loading; truthful labels ---------------------------------------------------------------

@pytest.mark.parametrize("policy", ["fail", "fallback"])
def test_a_bad_plugin_option_fails_before_the_model_loads(compose, tiny_classifier, cls_file, tracking_uri, policy):
    """A range rule (validate_options): refused before any MLflow run exists, never a fallback; a single run leaves
    nothing behind (a sweep's job keeps a results.json saying why: tests/test_records.py)."""
    with pytest.raises(ConfigError, match=r"^optimization.jit.warmup_calls=-1: must be >= 0$"):
        run(compose(*cls_overrides(tiny_classifier, cls_file, tracking_uri), "optimization=[jit]",
                    "optimization.jit.warmup_calls=-1", f"runtime.on_plugin_error={policy}"))
    assert not runs_of(tracking_uri)[1]
    assert not list(Path("outputs/runs").rglob("results.json"))


def test_ipex_options_are_checked_in_the_main_environment_too():
    """Range rules need no IPEX import: a bad option is named even where IPEX cannot run."""
    from orchestrator_plugins.ipex import IpexPlugin

    with pytest.raises(ConfigError, match=r"^optimization.ipex.calibration_batches=0: must be >= 1$"):
        IpexPlugin.validate_options(IpexPlugin.Options(calibration_batches=0))


def test_a_bad_plugin_choice_is_refused_while_composing(cli_error, tiny_classifier, cls_file, tracking_uri):
    """A typed choice (the plugin's schema): one line, exit 2, before any run exists (Hydra refuses it while
    composing, so nothing runs; tests/test_configs.py runs this path through the CLI)."""
    line, code = cli_error(*cls_overrides(tiny_classifier, cls_file, tracking_uri), "optimization=[quantize]",
                           "optimization.quantize.backend=typo")
    assert code == 2
    assert line == "error: optimization.quantize.backend: Invalid value 'typo', expected one of [ao_dynamic, torchao]"
    assert not runs_of(tracking_uri)[1]


def test_an_unavailable_plugin_fails_before_the_model_loads(compose, tiny_classifier, cls_file, tracking_uri):
    with pytest.raises(Exception, match="backend=ao_dynamic quantizes fp32 models only"):
        run(compose(*cls_overrides(tiny_classifier, cls_file, tracking_uri), "optimization=[quantize]",
                    "precision=bf16"))
    assert not runs_of(tracking_uri)[1]  # a plugin's check() is part of the config's validation


def test_a_fallback_is_labelled_with_the_stack_that_ran(compose, tiny_classifier, cls_file, tracking_uri):
    results = run(compose(*cls_overrides(tiny_classifier, cls_file, tracking_uri), "optimization=[quantize,jit]",
                          "precision=bf16", "runtime.on_plugin_error=fallback", "runtime.repeats=4"))
    assert results["stack"] == "jit" and results["stack_requested"] == "quantize+jit"
    assert results["run_name"].startswith("jit-bf16-")
    client, runs = runs_of(tracking_uri)
    r = runs[0]
    assert r.info.run_name == results["run_name"]
    assert r.data.tags["stack"] == "jit" and r.data.tags["stack.requested"] == "quantize+jit"
    assert r.data.tags["stack.fallback"] == "quantize" and "fp32 models only" in r.data.tags["plugin.quantize.fallback"]
    m = r.data.metrics
    assert m["timing_rounds"] == 4 and m["throughput_ci_low"] <= m["throughput"] <= m["throughput_ci_high"]
    assert len(client.get_metric_history(r.info.run_id, "round_throughput")) == 4
    assert r.data.tags["process.isolated"] == "false" and r.data.tags["process.pid"] == str(os.getpid())
    decisions = json.loads((Path(results["run_dir"]) / "decisions.json").read_text())
    assert len(decisions) == m["examples"] and set(decisions) <= {"negative", "positive"}


# ---- the default sweep: isolated jobs, gate, recommendation -------------------------------------------------

LOSSY_PLUGIN = '''
from dataclasses import dataclass

import torch

from orchestrator.plugin import STAGE_TRANSFORM, Plugin


@dataclass
class LossyOptions:
    noise: float = 20.0


class Lossy(torch.nn.Module):
    """Adds fixed noise to the logits: a stack that is fast and wrong, for the accuracy gate."""

    def __init__(self, model, noise):
        super().__init__()
        self.model, self.noise = model, noise

    def forward(self, **inputs):
        out = self.model(**inputs)
        g = torch.Generator().manual_seed(0)
        out["logits"] = out["logits"] + self.noise * torch.randn(out["logits"].shape, generator=g)
        return out


class LossyPlugin(Plugin):
    name = "lossy"
    stage = STAGE_TRANSFORM
    Options = LossyOptions

    def apply(self, model, ctx):
        return Lossy(model, self.options.noise)
'''


@pytest.fixture(scope="module")
def lossy_package(tmp_path_factory):
    """An out-of-tree plugin as installed: a module and its entry point (its options come from its schema)."""
    root = tmp_path_factory.mktemp("lossy")
    (root / "lossy_plugin.py").write_text(LOSSY_PLUGIN)
    info = root / "lossy_plugin-0.0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: lossy-plugin\nVersion: 0.0.1\n")
    (info / "entry_points.txt").write_text("[orchestrator.plugins]\nlossy = lossy_plugin:LossyPlugin\n")
    return root


@pytest.fixture(scope="module")
def default_sweep(tmp_path_factory, lossy_package):
    """One 3-job sweep with the default launcher, shared by the tests below (each job is a fresh process)."""
    from conftest import make_tiny_model, write_tsv, WORDS
    import random

    tmp = tmp_path_factory.mktemp("sweep")
    model = make_tiny_model(tmp / "model", "classification")
    rnd = random.Random(3)
    data = write_tsv(tmp / "cls.tsv", ("text", "label"),
                     [(" ".join(rnd.choice(WORDS) for _ in range(rnd.randint(2, 20))), rnd.randint(0, 1))
                      for _ in range(60)])
    uri = mlflow_store(tmp / "store.db")
    env = {"PYTHONPATH": os.pathsep.join([str(lossy_package), os.environ.get("PYTHONPATH", "")])}
    # an engine beside them when its extra is installed: its job must pass the gate like any fp32 stack
    stacks = "[],[jit],[lossy]" + (",[openvino]" if HAS_OPENVINO else "")
    # one process per job: isolation, the gate and the recommendation are under test here, the race's process
    # replicas in tests/test_race.py
    proc = run_cli("-m", *cls_overrides(model, data, uri), f"optimization={stacks}", "race.processes=1", cwd=tmp,
                   env=env)
    return proc, uri


@pytest.mark.slow
def test_default_sweep_runs_every_job_in_its_own_process(default_sweep):
    proc, uri = default_sweep
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, runs = runs_of(uri)
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    jobs = 4 if HAS_OPENVINO else 3
    assert len(children) == jobs
    pids = {r.data.tags["process.pid"] for r in children}
    assert len(pids) == jobs and str(os.getpid()) not in pids
    assert all(r.data.tags["process.isolated"] == "true" for r in children)
    assert all(r.data.metrics["process_startup_s"] > 0 for r in children)
    assert "each in a fresh process (hydra/launcher=isolated)" in proc.stdout + proc.stderr


@pytest.mark.slow
def test_default_sweep_gates_the_lossy_job_and_recommends(default_sweep):
    import pandas as pd

    proc, uri = default_sweep
    client, runs = runs_of(uri)
    parent = next(r for r in runs if r.data.tags.get("sweep") == "true")
    table = pd.read_csv(Path(parent.data.tags["sweep.dir"]) / "summary.csv").set_index("stack")
    assert {"speedup", "speedup_ci_low", "speedup_ci_high", "gate", "agreement_vs_baseline"} <= set(table.columns)
    assert table.loc["eager", "gate"] == "baseline"
    assert table.loc["jit", "gate"] == "pass" and table.loc["jit", "agreement_vs_baseline"] == 1.0
    assert table.loc["jit", "speedup_ci_low"] <= table.loc["jit", "speedup"] <= table.loc["jit", "speedup_ci_high"]
    assert table.loc["lossy", "gate"] == "fail" and "agreement" in table.loc["lossy", "gate_reason"]
    if HAS_OPENVINO:
        assert table.loc["openvino", "gate"] == "pass" and table.loc["openvino", "agreement_vs_baseline"] == 1.0
    recommendation = parent.data.tags["recommendation"]
    # on a loaded machine the race may end with an interval wider than 2x: the honest answer is then "too uncertain"
    named = ("job 1 (jit/fp32)", "job 3 (openvino/fp32)")
    assert (recommendation.startswith(tuple(f"recommended: {j}" for j in named))
            or recommendation.startswith("no recommendation: nothing beat eager")
            or (recommendation.startswith(tuple(f"no recommendation: {j}" for j in named))
                and "too uncertain to act on" in recommendation)), recommendation
    assert "lossy" not in recommendation.split("(fastest")[0]
    assert recommendation in proc.stdout.replace("\n", " ") or recommendation[:60] in proc.stdout
    assert f"CPU: {cpu.model_name()}" in proc.stdout
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"summary.csv", "summary.png", "summary_table.json"} <= artifacts


# ---- fallbacks in a sweep -------------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_sweep_with_a_fallback_says_so_and_fails_unless_asked(tmp_path, tiny_classifier, cls_file):
    preset = tmp_path / "conf" / "experiment"
    preset.mkdir(parents=True)
    (preset / "lenient.yaml").write_text("# @package _global_\nruntime:\n  on_plugin_error: fallback\n")
    uri = mlflow_store(tmp_path / "store.db")
    args = ["-m", *cls_overrides(tiny_classifier, cls_file, uri), "optimization=[quantize]", "precision=fp32,bf16",
            "hydra/launcher=basic", f"hydra.searchpath=[file://{tmp_path / 'conf'}]"]
    implicit = run_cli(*args, "experiment=lenient", cwd=tmp_path)
    assert implicit.returncode == 1, implicit.stderr[-2000:]
    assert "error: sweep job(s) 1 fell back to a smaller stack" in implicit.stderr
    assert "fell back: job(s) 1 ran without a plugin" in implicit.stdout
    explicit = run_cli(*args, "runtime.on_plugin_error=fallback", cwd=tmp_path)
    assert explicit.returncode == 0, explicit.stderr[-2000:]
    assert "fell back: job(s) 1 ran without a plugin" in explicit.stdout
    _, runs = runs_of(uri)
    fell = [r for r in runs if r.data.tags.get("stack.fallback")]
    assert len(fell) == 2 and all(r.data.tags["stack"] == "eager" for r in fell)
    assert all(r.data.tags["process.isolated"] == "false" for r in runs if r.data.tags.get("mlflow.parentRunId"))


# ---- Ctrl-C with the isolated launcher ----------------------------------------------------------------------

@pytest.mark.slow
def test_one_ctrl_c_ends_the_current_isolated_job_and_the_sweep_goes_on(tmp_path, tiny_encoder, sts_file):
    uri = mlflow_store(tmp_path / "store.db")  # the store exists before it is polled
    proc = start_cli("-m", f"model.name_or_path={tiny_encoder}", f"dataset.data_files={sts_file}",
                     f"tracking.uri={uri}", "runtime.progress=false", "runtime.repeats=1",
                     "runtime.max_iterations=null", "runtime.min_duration_s=600,0.5", "race.mode=off", cwd=tmp_path)
    # job 0's accuracy pass is logged: it is in its 600 s timing pass now
    wait_for(lambda: measuring(uri, "0"), "job 0 to measure", 300)
    proc.send_signal(signal.SIGINT)
    done = finish(proc, timeout=300)
    out, err = done.stdout, done.stderr
    assert done.returncode == 1, err[-2000:]  # one job did not finish
    _, runs = runs_of(uri)
    children = sorted((r for r in runs if r.data.tags.get("mlflow.parentRunId")), key=lambda r: r.data.tags["job_num"])
    assert [r.info.status for r in children] == ["KILLED", "FINISHED"]
    assert "spearman" in children[0].data.metrics
    assert "Ctrl-C: ending job 0 (KILLED)" in out + err


def test_the_one_line_of_an_error_names_the_cause():
    from orchestrator.errors import describe, first_line

    coloured = RuntimeError("\x1b[31mThis is step 1 of 3\x1b[0m\n\x1b[1mTorchExportError: unsupported op aten::foo\x1b[0m\n"
                            "  more detail")
    assert first_line(coloured) == "TorchExportError: unsupported op aten::foo"
    assert describe(coloured) == "RuntimeError: TorchExportError: unsupported op aten::foo"
    assert describe(ValueError("")) == "ValueError"
    assert describe(ConfigError("runtime.batch_size=0: must be >= 1")) == "runtime.batch_size=0: must be >= 1"
    assert len(first_line("x" * 1000)) == 300
