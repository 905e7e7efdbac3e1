"""The worker's metrics are checked against the schema the API documents: a wrong type always fails,
an undeclared (misspelt) key fails when checked strictly, as the tests of every method on real
exports check them; stored, they keep exactly the keys the worker wrote, in JSON types."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from service.core.job_metrics import checked, stored


def _metrics(**changes: object) -> dict:
    measurement = {"size_bytes": 4_000, "parameters": 1_000, "latency_ms": {"p50": 1.0, "p95": 1.2, "batch": 1}}
    metrics = {
        "original": dict(measurement),
        "compressed": {**measurement, "size_bytes": 1_000, "fidelity": {"cosine": 0.999, "top1_agreement": 1.0, "max_abs_diff": 0.01}},
        "compression_ratio": 4.0,
        "speedup": np.float64(1.5),
        "warnings": [],
        "step_reports": [{"index": 0, "method": "quantize", "chosen": "int8_dynamic/per-channel/matmul", "ops_after": {"MatMulInteger": 4}},
                         {"index": 1, "method": "prune", "layers": [{"layer": "fc1", "shape_before": [4, 4], "shape_after": [4, 4],
                                                                     "sparsity": 0.5, "removed_fraction": 0.0}]}],
    }
    metrics.update(changes)
    return metrics


def test_declared_keys_pass_strictly_and_are_stored_as_written() -> None:
    metrics = stored(checked(_metrics(), strict=True))
    assert metrics["speedup"] == 1.5 and isinstance(metrics["speedup"], float)
    assert metrics["original"]["accuracy"] is None  # stored as the API answers it: the defaults too
    assert metrics["step_reports"][0]["chosen"] == "int8_dynamic/per-channel/matmul"
    assert metrics["step_reports"][1]["layers"][0]["importance_threshold"] is None  # a row's declared defaults too


def _holder(metrics: dict, where: str) -> dict:
    return {"metrics": metrics, "measurement": metrics["compressed"], "step_report": metrics["step_reports"][0],
            "layer_row": metrics["step_reports"][1]["layers"][0]}[where]


@pytest.mark.parametrize("where", ["metrics", "measurement", "step_report", "layer_row"])
def test_a_misspelt_key_fails_the_strict_check_and_is_kept_when_read(where: str) -> None:
    metrics = _metrics()
    _holder(metrics, where)["misspelt_key"] = 1.0
    with pytest.raises(ValidationError, match="does not declare.*misspelt_key"):
        checked(metrics, strict=True)
    # Read back (an older job, a field added since): tolerated and kept.
    kept = stored(checked(metrics))
    assert _holder(kept, where)["misspelt_key"] == 1.0


def test_a_wrong_type_fails_even_when_reading_tolerantly() -> None:
    with pytest.raises(ValidationError):
        checked(_metrics(compression_ratio="four"))


def test_numpy_values_among_undeclared_keys_are_stored_as_numbers_and_lists() -> None:
    report = {"index": 0, "method": "quantize", "extra_scale": np.float32(0.5), "extra_rows": np.arange(3)}
    metrics = stored(checked(_metrics(step_reports=[report])))
    assert metrics["step_reports"][0]["extra_scale"] == 0.5 and metrics["step_reports"][0]["extra_rows"] == [0, 1, 2]
