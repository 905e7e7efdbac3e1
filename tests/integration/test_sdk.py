"""The Python SDK (sync and async) and the CLI's `search` against a real `modelshrink serve`."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import onnx
import pytest

from bench.common import free_port
from modelshrink.client import ApiFailure, AsyncClient, Client
from service.api.schemas import JobPublic, SearchPublic
from tests.builders import dataset_npz, mlp, save
from tests.conftest import ROOT
from tests.integration.test_serve import EXE, start, stop

pytestmark = pytest.mark.integration
QUICK = {"warmup": 1, "runs": 5, "batch_sizes": [1, 8]}


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, str, dict[str, str]]]:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MODELSHRINK_")}, "MODELSHRINK_DATA_DIR": str(tmp_path / "data"), "PYTHONPATH": str(ROOT)}
    key = subprocess.run([EXE, "keys", "create", "--tenant", "sdk"], env=env, capture_output=True, text=True, check=True).stdout.strip()
    proc, url = start(env, free_port())
    try:
        yield url, key, env
    finally:
        stop(proc)


def test_sync_and_async_clients_answer_typed_models(served, tmp_path: Path) -> None:
    url, key, _ = served
    model = mlp()
    model_path, data_path = save(model, tmp_path / "m.onnx"), tmp_path / "d.npz"
    data_path.write_bytes(dataset_npz(model))
    with Client(url, key) as client:
        uploaded, data = client.upload_model(model_path), client.upload_dataset(data_path)
        started = client.search(uploaded.id, "latency", dataset_id=data.id, methods=["quantize"], budget_minutes=5, measure=QUICK)
        assert isinstance(started, SearchPublic) and [c.recipe for c in started.candidates] == ["quantize-auto"]
        seen: list[str] = []
        final = client.wait_search(started.id, on_progress=lambda event, data: seen.append(event))
        assert final.status == "succeeded" and final.best == started.candidates[0].job_id and final.candidates[0].metrics.meets_constraint
        out = client.download(final.best, tmp_path / "best.onnx")
        onnx.checker.check_model(onnx.load(str(out)))
        with pytest.raises(ApiFailure) as missing:
            client.job("job_nope")
        assert (missing.value.status, missing.value.code) == (404, "not_found")

    async def run_async() -> tuple[JobPublic, str]:
        async with AsyncClient(url, key) as client:
            uploaded = await client.upload_model(model_path)
            job = await client.submit(uploaded.id, [{"method": "quantize", "mode": "fp16"}], measure=QUICK)
            events: list[tuple[str, dict]] = []
            done = await client.wait(job.id, on_progress=lambda event, data: events.append((event, data)))
            assert all("progress" in data for _, data in events)
            return done, await client.report_html(job.id)

    done, page = asyncio.run(run_async())
    assert isinstance(done, JobPublic) and done.status == "succeeded" and done.metrics.compression_ratio > 1.5
    assert 'class="bars"' in page


def test_cli_search_waits_prints_the_candidates_and_saves_the_best(served, tmp_path: Path) -> None:
    url, key, env = served
    model = mlp()
    model_path, data_path = save(model, tmp_path / "m.onnx"), tmp_path / "d.npz"
    data_path.write_bytes(dataset_npz(model))
    done = subprocess.run(
        [EXE, "search", str(model_path), "--objective", "size", "--dataset", str(data_path), "--method", "quantize", "--budget-minutes", "5",
         "--wait", "-o", str(tmp_path / "best.onnx")],
        env={**env, "MODELSHRINK_URL": url, "MODELSHRINK_API_KEY": key}, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "quantize-auto *" in done.stdout and "all 1 candidates finished" in done.stdout and done.stdout.strip().splitlines()[-1].startswith("srch_")
    onnx.checker.check_model(onnx.load(str(tmp_path / "best.onnx")))
    search_id = done.stdout.strip().splitlines()[-1]
    cli_env = {**env, "MODELSHRINK_URL": url, "MODELSHRINK_API_KEY": key}
    listed = subprocess.run([EXE, "searches", "list", "--json"], env=cli_env, capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0 and json.loads(listed.stdout)["data"][0]["id"] == search_id
    shown = subprocess.run([EXE, "searches", "show", search_id], env=cli_env, capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0 and "quantize-auto *" in shown.stdout and "…" not in shown.stdout  # numbers never cut


def test_cli_exit_codes_one_line_errors_and_no_second_upload(served, tmp_path: Path) -> None:
    url, key, env = served
    cli_env = {**env, "MODELSHRINK_URL": url, "MODELSHRINK_API_KEY": key}
    model_path = save(mlp(), tmp_path / "m.onnx")
    # A step the worker refuses for this model (an MLP has no attention heads): the job fails.
    bad = '{"method": "prune", "kind": "structured", "amount": 0.3, "heads": 0.5}'
    failed = subprocess.run([EXE, "submit", str(model_path), "--step", bad, "--wait"], env=cli_env, capture_output=True, text=True, timeout=300)
    assert failed.returncode == 1 and "failed" in failed.stderr, failed.stderr[-2000:]
    with Client(url, key) as client:
        jobs = client.http.get("/v1/jobs").json()["data"]
        model_id = jobs[0]["model_id"]
        # The same bytes again: the stored model, not a copy.
        assert client.upload_model(model_path).id == model_id
        assert client.http.get("/v1/models").json()["count"] == 1
    status = subprocess.run([EXE, "status", jobs[0]["id"], "--wait"], env=cli_env, capture_output=True, text=True, timeout=60)
    assert status.returncode == 1 and "failed" in status.stdout
    reused = subprocess.run([EXE, "submit", "--model-id", model_id, "--step", '{"method": "quantize", "mode": "fp16"}', "--wait",
                             "-o", str(tmp_path / "fp16.onnx")], env=cli_env, capture_output=True, text=True, timeout=300)
    assert reused.returncode == 0, reused.stderr[-2000:]
    onnx.checker.check_model(onnx.load(str(tmp_path / "fp16.onnx")))
    # No server there: one line that says what to do, exit code 3, no traceback.
    closed = f"http://127.0.0.1:{free_port()}"
    unreachable = subprocess.run([EXE, "status", "job_x"], env={**cli_env, "MODELSHRINK_URL": closed}, capture_output=True, text=True, timeout=60)
    assert unreachable.returncode == 3 and "Traceback" not in unreachable.stderr, unreachable.stderr
    assert f"cannot reach {closed}" in unreachable.stderr and "modelshrink serve" in unreachable.stderr and "MODELSHRINK_URL" in unreachable.stderr
