"""Shared by the benchmarks: start a real `modelshrink serve` in a temp data dir, print and save results."""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import httpx
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
# A test running a benchmark points this elsewhere, so the committed results are not overwritten.
RESULTS = Path(os.environ.get("MODELSHRINK_BENCH_RESULTS", ROOT / "bench" / "results"))
sys.path.insert(0, str(ROOT))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, path: str = "/healthz", timeout_s: float = 60.0) -> bool:
    """Poll the service until `path` answers 200 (True) or the time is up (False)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}{path}", timeout=2).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    return False


@contextmanager
def running_service(extra_env: dict[str, str] | None = None, command: str = "serve") -> Iterator[dict[str, Any]]:
    data_dir = Path(tempfile.mkdtemp(prefix="modelshrink-bench-"))
    port = free_port()
    env = {**os.environ, "MODELSHRINK_DATA_DIR": str(data_dir), **(extra_env or {})}
    exe = str(Path(sys.executable).parent / "modelshrink")
    key = subprocess.run([exe, "keys", "create", "--tenant", "bench"], env=env, capture_output=True, text=True, check=True).stdout.strip()
    proc = subprocess.Popen([exe, command, "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=open(data_dir / "service.log", "w"))
    url = f"http://127.0.0.1:{port}"
    if not wait_healthy(url, "/readyz" if command == "serve" else "/healthz"):
        proc.terminate()
        raise RuntimeError(f"service did not become ready; see {data_dir / 'service.log'}")
    try:
        yield {"url": url, "key": key, "pid": proc.pid, "data_dir": data_dir, "env": env}
    finally:
        proc.terminate()
        proc.wait(30)


@contextmanager
def scale_out_service(workers: int, prefix: str = "scale-out-") -> Iterator[dict[str, Any]]:
    """The scale-out configuration: `modelshrink api` plus `workers` worker processes, Redis on 6379,
    PostgreSQL on 5432 (database `test`), one artifact directory; its own queue name."""
    data_dir = Path(tempfile.mkdtemp(prefix=prefix))
    env = {**os.environ, "MODELSHRINK_DATA_DIR": str(data_dir), "MODELSHRINK_DATABASE_URL": "postgresql+psycopg://postgres@localhost:5432/test",
           "MODELSHRINK_BROKER_URL": "redis://localhost:6379/0", "MODELSHRINK_QUEUE_NAME": f"bench-{uuid.uuid4().hex[:8]}",
           "MODELSHRINK_MAX_DATASET_DECOMPRESSED_BYTES": str(2 * 1024**3)}
    exe = str(Path(sys.executable).parent / "modelshrink")
    port = free_port()
    procs = [subprocess.Popen([exe, "api", "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=open(data_dir / "api.log", "w"))]
    procs += [subprocess.Popen([exe, "worker", "--hostname", f"bench{i}@%h"], env=env, stdout=subprocess.DEVNULL, stderr=open(data_dir / f"worker{i}.log", "w"))
              for i in range(workers)]
    try:
        url = f"http://127.0.0.1:{port}"
        if not wait_healthy(url):
            raise RuntimeError(f"the API did not answer; see {data_dir / 'api.log'}")

        def new_key(tenant: str) -> str:
            return subprocess.run([exe, "keys", "create", "--tenant", tenant], env=env, capture_output=True, text=True, check=True).stdout.strip()

        yield {"url": url, "data_dir": data_dir, "env": env, "new_key": new_key}
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(30)


def machine() -> dict[str, Any]:
    return {"cpu_count": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version()}


def report(name: str, title: str, columns: list[str], rows: list[list[Any]], extra: dict[str, Any]) -> None:
    table = Table(title=title)
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*[f"{v:.4g}" if isinstance(v, float) else str(v) for v in row])
    Console().print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "machine": machine(), "columns": columns, "rows": rows, **extra}
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2, default=str))
