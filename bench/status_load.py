"""Benchmark 2: GET /v1/jobs/{id} under 50 concurrent clients against a running `modelshrink serve`
(one uvicorn process, SQLite): requests/s, p50 and p99 latency."""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import psutil

from bench.common import report, running_service
from service.client import Client
from tests.builders import mlp, save

CLIENTS = 50
DURATION_S = 10.0


async def hammer(url: str, key: str, job_id: str) -> tuple[list[float], int]:
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + DURATION_S
    limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=CLIENTS)
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, limits=limits, timeout=30) as http:

        async def one_client() -> None:
            nonlocal errors
            while time.perf_counter() < deadline:
                start = time.perf_counter()
                response = await http.get(f"/v1/jobs/{job_id}")
                latencies.append((time.perf_counter() - start) * 1000)
                errors += response.status_code != 200

        await asyncio.gather(*(one_client() for _ in range(CLIENTS)))
    return latencies, errors


def main() -> None:
    work = Path(tempfile.mkdtemp())
    with running_service() as svc:
        client = Client(svc["url"], svc["key"])
        model_id = client.upload_model(save(mlp(), work / "m.onnx"))["id"]
        job = client.submit({"model_id": model_id, "steps": [{"method": "quantize", "mode": "fp16"}], "measure": {"runs": 5, "warmup": 1}})
        for _event, _ in client.events(job["id"]):
            pass
        server = psutil.Process(svc["pid"])
        cpu_before = sum(server.cpu_times()[:2])
        client_cpu_before = time.process_time()
        latencies, errors = asyncio.run(hammer(svc["url"], svc["key"], job["id"]))
        server_cpu = sum(server.cpu_times()[:2]) - cpu_before
        client_cpu = time.process_time() - client_cpu_before
    latencies.sort()
    rps = len(latencies) / DURATION_S
    p50, p99 = statistics.median(latencies), latencies[int(len(latencies) * 0.99) - 1]
    # Client and server share this machine's cores: report how much CPU each used per request.
    report("status_load", f"GET /v1/jobs/{{id}}, {CLIENTS} concurrent clients, {DURATION_S:.0f} s",
           ["requests/s", "p50 ms", "p99 ms", "errors", "server CPU ms/req", "client CPU ms/req"],
           [[rps, p50, p99, errors, server_cpu * 1000 / len(latencies), client_cpu * 1000 / len(latencies)]], {"requests": len(latencies)})


if __name__ == "__main__":
    main()
