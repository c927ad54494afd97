"""The performance levers and what every run reports about speed: batching options, the timing order, FLOPs and
peak fraction, end-to-end eval metrics and the in-process feature cache. Behaviour only: no timed assertions
(timing claims live in benchmarks/)."""
from __future__ import annotations

import pytest
import torch

from conftest import tiny_sts_overrides
from orchestrator import feature_cache, flops, measure
from orchestrator.runner import run

ROWS = [{"input_ids": list(range(1, n + 1)), "attention_mask": [1] * n} for n in (3, 17, 9, 33, 5, 40, 12, 8)]


def test_pad_to_multiple_of_rounds_dynamic_widths_up_to_max_length():
    batches = measure.make_batches(ROWS, 3, 0, "dynamic", 40, sort_by_length=True, pad_to_multiple_of=16)
    widths = [b.inputs["input_ids"].shape[1] for b in batches]
    # sorted lengths 3,5,8 | 9,12,17 | 33,40 -> 8, 17, 40 rounded up to 16, 32, and 48 capped at max_length 40
    assert widths == [16, 32, 40]
    for b in batches:  # every row keeps its tokens; the rest is padding with mask 0
        for r, i in enumerate(b.rows):
            n = len(ROWS[i]["input_ids"])
            assert b.inputs["input_ids"][r, :n].tolist() == ROWS[i]["input_ids"]
            assert b.inputs["attention_mask"][r].sum() == n
    plain = measure.make_batches(ROWS, 3, 0, "dynamic", 40, sort_by_length=True)
    assert [b.inputs["input_ids"].shape[1] for b in plain] == [8, 17, 40]
    fixed = measure.make_batches(ROWS, 3, 0, "max_length", 40, sort_by_length=False, pad_to_multiple_of=16)
    assert {b.inputs["input_ids"].shape[1] for b in fixed} == {40}


def test_padding_pct_counts_pad_tokens_the_model_computes_on():
    batches = measure.make_batches(ROWS, 8, 0, "max_length", 40, sort_by_length=False)
    real = sum(len(r["input_ids"]) for r in ROWS)
    assert measure.padding_pct(ROWS, batches) == pytest.approx(100.0 * (8 * 40 - real) / (8 * 40))
    one_each = measure.make_batches(ROWS, 1, 0, "dynamic", 40, sort_by_length=False)
    assert measure.padding_pct(ROWS, one_each) == 0.0


def test_batch_shapes_counts_distinct_input_shapes_which_bucketing_reduces():
    exact = measure.make_batches(ROWS, 2, 0, "dynamic", 40, sort_by_length=True)
    # sorted lengths 3,5 | 8,9 | 12,17 | 33,40 -> widths 5, 9, 17, 40: four shapes
    assert measure.batch_shapes(exact) == 4
    bucketed = measure.make_batches(ROWS, 2, 0, "dynamic", 40, sort_by_length=True, pad_to_multiple_of=16)
    assert measure.batch_shapes(bucketed) == 3  # 16, 16, 32, 40
    padded = measure.make_batches(ROWS, 3, 0, "max_length", 40, sort_by_length=False)
    assert measure.batch_shapes(padded) == 2  # 3 x 40 twice, then the last 2 rows


def test_timing_pass_samples_length_sorted_batches_in_a_seeded_shuffle():
    order = measure.timing_order(10, seed=0)
    assert sorted(order) == list(range(10)) and order != list(range(10))
    assert order == measure.timing_order(10, seed=0) and order != measure.timing_order(10, seed=1)
    batches = measure.make_batches(ROWS, 2, 0, "dynamic", 40, sort_by_length=True)
    seen = []
    timing = measure.timing_pass(lambda inputs: seen.append(inputs["input_ids"].shape[1]), batches, warmup=0,
                                 min_iterations=6, min_duration_s=0, max_iterations=6,
                                 order=measure.timing_order(len(batches), 3))
    assert timing.batch_ids == [measure.timing_order(len(batches), 3)[i % len(batches)] for i in range(6)]
    assert seen == [batches[k].inputs["input_ids"].shape[1] for k in timing.batch_ids]


def test_flop_coefficients_price_any_length_exactly(tiny_qa_model):
    from transformers import AutoModelForQuestionAnswering

    model = AutoModelForQuestionAnswering.from_pretrained(tiny_qa_model).eval()
    names = ["input_ids", "token_type_ids", "attention_mask"]
    coef = flops.coefficients(model, names)
    for length in (5, 40, 100):
        assert flops.batch_flops(coef, 1, length) == pytest.approx(flops.count(model, names, length), rel=1e-9)
    # the standard encoder count (matmuls + attention scores/values), hidden 32, intermediate 64, 2 layers, QA head
    h, i, layers, length = 32, 64, 2, 100
    analytic = layers * (2 * length * (4 * h * h + 2 * h * i) + 4 * length * length * h) + 2 * length * h * 2
    assert flops.batch_flops(coef, 3, length) == pytest.approx(3 * analytic)


def test_peak_uses_the_unit_the_precision_runs_on():
    amx = {"avx512f", "fma", "amx_bf16", "amx_int8", "avx512_bf16"}
    assert flops.flops_per_cycle("fp32", amx) == (64, "AVX-512 FMA fp32")
    assert flops.flops_per_cycle("bf16", amx) == (1024, "AMX-BF16")
    assert flops.flops_per_cycle("int8", amx) == (2048, "AMX-INT8")
    assert flops.flops_per_cycle("bf16", {"avx512f", "fma"}) == (64, "AVX-512 FMA fp32")
    assert flops.flops_per_cycle("fp32", {"fma"}) == (32, "AVX2 FMA fp32")
    # int8 without AMX: VNNI's rate, not fp32's (an int8 run's share of peak would read 4x too high)
    assert flops.flops_per_cycle("int8", {"avx512f", "avx512_vnni"}) == (256, "AVX512-VNNI int8")
    assert flops.flops_per_cycle("int8", {"fma", "avx_vnni"}) == (128, "AVX-VNNI int8")
    assert flops.flops_per_cycle("int8", {"fma"}) == (32, "AVX2 FMA fp32")  # no int8 dot product: fp32's FMA rate


def test_every_run_reports_end_to_end_eval_and_flops(compose, tiny_encoder, sts_file, tracking_uri):
    feature_cache.clear()
    m = run(compose(*tiny_sts_overrides(tiny_encoder, sts_file, tracking_uri)))["metrics"]
    assert m["eval_s"] == pytest.approx(m["featurize_s"] + m["collate_s"] + m["accuracy_pass_s"])
    assert m["eval_throughput"] == pytest.approx(m["features"] / m["eval_s"])
    assert 0 <= m["eval_overhead_pct"] <= 100 and m["accuracy_pass_forward_s"] <= m["eval_s"]
    assert 0 <= m["padding_pct"] < 100 and m["gflops_per_feature"] > 0 and m["achieved_gflops"] > 0
    assert m["batch_shapes"] >= 1
    if flops.cpu()["mhz"]:
        assert m["peak_fraction_pct"] == pytest.approx(100 * m["achieved_gflops"] / m["peak_gflops"])
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    r = client.search_runs([client.get_experiment_by_name("orchestrator").experiment_id])[0]
    assert {"eval_throughput", "eval_overhead_pct", "gflops_per_feature"} <= set(r.data.metrics)
    assert r.data.tags["peak.compute"] == "fp32"


def test_features_are_tokenized_once_per_process(compose, tiny_encoder, sts_file, tracking_uri):
    feature_cache.clear()
    base = tiny_sts_overrides(tiny_encoder, sts_file, tracking_uri)
    first = run(compose(*base))["metrics"]
    # a different batching of the same features reuses them, and measures the same thing
    second = run(compose(*base, "runtime.batch_size=5", "runtime.sort_by_length=true"))["metrics"]
    third = run(compose(*base, "runtime.max_length=16"))["metrics"]  # different features: tokenized again
    assert (first["features_cached"], second["features_cached"], third["features_cached"]) == (0.0, 1.0, 0.0)
    assert second["spearman"] == pytest.approx(first["spearman"], abs=1e-4)
    assert second["features"] == first["features"]


def test_threads_beyond_the_available_cores_warn_and_the_thread_environment_is_recorded(
        compose, tiny_encoder, sts_file, tracking_uri, caplog, monkeypatch):
    from orchestrator.environment import available_cpus

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    too_many = len(available_cpus()) + 1
    before = torch.get_num_threads()
    try:
        with caplog.at_level("WARNING", logger="orchestrator"):  # the run's modules log under it
            res = run(compose(*tiny_sts_overrides(tiny_encoder, sts_file, tracking_uri), f"runtime.threads={too_many}"))
    finally:
        torch.set_num_threads(before)
    assert f"runtime.threads={too_many} is more than the {too_many - 1} cores" in caplog.text
    assert res["metrics"]["threads"] == too_many
    # the cores other work held as the run started (sampled from preflight to the model's load)
    assert 0 <= res["metrics"]["cores_busy_at_start"] <= len(available_cpus()) + 0.01
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    tags = client.search_runs([client.get_experiment_by_name("orchestrator").experiment_id])[0].data.tags
    assert tags["env.OMP_NUM_THREADS"] == "1"
    assert tags["cpu.available"] == str(too_many - 1)
    assert tags["cpu.affinity"].split(",") == [str(c) for c in available_cpus()]


def test_benchmarks_run_each_measured_run_in_a_fresh_process(tmp_path, tiny_encoder, sts_file):
    """benchmarks/one_run.py: the harness e2e.py and peers.py use so no kernel cache carries over between runs (on
    the tiny model: the harness, not the model, is under test)."""
    import os
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from one_run import run_fresh

    res = run_fresh([*tiny_sts_overrides(tiny_encoder, sts_file, "sqlite:///unused.db"), "tracking=off"], cwd=tmp_path)
    m = res["metrics"]
    assert m["features"] > 0 and m["eval_s"] > 0 and m["batch_shapes"] >= 1
    assert Path(res["run_dir"]).is_dir() and Path(res["run_dir"]).is_relative_to(tmp_path.resolve())
    assert res["pid"] != os.getpid()
    with pytest.raises(RuntimeError, match="runtime.batch_size=0: must be >= 1"):
        run_fresh(["tracking=off", "runtime.batch_size=0"], cwd=tmp_path)
