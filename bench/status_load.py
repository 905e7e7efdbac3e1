"""GET /v1/jobs/{id} (what every pipeline polls) against GET /healthz on the same running
`modelshrink serve` (one uvicorn process, SQLite), 50 concurrent connections, in one run.

The load generator is wrk (`apt-get install wrk`: C, event-driven, a few percent of a core), so on
two cores the server is what is measured; without wrk, an httpx generator in this process is used
and the table says so (it needs more CPU per request than the server and caps the figures).

    python -m bench.status_load [--duration 10] [--connections 50] [--database-url postgresql+psycopg://postgres@localhost:5432/test]

On SQLite (the default) the status row is read on the event loop; on PostgreSQL on the API's
threads (service.api.job_status), so the second is measured by naming its URL.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import psutil

from bench.common import report, running_service
from service.client import Client
from tests.builders import mlp, save


def _ms(value: str, unit: str) -> float:
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def with_wrk(url: str, path: str, key: str, connections: int, duration: float) -> dict[str, float]:
    # One wrk thread: with two, the server's loop and wrk's threads shared two cores, and whichever wrk
    # thread lost its core held 25 connections' responses unread (status p99 250 ms with -t2, 40 ms with -t1).
    out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{duration:.0f}s", "--latency", "-H", f"Authorization: Bearer {key}", url + path],
                         capture_output=True, text=True, check=True).stdout
    latency = {p: _ms(v, u) for p, v, u in re.findall(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s)$", out, re.M)}
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)), "p50": latency["50"], "p99": latency["99"],
            "errors": (int(errors.group(1)) if errors else 0) + (sum(int(x) for x in socket_errors.groups()) if socket_errors else 0),
            "requests": int(re.search(r"(\d+) requests in", out).group(1))}


def with_httpx(url: str, path: str, key: str, connections: int, duration: float) -> dict[str, float]:
    async def hammer() -> tuple[list[float], int]:
        latencies: list[float] = []
        errors = 0
        deadline = time.perf_counter() + duration
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, limits=limits, timeout=30) as http:
            async def one() -> None:
                nonlocal errors
                while time.perf_counter() < deadline:
                    start = time.perf_counter()
                    response = await http.get(path)
                    latencies.append((time.perf_counter() - start) * 1000)
                    errors += response.status_code != 200
            await asyncio.gather(*(one() for _ in range(connections)))
        return latencies, errors

    latencies, errors = asyncio.run(hammer())
    latencies.sort()
    return {"rps": len(latencies) / duration, "p50": statistics.median(latencies), "p99": latencies[int(len(latencies) * 0.99) - 1],
            "errors": errors, "requests": len(latencies)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--database-url", default=None, help="the job store (default: the embedded SQLite file)")
    args = parser.parse_args()
    generator = with_wrk if shutil.which("wrk") else with_httpx
    work = Path(tempfile.mkdtemp())
    rows, details = [], {}
    with running_service({"MODELSHRINK_DATABASE_URL": args.database_url} if args.database_url else None) as svc:
        client = Client(svc["url"], svc["key"])
        model_id = client.upload_model(save(mlp(), work / "m.onnx"))["id"]
        job = client.submit({"model_id": model_id, "steps": [{"method": "quantize", "mode": "fp16"}], "measure": {"runs": 5, "warmup": 1}})
        for _event, _ in client.events(job["id"]):
            pass
        server = psutil.Process(svc["pid"])
        for name, path in (("GET /healthz", "/healthz"), ("GET /v1/jobs/{id}", f"/v1/jobs/{job['id']}")):
            generator(svc["url"], path, svc["key"], args.connections, 2.0)  # warm up
            cpu = sum(server.cpu_times()[:2])
            result = generator(svc["url"], path, svc["key"], args.connections, args.duration)
            result["server_cpu_ms"] = (sum(server.cpu_times()[:2]) - cpu) * 1000 / max(1, result["requests"])
            details[name] = result
            rows.append([name, round(result["rps"], 1), round(result["p50"], 1), round(result["p99"], 1), result["errors"], round(result["server_cpu_ms"], 2)])
    ratio = details["GET /v1/jobs/{id}"]["rps"] / details["GET /healthz"]["rps"]
    rows.append(["status / healthz", round(ratio, 3), None, None, None, None])
    database = "PostgreSQL" if args.database_url else "SQLite"
    report("status_load" if not args.database_url else "status_load_postgresql",
           f"{args.connections} connections, {args.duration:.0f} s each, load from {generator.__name__[5:]}, {database}",
           ["endpoint", "requests/s", "p50 ms", "p99 ms", "errors", "server CPU ms/req"], rows,
           {"generator": generator.__name__[5:], "database": database, "details": details, "ratio": ratio, "date": time.strftime("%Y-%m-%d")})


if __name__ == "__main__":
    main()
