"""Real models on real data (../shared): the independently measured reference figures must come out."""
from __future__ import annotations

import pytest

from conftest import needs_shared
from orchestrator.runner import run

pytestmark = pytest.mark.slow

# the accuracy pass is what these tests check; one timing batch is enough. Batches of similar lengths (as
# sweep=engines runs them) pad less: the STS-B pass took 19 s instead of 35 s on the AMD EPYC with the same figures,
# each example's output does not depend on its batch-mates' padding
TIMING = ["runtime.warmup=0", "runtime.min_iterations=1", "runtime.max_iterations=1", "runtime.min_duration_s=0",
          "runtime.progress=false", "runtime.sort_by_length=true"]


@needs_shared("data", "stsb_test.csv")
def test_minilm_on_stsb_matches_published_spearman(compose, tracking_uri):
    results = run(compose("experiment=stsb_minilm", f"tracking.uri={tracking_uri}", *TIMING))
    assert results["metrics"]["examples"] == 1379
    assert results["metrics"]["spearman"] == pytest.approx(82.03, abs=0.05)
    assert results["metrics"]["pearson"] == pytest.approx(82.74, abs=0.05)


@needs_shared("models", "minilm-sst2")
@pytest.mark.parametrize("stack", [[], ["jit"]])
def test_minilm_sst2_accuracy_and_jit_parity(compose, tracking_uri, stack):
    results = run(compose("experiment=sst2_minilm", f"optimization=[{','.join(stack)}]", f"tracking.uri={tracking_uri}",
                          "runtime.parity_samples=64", *TIMING))
    m = results["metrics"]
    assert m["examples"] == 872
    assert m["accuracy"] == pytest.approx(80.96, abs=0.1)
    assert m["parity_max_abs_diff"] <= 1e-4
    assert m["parity_agreement"] == 1.0
    assert results["applied"] == stack
