"""Jobs per minute with one and with two worker processes on the same job mix, in the scale-out
configuration: `modelshrink api` plus N `modelshrink worker` processes, Redis on 6379, PostgreSQL on
5432 (database `test`), one artifact directory. The mix: 8 jobs over 4 tenants (fair dispatch lets each
tenant run 2 at once), each an int8 quantization of a 784-1024-1024-10 MLP with a 2,000-run
measurement: a few seconds of single-threaded work per job.

    python -m bench.scale_out
"""

from __future__ import annotations

import time
from pathlib import Path

from bench.common import report, scale_out_service
from service.client import Client
from tests.builders import mlp, to_bytes

JOBS_PER_TENANT, TENANTS = 2, 4
STEP = {"method": "quantize", "mode": "int8_dynamic", "per_channel": True}
MEASURE = {"runs": 2000, "warmup": 5, "batch_sizes": [1]}


def _mix(workers: int) -> dict:
    with scale_out_service(workers) as svc:
        model = Path(svc["data_dir"] / "mlp.onnx")
        model.write_bytes(to_bytes(mlp(in_features=784, hidden=1024, classes=10)))
        clients = [Client(svc["url"], svc["new_key"](f"bench{t}"), timeout=120) for t in range(TENANTS)]
        model_ids = [c.upload_model(model)["id"] for c in clients]
        started = time.perf_counter()
        jobs = [(c, c.submit({"model_id": m, "steps": [STEP], "measure": MEASURE})["id"]) for c, m in zip(clients, model_ids) for _ in range(JOBS_PER_TENANT)]
        finished = [next(d for e, d in c.events(j) if e == "end") for c, j in jobs]
        wall = time.perf_counter() - started
        ran_on = {f["worker"].split(" pid ")[0] for f in finished if f.get("worker")}
        return {"workers": workers, "jobs": len(jobs), "succeeded": sum(f["status"] == "succeeded" for f in finished), "wall_s": round(wall, 1),
                "jobs_per_minute": round(60 * len(jobs) / wall, 1), "workers_used": len(ran_on)}


def main() -> None:
    results = [_mix(1), _mix(2)]
    rows = [[r["workers"], r["jobs"], r["succeeded"], r["wall_s"], r["jobs_per_minute"], r["workers_used"]] for r in results]
    report("scale_out", f"The same {JOBS_PER_TENANT * TENANTS}-job mix on one and on two workers (PostgreSQL + Redis)",
           ["workers", "jobs", "succeeded", "wall s", "jobs/min", "workers that ran jobs"], rows,
           {"speedup": round(results[0]["wall_s"] / results[1]["wall_s"], 2), "step": STEP, "measure": MEASURE})


if __name__ == "__main__":
    main()
