"""Searches through the HTTP API in the scale-out configuration (`modelshrink api` + N workers,
PostgreSQL, Redis), with the SDK:

- LeNet-300-100 on MNIST, `objective: size`, `max_accuracy_drop: 0.002` judged on the test split,
  30-minute budget, on one worker and on two: the best candidate's size ratio and accuracy drop, the
  wall time of each, every candidate. Reference: Deep Compression by hand reaches 40x (the paper;
  `bench.deep_compression_mnist` 41.6x).
- all-MiniLM-L6-v2 (real weights, real sentences), `objective: latency`, `min_fidelity: 0.99`, beside
  the best single `quantize` job (auto, latency, the same target) run in the same service.

    python -m bench.search                  # both
    python -m bench.search --only lenet     # or minilm
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import report, scale_out_service
from modelshrink.client import Client
from tests import mnist

LENET_MEASURE = {"runs": 200, "batch_sizes": [1, 64], "max_eval_samples": 10000}


def _candidates(search: Any) -> list[list[Any]]:
    rows = []
    for c in search.candidates:
        m = c.metrics
        drop = None if m is None or m.accuracy_drop is None else round(100 * m.accuracy_drop, 2)
        fidelity = None if m is None or m.fidelity is None else round(m.fidelity, 4)
        rows.append([c.recipe, c.rung + 1, c.status + (f" ({c.error.code})" if c.error else ""), m and round(m.compression_ratio, 2), m and round(m.speedup, 2),
                     drop, fidelity, m and m.meets_constraint, c.job_id in search.pareto, c.job_id == search.best])
    return rows


def lenet(workers: int, files: dict[str, Path]) -> dict[str, Any]:
    with scale_out_service(workers, prefix="search-lenet-") as svc, Client(svc["url"], svc["new_key"]("bench"), timeout=600) as client:
        model, train, test = client.upload_model(files["lenet"]), client.upload_dataset(files["train"]), client.upload_dataset(files["test"])
        started = time.perf_counter()
        search = client.search(model.id, "size", dataset_id=train.id, eval_dataset_id=test.id, max_accuracy_drop=0.002, budget_minutes=30, measure=LENET_MEASURE)
        final = client.wait_search(search.id)
        wall = time.perf_counter() - started
        best = next((c for c in final.candidates if c.job_id == final.best), None)
        workers_used = {client.job(c.job_id).worker.split(" pid ")[0] for c in final.candidates if client.job(c.job_id).worker}
        return {"workers": workers, "wall_s": round(wall, 1), "status": final.status, "reason": final.reason, "best": best and best.recipe,
                "best_ratio": best and best.metrics.compression_ratio, "best_drop_points": best and 100 * best.metrics.accuracy_drop,
                "best_accuracy": best and best.metrics.accuracy, "candidates": _candidates(final), "workers_used": len(workers_used)}


def minilm() -> dict[str, Any]:
    from bench.real_models import MEASURE, prepared

    work = Path(tempfile.mkdtemp(prefix="search-minilm-"))
    exp, train, held_out = prepared("minilm", "torchscript", work)
    (work / "train.npz").write_bytes(train)
    (work / "held_out.npz").write_bytes(held_out)
    with scale_out_service(2, prefix="search-minilm-") as svc, Client(svc["url"], svc["new_key"]("bench"), timeout=600) as client:
        model, data, evaluation = client.upload_model(exp.path), client.upload_dataset(work / "train.npz"), client.upload_dataset(work / "held_out.npz")
        step = {"method": "quantize", "mode": "auto", "objective": "latency", "target": {"min_cosine": 0.99}}
        started = time.perf_counter()
        single = client.wait(client.submit(model.id, [step], dataset_id=data.id, eval_dataset_id=evaluation.id, measure=MEASURE).id)
        single_s = time.perf_counter() - started
        started = time.perf_counter()
        search = client.search(model.id, "latency", dataset_id=data.id, eval_dataset_id=evaluation.id, min_fidelity=0.99, budget_minutes=30, measure=MEASURE)
        final = client.wait_search(search.id)
        search_s = time.perf_counter() - started
        best = next((c for c in final.candidates if c.job_id == final.best), None)
        by_batch = {o.batch: o.p50 / c.p50 for o, c in zip(single.metrics.original.latency_by_batch, single.metrics.compressed.latency_by_batch)} if single.metrics else {}
        single_speedup = (by_batch.get(1, 0) * by_batch.get(32, 0)) ** 0.5 if by_batch else None
        return {"single_status": single.status, "single_speedup": single_speedup, "single_cosine": single.metrics and single.metrics.compressed.fidelity.cosine,
                "single_s": round(single_s, 1), "search_status": final.status, "best": best and best.recipe, "best_speedup": best and best.metrics.speedup,
                "best_fidelity": best and best.metrics.fidelity, "search_s": round(search_s, 1), "candidates": _candidates(final), "reason": final.reason}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", choices=["lenet", "minilm"])
    args = parser.parse_args()
    columns = ["run", "recipe", "rung", "status", "size ratio", "speedup", "accuracy drop (points)", "fidelity", "meets", "Pareto", "best"]
    rows, extra = [], {}
    if args.only in (None, "lenet"):
        files = mnist.write_files(Path(tempfile.mkdtemp(prefix="search-mnist-")))
        for workers in (1, 2):
            result = lenet(workers, files)
            extra[f"lenet_{workers}_workers"] = {k: v for k, v in result.items() if k != "candidates"}
            rows += [[f"LeNet-300-100, {workers} worker(s), {result['wall_s']} s", *row] for row in result["candidates"]]
            print(extra[f"lenet_{workers}_workers"], flush=True)
        one, two = extra["lenet_1_workers"]["wall_s"], extra["lenet_2_workers"]["wall_s"]
        extra["lenet_two_worker_speedup"] = round(one / two, 2)
    if args.only in (None, "minilm"):
        result = minilm()
        extra["minilm"] = {k: v for k, v in result.items() if k != "candidates"}
        rows += [[f"MiniLM search, {result['search_s']} s", *row] for row in result["candidates"]]
        rows.append([f"MiniLM single quantize auto job, {result['single_s']} s", "quantize-auto", 1, result["single_status"], None,
                     result["single_speedup"] and round(result["single_speedup"], 2), None, result["single_cosine"] and round(result["single_cosine"], 4), None, None, None])
        print(extra["minilm"], flush=True)
    report("search" if args.only is None else f"search_{args.only}", "Searches through the HTTP API (scale-out configuration)", columns, rows, extra)


if __name__ == "__main__":
    main()
