"""deep_compression with its defaults chooses the sparsity on the job's data: the climb through the
schedule stops within half of the quality budget, the report says what was tried, kept and why, and
a step that ends beyond the budget says so in its warnings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from service.core.methods.deep_compression import AUTO_FEWER_BITS, AUTO_SCHEDULE, DEFAULT_QUALITY_DROP
from service.core.specs import DeepCompressionStep, PruneStep
from tests.builders import mlp, reference_outputs
from workers.methods import deep_compression
from workers.steps import StepContext, StepData


def _labelled(n: int, seed: int) -> tuple[StepData, object]:
    model = mlp(in_features=32, hidden=64)
    x = np.random.default_rng(seed).standard_normal((n, 32)).astype(np.float32)
    return StepData(inputs={"x": x}, labels=reference_outputs(model, x).argmax(-1)), model


@pytest.mark.parametrize("budget", [0.6, 0.002])
def test_the_default_pruning_stage_is_chosen_on_the_data(tmp_path: Path, budget: float) -> None:
    # A random MLP scored against its own top class is fragile (20% of its weights off: 0.73 after
    # fine-tuning): a wide budget lets the climb start, a narrow one stops it before the first round.
    data, model = _labelled(512, 0)
    data.evaluation, _ = _labelled(256, 1)
    ctx = StepContext(work_dir=tmp_path, report_progress=lambda f, m, milestone=False: None)
    result = deep_compression.apply(model, DeepCompressionStep(max_quality_drop=budget), data, ctx)
    chosen = result.report["chosen"]
    assert chosen["quality_metric"] == "accuracy" and chosen["max_quality_drop"] == budget and chosen["pruning_budget"] == budget / 2
    tried = [t["sparsity"] for t in chosen["tried"]]
    assert tried == pytest.approx(AUTO_SCHEDULE[: len(tried)], abs=0.01)
    fits = [chosen["original"] - t["accuracy"] <= budget / 2 + 1e-9 for t in chosen["tried"]]
    if not tried:  # the first round did not fit: nothing pruned, and the report says why
        assert budget == 0.002 and chosen["sparsity"] == 0.0 and "nothing is pruned" in chosen["why"]
    else:  # every round kept but the last tried, which stopped the climb unless it was the schedule's end
        assert all(fits[:-1]) and (not fits[-1] or len(tried) == len(AUTO_SCHEDULE))
        assert chosen["sparsity"] == pytest.approx(tried[-2] if not fits[-1] else tried[-1], abs=0.01)
    assert chosen["within_budget"] == (chosen["original"] - chosen["final"] <= budget + 1e-12)
    assert bool(result.report["warnings"]) == (not chosen["within_budget"])
    assert result.report["stages"][1]["sparsity"] == pytest.approx(chosen["sparsity"], abs=1e-6)
    # The clusters: fewer bits a weight on average (a quarter bit at a time, down to 3, then once halfway
    # after the first that does not hold) are tried exactly when a first choice fit the budget (the wide
    # budget: it did), each kept while it fits too and the file is smaller (on this tiny pruned MLP the
    # second index plane's nodes can outweigh the bits saved).
    clusters = chosen["clusters"]
    tried = clusters["tried"]
    fit = [chosen["original"] - t["quality"] <= budget + 1e-12 for t in tried]
    fewer = [i for i, t in enumerate(tried) if t["average_bits"] is not None]
    first = len(tried) - len(fewer)
    assert bool(fewer) == any(fit[:first]), clusters
    kept = next(i for i in range(first) if fit[i]) if fewer else None
    average, step, failed = 4.0, AUTO_FEWER_BITS, None

    def next_candidate() -> float | None:
        nonlocal step
        while step >= AUTO_FEWER_BITS / 2:
            if average - step >= 3 and (failed is None or average - step > failed):
                return average - step
            step /= 2
        return None

    for i in fewer:  # the ladder replayed: each rung the one the last outcome calls for
        candidate = next_candidate()
        assert tried[i]["average_bits"] == candidate, clusters
        if "same_bits_as" in tried[i]:  # not clustered again: the kept rung's model, size and quality
            assert tried[i]["same_bits_as"] == (tried[kept]["average_bits"] or 4.0)
            assert (tried[i]["size_bytes"], tried[i]["quality"]) == (tried[kept]["size_bytes"], tried[kept]["quality"]), clusters
        if fit[i] and tried[i]["size_bytes"] < tried[kept]["size_bytes"]:
            kept, average = i, candidate
        elif fit[i] and tried[i]["size_bytes"] == tried[kept]["size_bytes"]:
            average = candidate  # the same bits chosen again: on down
        else:
            failed, step = candidate, step / 2
    if fewer:
        assert next_candidate() is None, clusters  # and it stopped where it should
    if kept is not None:
        assert clusters["kept"] == tried[kept]
    if budget == 0.6:
        assert fewer, clusters


def test_defaults_per_measure_and_the_budget_only_with_the_default_stage() -> None:
    assert DEFAULT_QUALITY_DROP["accuracy"] == 0.001 and DEFAULT_QUALITY_DROP["cosine_to_original"] == 0.03
    assert DeepCompressionStep().needs_dataset()
    with pytest.raises(ValueError, match="max_quality_drop"):
        DeepCompressionStep(prune=PruneStep(amount=0.9), max_quality_drop=0.01)


def test_defaults_stay_defaults_through_the_stored_job() -> None:
    # The API stores each step's full dump and the worker reads it back: a default chosen by the worker
    # must still read as "left to the default" there (a filled-in value would look like the user's).
    stored = DeepCompressionStep.model_validate(DeepCompressionStep().model_dump(mode="json"))
    assert stored.prune is None and stored.cluster is None and stored.clusters().bits == 4
    assert PruneStep.model_validate(PruneStep(kind="structured", amount=0.3).model_dump(mode="json")).importance is None


def test_a_rung_whose_bits_repeat_the_kept_ones_is_not_clustered_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # On this MLP the measured allocation at 3.25 bits chooses what it chose at 3.5: the ladder knows
    # that from the measured costs and reuses the kept rung instead of clustering and fine-tuning again.
    model = mlp(in_features=32, hidden=128)
    x, x_eval = (np.random.default_rng(s).standard_normal((n, 32)).astype(np.float32) for s, n in ((0, 256), (1, 128)))
    data = StepData(inputs={"x": x}, labels=reference_outputs(model, x).argmax(-1),
                    evaluation=StepData(inputs={"x": x_eval}, labels=reference_outputs(model, x_eval).argmax(-1)))
    spec = DeepCompressionStep(max_quality_drop=0.6)
    clustered: list[float | None] = []
    real_apply = deep_compression.cluster.apply

    def counted(model, step, data, ctx, measured=None):  # the real step, its calls counted
        clustered.append(step.average_bits)
        return real_apply(model, step, data, ctx, measured)

    monkeypatch.setattr(deep_compression.cluster, "apply", counted)
    ctx = StepContext(work_dir=tmp_path, report_progress=lambda f, m, milestone=False: None)
    _, choice = deep_compression._cluster_stage(model, spec, data, ctx, deep_compression._Budget(model, spec, data.evaluation))
    tried = choice["tried"]
    repeated = [t for t in tried if "same_bits_as" in t]
    assert repeated, tried
    assert clustered == [t["average_bits"] for t in tried if "same_bits_as" not in t]
    # What was skipped is what a run would have given: the same size as the rung it repeats.
    rung = repeated[0]
    again = real_apply(model, spec.clusters().model_copy(update={"average_bits": rung["average_bits"]}), data, ctx)
    assert again.model.ByteSize() == rung["size_bytes"]
