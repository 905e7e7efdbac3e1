"""`modelshrink serve` as a user runs it: one command, embedded Redis, a worker; SIGTERM stops every
child; a second start finds the data intact."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest

from service.client import Client
from tests.builders import mlp, save

pytestmark = pytest.mark.integration
EXE = str(Path(sys.executable).parent / "modelshrink")


def start(env: dict[str, str], port: int) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([EXE, "serve", "--port", str(port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    url = proc.stdout.readline().strip()  # serve prints its URL once it is about to listen
    assert url == f"http://127.0.0.1:{port}"
    # Keep reading what it prints (the access log): a full pipe blocks the server's event loop on its
    # next log line, and 200 requests at once filled it.
    threading.Thread(target=proc.stdout.read, daemon=True).start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise AssertionError("serve did not become ready")


def stop(proc: subprocess.Popen) -> None:
    children = psutil.Process(proc.pid).children(recursive=True)
    assert any("celery" in " ".join(c.cmdline()) for c in children)
    assert any("redis-server" in " ".join(c.cmdline()) for c in children)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0
    gone, alive = psutil.wait_procs(children, timeout=30)
    assert alive == [], f"children left running: {alive}"


def test_serve_stops_cleanly_and_keeps_data(tmp_path: Path) -> None:
    from tests.conftest import ROOT
    from bench.common import free_port

    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MODELSHRINK_")}, "MODELSHRINK_DATA_DIR": str(tmp_path / "data"), "PYTHONPATH": str(ROOT)}
    key = subprocess.run([EXE, "keys", "create", "--tenant", "acme"], env=env, capture_output=True, text=True, check=True).stdout
    assert re.fullmatch(r"msk_[A-Za-z0-9_-]{40,}\n", key)
    key = key.strip()

    port = free_port()
    proc, url = start(env, port)
    try:
        client = Client(url, key)
        # torch's default export (model.onnx + model.onnx.data) goes up zipped by the client.
        from tests.api.test_external_data_upload import _default_export

        export_dir = tmp_path / "export"
        export_dir.mkdir()
        assert client.upload_model(_default_export(export_dir))["parameters"] == 64 * 256 + 256 + 256 * 10 + 10
        model_id = client.upload_model(save(mlp(), tmp_path / "m.onnx"))["id"]
        job = client.submit({"model_id": model_id, "steps": [{"method": "quantize", "mode": "fp16"}], "measure": {"runs": 5, "warmup": 1}})
        final = [data for event, data in client.events(job["id"]) if event == "end"][0]
        assert final["status"] == "succeeded", final["error"]
        client.download(job["id"], "model.onnx", tmp_path / "first.onnx")

        # The CLI a person scripts with: submit --wait prints the metrics table and saves the model.
        cli_env = {**env, "MODELSHRINK_URL": url, "MODELSHRINK_API_KEY": key}
        step = '{"method":"quantize","mode":"int8_dynamic"}'
        submitted = subprocess.run([EXE, "submit", str(tmp_path / "m.onnx"), "--step", step, "--wait", "-o", str(tmp_path / "cli.onnx")],
                                   env=cli_env, capture_output=True, text=True, timeout=120)
        assert submitted.returncode == 0, submitted.stderr
        cli_job = submitted.stdout.strip().splitlines()[-1]
        assert cli_job.startswith("job_") and "compression ratio" in submitted.stdout
        assert (tmp_path / "cli.onnx").stat().st_size > 0
        shown = subprocess.run([EXE, "status", cli_job], env=cli_env, capture_output=True, text=True, timeout=60)
        assert shown.returncode == 0 and "succeeded" in shown.stdout
        missing = subprocess.run([EXE, "status", "job_nope"], env=cli_env, capture_output=True, text=True, timeout=60)
        assert missing.returncode == 1 and "not_found" in missing.stderr
    finally:
        stop(proc)

    proc, url = start(env, port)
    try:
        client = Client(url, key)
        assert client.job(job["id"])["status"] == "succeeded"
        client.download(job["id"], "model.onnx", tmp_path / "second.onnx")
        assert (tmp_path / "first.onnx").read_bytes() == (tmp_path / "second.onnx").read_bytes()
    finally:
        stop(proc)


def test_make_serve_stops_with_make(tmp_path: Path) -> None:
    """`make serve` then SIGTERM to make (what a process manager sends it): nothing is left running."""
    from bench.common import free_port
    from tests.conftest import ROOT

    port = free_port()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("MODELSHRINK_", "MAKE"))},
           "MODELSHRINK_DATA_DIR": str(tmp_path / "data"), "PORT": str(port), "PYTHONPATH": str(ROOT)}
    make = subprocess.Popen(["make", "-s", "serve"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert make.stdout.readline().strip() == f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        else:
            raise AssertionError("make serve never answered /healthz within 60 s")
        tree = psutil.Process(make.pid).children(recursive=True)
        assert any("redis-server" in " ".join(p.cmdline()) for p in tree)
        make.send_signal(signal.SIGTERM)
        make.wait(30)
        gone, alive = psutil.wait_procs(tree, timeout=30)
        assert alive == [], f"left running after make was stopped: {[p.cmdline()[:3] for p in alive]}"
    finally:
        for p in psutil.Process(make.pid).children(recursive=True) if make.poll() is None else []:
            p.kill()
