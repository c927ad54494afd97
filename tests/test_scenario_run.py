"""A run with a LoadGen scenario (issue 24) through run(cfg): LoadGen's accuracy mode is the evaluation, its
figure of merit and verdict are the run's, its logs are artifacts; an impossible bound is a measured failure."""
from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from conftest import tiny_sts_overrides
from orchestrator.runner import run

pytest.importorskip("mlperf_loadgen", reason="the loadgen extra (mlcommons-loadgen) is not installed")


def test_offline_scenario_run_records_its_figure_and_accuracy(compose, tiny_encoder, sts_file, tracking_uri):
    plain = run(compose(*tiny_sts_overrides(tiny_encoder, sts_file, tracking_uri)))
    results = run(compose(*tiny_sts_overrides(tiny_encoder, sts_file, tracking_uri), "scenario=offline"))
    m = results["metrics"]
    assert results["status"] == "FINISHED" and results["scenario"]["valid"] is True
    assert results["scenario"]["figure"]["name"] == "offline_samples_per_second"
    assert m["offline_samples_per_second"] > 0 and m["loadgen_valid"] == 1.0
    # accuracy mode serves every row once: the same task metric as the plain accuracy pass
    assert m["spearman"] == pytest.approx(plain["metrics"]["spearman"], abs=1e-3)
    run_ = MlflowClient(tracking_uri).get_run(results["run_id"])
    assert run_.data.tags["scenario"] == "offline" and run_.data.tags["scenario.valid"] == "true"
    artifacts = {a.path for a in MlflowClient(tracking_uri).list_artifacts(results["run_id"], "loadgen")}
    assert artifacts, "LoadGen's logs are kept with the run"


def test_an_impossible_latency_bound_is_a_measured_failure(compose, tiny_encoder, sts_file, tracking_uri):
    from orchestrator.phases import ScenarioInvalid

    cfg = compose(*tiny_sts_overrides(tiny_encoder, sts_file, tracking_uri), "scenario=server",
                  "scenario.latency_bound_ms=0.01", "scenario.search_budget_s=20")
    with pytest.raises(ScenarioInvalid, match=r"^scenario=server: no VALID rate: p99 at the lowest QPS tried was"):
        run(cfg)
    run_ = MlflowClient(tracking_uri).search_runs(
        [e.experiment_id for e in MlflowClient(tracking_uri).search_experiments()], "")[0]
    assert run_.info.status == "FAILED" and run_.data.metrics["server_max_qps"] == 0.0
