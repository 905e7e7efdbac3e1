"""Jobs per minute with one and with two worker processes on the same job mix, in the scale-out
configuration: `modelshrink api` plus N `modelshrink worker` processes, Redis on 6379, PostgreSQL on
5432 (database `test`), one artifact directory. The mix: 8 jobs over 4 tenants (fair dispatch lets each
tenant run 2 at once), each an int8 quantization of a 784-1024-1024-10 MLP with a 2,000-run
measurement: a few seconds of single-threaded work per job.

    python -m bench.scale_out
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path


from bench.common import free_port, report, wait_healthy
from service.client import Client
from tests.builders import mlp, to_bytes

JOBS_PER_TENANT, TENANTS = 2, 4
STEP = {"method": "quantize", "mode": "int8_dynamic", "per_channel": True}
MEASURE = {"runs": 2000, "warmup": 5, "batch_sizes": [1]}


def _mix(workers: int) -> dict:
    data_dir = Path(tempfile.mkdtemp(prefix="scale-out-"))
    env = {**os.environ, "MODELSHRINK_DATA_DIR": str(data_dir), "MODELSHRINK_DATABASE_URL": "postgresql+psycopg://postgres@localhost:5432/test",
           "MODELSHRINK_BROKER_URL": "redis://localhost:6379/0", "MODELSHRINK_QUEUE_NAME": f"bench-{uuid.uuid4().hex[:8]}"}
    exe = str(Path(sys.executable).parent / "modelshrink")
    port = free_port()
    procs = [subprocess.Popen([exe, "api", "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=open(data_dir / "api.log", "w"))]
    procs += [subprocess.Popen([exe, "worker", "--hostname", f"bench{i}@%h"], env=env, stdout=subprocess.DEVNULL, stderr=open(data_dir / f"worker{i}.log", "w"))
              for i in range(workers)]
    try:
        url = f"http://127.0.0.1:{port}"
        if not wait_healthy(url):
            raise RuntimeError(f"the API did not answer; see {data_dir / 'api.log'}")
        model = Path(data_dir / "mlp.onnx")
        model.write_bytes(to_bytes(mlp(in_features=784, hidden=1024, classes=10)))
        clients = []
        for t in range(TENANTS):
            key = subprocess.run([exe, "keys", "create", "--tenant", f"bench{t}"], env=env, capture_output=True, text=True, check=True).stdout.strip()
            clients.append(Client(url, key, timeout=120))
        model_ids = [c.upload_model(model)["id"] for c in clients]
        started = time.perf_counter()
        jobs = [(c, c.submit({"model_id": m, "steps": [STEP], "measure": MEASURE})["id"]) for c, m in zip(clients, model_ids) for _ in range(JOBS_PER_TENANT)]
        finished = [next(d for e, d in c.events(j) if e == "end") for c, j in jobs]
        wall = time.perf_counter() - started
        ran_on = {f["worker"].split(" pid ")[0] for f in finished if f.get("worker")}
        return {"workers": workers, "jobs": len(jobs), "succeeded": sum(f["status"] == "succeeded" for f in finished), "wall_s": round(wall, 1),
                "jobs_per_minute": round(60 * len(jobs) / wall, 1), "workers_used": len(ran_on)}
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(30)


def main() -> None:
    results = [_mix(1), _mix(2)]
    rows = [[r["workers"], r["jobs"], r["succeeded"], r["wall_s"], r["jobs_per_minute"], r["workers_used"]] for r in results]
    report("scale_out", f"The same {JOBS_PER_TENANT * TENANTS}-job mix on one and on two workers (PostgreSQL + Redis)",
           ["workers", "jobs", "succeeded", "wall s", "jobs/min", "workers that ran jobs"], rows,
           {"speedup": round(results[0]["wall_s"] / results[1]["wall_s"], 2), "step": STEP, "measure": MEASURE})


if __name__ == "__main__":
    main()
