"""The search's rules on their own: recipes and rung budgets, the constraint, the Pareto front, the
best, successive halving's promotions, and the driver's decisions (jobs built in memory, no database)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from service.core.job_metrics import JobMetrics, checked, stored
from service.core.search_driver import decide
from service.core.search_plan import recipes, steps_at_rung
from service.core.search_select import best, closest, pareto, point, promote
from service.core.settings import Settings
from service.core.specs import STEP_TYPES
from service.core.tables import Job, Search, utcnow

ORIGINAL_BYTES = 100_000


def metrics(ratio: float, speedup: float, accuracy: float | None = None, cosine: float = 0.999, original_accuracy: float = 0.98) -> JobMetrics:
    latency = [{"batch": 1, "p50": 1.0, "p95": 1.1, "runs": 20}, {"batch": 32, "p50": 10.0, "p95": 11.0, "runs": 20}]
    return checked({
        "original": {"size_bytes": ORIGINAL_BYTES, "accuracy": original_accuracy if accuracy is not None else None, "latency_by_batch": latency},
        "compressed": {
            "size_bytes": int(ORIGINAL_BYTES / ratio), "accuracy": accuracy, "fidelity": {"cosine": cosine},
            "latency_by_batch": [{**r, "p50": r["p50"] / speedup} for r in latency],
        },
        "compression_ratio": ratio, "speedup": speedup,
    }, strict=True)


ACCURACY = {"max_accuracy_drop": 0.005, "min_fidelity": None}


def test_constraint_and_objective_come_from_the_job_metrics() -> None:
    ok = point("job_a", "r", 0, metrics(4.0, 2.0, accuracy=0.978), ACCURACY)
    assert ok.feasible and ok.accuracy_drop == pytest.approx(0.002) and ok.objective("size") == 4.0
    assert ok.speedup == pytest.approx(2.0) and ok.objective("latency") == pytest.approx(2.0)
    missed = point("job_b", "r", 0, metrics(30.0, 1.0, accuracy=0.96), ACCURACY)
    assert not missed.feasible and missed.violation == pytest.approx(0.015)
    unfaithful = point("job_c", "r", 0, metrics(4.0, 3.0, cosine=0.95), {"max_accuracy_drop": None, "min_fidelity": 0.99})
    assert unfaithful.violation == pytest.approx(0.04)


def test_best_is_the_feasible_candidate_with_the_best_objective_and_none_without_one() -> None:
    points = [
        point("job_small_bad", "a", 0, metrics(40.0, 1.0, accuracy=0.90), ACCURACY),
        point("job_mid", "b", 0, metrics(20.0, 1.1, accuracy=0.977), ACCURACY),
        point("job_fast", "c", 0, metrics(4.0, 3.0, accuracy=0.979), ACCURACY),
    ]
    assert best(points, "size").job_id == "job_mid"
    assert best(points, "latency").job_id == "job_fast"
    assert best(points[:1], "size") is None
    assert [p.job_id for p in closest(points[:1])] == ["job_small_bad"]


def test_pareto_front_drops_exactly_the_dominated_candidates() -> None:
    points = [
        point("job_a", "a", 0, metrics(40.0, 1.0, accuracy=0.90), ACCURACY),  # smallest
        point("job_b", "b", 0, metrics(20.0, 1.1, accuracy=0.977), ACCURACY),
        point("job_c", "c", 0, metrics(10.0, 1.0, accuracy=0.970), ACCURACY),  # worse than b on every axis
        point("job_d", "d", 0, metrics(4.0, 3.0, accuracy=0.979), ACCURACY),  # fastest, most accurate
    ]
    assert [p.job_id for p in pareto(points)] == ["job_a", "job_b", "job_d"]


def test_promotion_keeps_only_trainable_misses_that_could_beat_the_incumbent() -> None:
    points = [
        point("job_q", "quantize-auto", 0, metrics(4.0, 2.0, accuracy=0.979), ACCURACY),  # feasible incumbent: 4x
        point("job_near", "dc-95", 0, metrics(45.0, 1.0, accuracy=0.972), ACCURACY),  # misses by 0.003, 45x
        point("job_far", "dc-90", 0, metrics(30.0, 1.0, accuracy=0.94), ACCURACY),  # misses by 0.035, 30x
        point("job_worse", "distill", 0, metrics(3.0, 1.0, accuracy=0.96), ACCURACY),  # misses and smaller objective: rejected early
        point("job_fixed", "frozen", 0, metrics(50.0, 1.0, accuracy=0.90), ACCURACY),  # not trainable: more budget changes nothing
    ]
    trainable = {"dc-95", "dc-90", "distill"}
    assert [p.job_id for p in promote(points, trainable, "size", room=2)] == ["job_near", "job_far"]
    assert [p.job_id for p in promote(points, trainable, "size", room=1)] == ["job_near"]
    # Once a feasible 46x candidate exists, neither miss can win any more.
    points.append(point("job_great", "dc-92", 0, metrics(46.0, 1.0, accuracy=0.978), ACCURACY))
    assert promote(points, trainable | {"dc-92"}, "size", room=3) == []


def test_recipes_follow_the_objective_the_data_and_the_allowed_methods() -> None:
    with_data = {"has_dataset": True, "labels": True, "token_inputs": False}
    size = {r.name for r in recipes("size", with_data, {}, 0, None)}
    assert {"quantize-auto", "deep-compression-p92-b4", "distill-w25-quantize", "low-rank-quantize"} <= size
    latency = {r.name for r in recipes("latency", with_data, {}, 0, None)}
    assert {"quantize-auto", "prune-structured-30", "prune-structured-50-quantize"} <= latency and "deep-compression-p92-b4" not in latency
    assert [r.name for r in recipes("size", {"has_dataset": False}, {}, 0, None)] == ["quantize-auto"]
    assert {r.name for r in recipes("size", with_data, {}, 0, ["quantize", "distill"])} == {"quantize-auto", "distill-w25-quantize"}
    # Every recipe's steps are valid job steps.
    by_method = {spec.model_fields["method"].default: spec for spec in STEP_TYPES}
    for recipe in recipes("size", with_data, {"max_accuracy_drop": 0.01}, 7, None) + recipes("latency", with_data, {"min_cosine": 0.99}, 7, None):
        for step in recipe.steps:
            by_method[step["method"]].model_validate(step)


def test_first_rung_runs_a_third_of_every_fine_tuning_budget() -> None:
    recipe = next(r for r in recipes("size", {"has_dataset": True}, {}, 3, None) if r.name == "deep-compression-p92-b4")
    first, full = steps_at_rung(recipe, 0)[0], steps_at_rung(recipe, 1)[0]
    assert (first["prune"]["finetune_epochs"], first["cluster"]["finetune_epochs"]) == (1, 1)
    assert (full["prune"]["finetune_epochs"], full["cluster"]["finetune_epochs"]) == (3, 2)
    assert first["prune"]["iterations"] == full["prune"]["iterations"] == 3
    assert full["prune"]["training"]["seed"] == 3
    assert recipe.steps[0]["prune"]["finetune_epochs"] == 3  # the recipe itself is not changed


def _search(tmp_path: Path, **request: object) -> tuple[Search, Settings]:
    settings = Settings(data_dir=tmp_path)
    values = {"objective": "size", "max_accuracy_drop": 0.005, "min_fidelity": None, "budget_minutes": 30.0, "methods": ["quantize", "distill"], "seed": 0}
    values.update(request)
    search = Search(id="srch_t", tenant_id="ten_t", model_id="mdl_t", request=values, facts={"has_dataset": True, "labels": True, "token_inputs": False},
                    rung=0, version=0, result={}, cancel_requested=False, deadline_at=utcnow() + timedelta(minutes=30))
    return search, settings


def _finished(job: Job, status: str, job_metrics: JobMetrics | None) -> Job:
    job.status, job.metrics = status, stored(job_metrics) if job_metrics is not None else None  # as the job row holds them
    return job


def test_driver_plans_the_first_rung_then_promotes_then_finishes(tmp_path: Path) -> None:
    search, settings = _search(tmp_path)
    first = decide(search, [], settings)
    assert [j.options["search"]["recipe"] for j in first.new_jobs] == ["quantize-auto", "distill-w25-quantize"]
    assert all(j.search_id == "srch_t" and j.options["limits"]["time_limit_s"] <= 30 * 60 + 1 for j in first.new_jobs)
    assert first.new_jobs[1].steps[0]["epochs"] == 2  # a third of 6
    assert decide(search, first.new_jobs, settings).values.keys() == {"progress"}  # nothing ended yet
    quantized, distilled = first.new_jobs
    _finished(quantized, "succeeded", metrics(4.0, 2.0, accuracy=0.979))
    _finished(distilled, "succeeded", metrics(12.0, 2.5, accuracy=0.97))  # misses by 0.005 but 12x > 4x: promoted
    search.result = first.values["result"]
    second = decide(search, first.new_jobs, settings)
    assert second.values["rung"] == 1 and len(second.new_jobs) == 1
    assert second.new_jobs[0].options["search"] == {"id": "srch_t", "recipe": "distill-w25-quantize", "rung": 1}
    assert second.new_jobs[0].steps[0]["epochs"] == 6
    search.rung = 1
    done = decide(search, first.new_jobs + [_finished(second.new_jobs[0], "succeeded", metrics(12.0, 2.5, accuracy=0.978))], settings)
    assert done.values["status"] == "succeeded" and done.values["result"]["best"] == second.new_jobs[0].id


def test_a_qualifying_candidate_is_promoted_while_its_rung_still_runs(tmp_path: Path) -> None:
    search, settings = _search(tmp_path, methods=["quantize", "distill", "low_rank"])
    quantized, distilled, factorised = decide(search, [], settings).new_jobs
    search.result = {"planned": 5}
    _finished(distilled, "succeeded", metrics(12.0, 2.5, accuracy=0.97))  # misses, 12x
    # No feasible candidate yet: a later one may show the miss is hopeless, so nothing is promoted.
    assert decide(search, [quantized, distilled, factorised], settings).new_jobs == []
    _finished(quantized, "succeeded", metrics(4.0, 2.0, accuracy=0.979))  # feasible incumbent, 4x
    early = decide(search, [quantized, distilled, factorised], settings)  # low_rank still runs
    assert [j.options["search"]["recipe"] for j in early.new_jobs] == ["distill-w25-quantize"] and early.values["rung"] == 1
    # Promoted once only; the room (half of two trainable recipes) is used up.
    _finished(factorised, "succeeded", metrics(8.0, 1.5, accuracy=0.96))
    assert decide(search, [quantized, distilled, factorised, *early.new_jobs], settings).new_jobs == []


def test_driver_ends_at_the_deadline_and_on_cancel_cancelling_the_rest(tmp_path: Path) -> None:
    search, settings = _search(tmp_path)
    jobs = decide(search, [], settings).new_jobs
    _finished(jobs[0], "succeeded", metrics(4.0, 2.0, accuracy=0.979))
    search.deadline_at = utcnow() - timedelta(seconds=1)
    late = decide(search, jobs, settings)
    assert late.values["status"] == "succeeded" and late.values["result"]["best"] == jobs[0].id
    assert late.cancel == [jobs[1].id] and "budget of 30.0 minutes reached" in late.values["result"]["reason"]
    search.deadline_at, search.cancel_requested = utcnow() + timedelta(minutes=5), True
    cancelled = decide(search, jobs, settings)
    assert cancelled.values["status"] == "cancelled" and cancelled.cancel == [jobs[1].id]


def test_driver_fails_with_the_closest_candidates_when_none_meets_the_constraint(tmp_path: Path) -> None:
    search, settings = _search(tmp_path, methods=["quantize"])
    jobs = decide(search, [], settings).new_jobs
    _finished(jobs[0], "succeeded", metrics(4.0, 2.0, accuracy=0.95))
    search.result = {"planned": 1}
    end = decide(search, jobs, settings)
    assert end.values["status"] == "failed" and end.values["error"]["code"] == "search_target_missed"
    assert end.values["result"]["closest"] == [jobs[0].id] and "quantize-auto" in end.values["error"]["message"]


def test_search_progress_counts_its_running_candidates() -> None:
    from service.core.search_view import live_progress

    search = Search(id="srch_p", status="running", progress={"fraction": 0.0, "step": "rung 1 of 2", "message": "planning"}, result={"planned": 4})
    jobs = [Job(id="a", status="succeeded", progress={"fraction": 1.0}), Job(id="b", status="running", progress={"fraction": 0.5}),
            Job(id="c", status="queued", progress={"fraction": 0.0})]
    progress = live_progress(search, jobs)
    assert progress["fraction"] == (1 + 0.5) / 4 and "1 running" in progress["message"] and progress["step"] == "rung 1 of 2"
    search.status = "succeeded"
    assert live_progress(search, jobs)["fraction"] == 0.0  # a finished search keeps what it recorded


def test_timing_noise_is_a_tie_that_the_other_axis_breaks() -> None:
    fidelity = {"max_accuracy_drop": None, "min_fidelity": 0.99}
    points = [point("job_latency_search", "a", 0, metrics(2.44, 1.32), fidelity), point("job_int8", "b", 0, metrics(3.01, 1.30), fidelity),
              point("job_dominated", "c", 0, metrics(2.40, 1.25), fidelity)]
    # 1.32x vs 1.30x is timing noise: the 3.01x smaller one wins; never a candidate another beats on both axes.
    assert best(points, "latency").job_id == "job_int8"
    chosen = best(points, "latency")
    assert not any(p.ratio > chosen.ratio and p.speedup > chosen.speedup for p in points)
    clear = [point("job_fast", "a", 0, metrics(2.0, 1.6), fidelity), point("job_small", "b", 0, metrics(3.0, 1.3), fidelity)]
    assert best(clear, "latency").job_id == "job_fast"  # 23% faster is not noise


def llm_metrics(ratio: float, decode_speedup: float, increase: float) -> JobMetrics:
    """An LLM job's metrics as the worker writes them: no batch latencies, perplexity in `llm`."""
    def measured(size: int, tokens_per_s: float, perplexity: float, extra: dict) -> dict:
        return {"size_bytes": size, "latency_by_batch": [],
                "llm": {"perplexity": perplexity, "decode_tokens_per_s": tokens_per_s, "weight_bytes": size, **extra}}

    return checked({
        "original": measured(ORIGINAL_BYTES, 10.0, 20.0, {}),
        "compressed": measured(int(ORIGINAL_BYTES / ratio), 10.0 * decode_speedup, 20.0 * (1 + increase), {"perplexity_increase": increase}),
        "compression_ratio": ratio, "speedup": decode_speedup,
    }, strict=True)


def test_an_llm_search_judges_perplexity_and_decode_speed() -> None:
    constraint = {"max_accuracy_drop": None, "min_fidelity": None, "max_perplexity_increase": 0.05}
    int4 = point("job_int4", "llm-int4-gptq", 0, llm_metrics(6.2, 3.9, 0.11), constraint)
    mixed = point("job_mixed", "llm-auto", 0, llm_metrics(4.7, 3.3, 0.043), constraint)
    int8 = point("job_int8", "llm-int8", 0, llm_metrics(2.0, 2.7, 0.003), constraint)
    assert not int4.feasible and int4.violation == pytest.approx(0.06) and int4.speedup == pytest.approx(3.9)
    assert mixed.feasible and mixed.perplexity_increase == pytest.approx(0.043)
    # Quality is the perplexity ratio (higher is better), so the front keeps all three trade-offs.
    assert mixed.quality() > int4.quality() and int8.quality() > mixed.quality()
    assert [p.job_id for p in pareto([int4, mixed, int8])] == ["job_int4", "job_mixed", "job_int8"]
    assert best([int4, mixed, int8], "size") is mixed and best([int4, mixed, int8], "latency") is mixed
    assert mixed.public().perplexity_increase == pytest.approx(0.043) and mixed.public().quality("perplexity") == pytest.approx(1 / 1.043)
    # A missing perplexity cannot meet a perplexity constraint.
    assert point("job_onnx", "r", 0, metrics(4.0, 2.0), constraint).violation == float("inf")


def test_llm_recipes_are_quantize_jobs_an_llm_checkpoint_takes() -> None:
    from service.core.llm import LLM_QUANTIZE_MODES

    facts = {"has_dataset": True, "labels": False, "token_inputs": True, "llm": True}
    found = recipes("size", facts, {"max_perplexity_increase": 0.02}, 0, None)
    assert [r.name for r in found] == ["llm-auto", "llm-int4-gptq", "llm-int4-gptq-lm-head-int8", "llm-int4-rtn", "llm-int8"]
    by_method = {spec.model_fields["method"].default: spec for spec in STEP_TYPES}
    for recipe in found:
        assert not recipe.trainable and len(recipe.steps) == 1
        step = by_method["quantize"].model_validate(recipe.steps[0])
        assert step.mode in LLM_QUANTIZE_MODES
    assert found[0].steps[0]["max_perplexity_increase"] == 0.02  # auto is held to the search's own constraint
    assert recipes("size", facts, {}, 0, ["distill"]) == []
