"""Small guards: upload checks wait their turn without threads, partial uploads are swept, results with
NaN/inf outputs fail the job."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from service.api.routes.uploads_common import CheckQueue
from service.core.artifacts import ArtifactStore
from service.core.errors import CompressionFailed, ServiceUnavailable


def test_upload_checks_run_a_few_at_a_time_and_refuse_when_the_wait_is_full() -> None:
    running, peak, release = [0], [0], threading.Event()

    def check(_: Path) -> dict:
        running[0] += 1
        peak[0] = max(peak[0], running[0])
        release.wait(5)
        running[0] -= 1
        return {}

    async def scenario() -> list:
        queue = CheckQueue(slots=2, max_waiting=2)
        tasks = [asyncio.create_task(queue.run(check, Path("x"))) for _ in range(4)]
        await asyncio.sleep(0.2)  # two run, two wait
        with pytest.raises(ServiceUnavailable) as refused:
            await queue.run(check, Path("x"))
        assert refused.value.code == "check_queue_full" and refused.value.headers == {"Retry-After": "30"}
        release.set()
        return await asyncio.gather(*tasks)

    assert asyncio.run(scenario()) == [{}] * 4
    assert peak[0] == 2


def test_partial_uploads_older_than_the_cutoff_are_swept(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    old, fresh = store.temp_dir() / ".upload-old.part", store.temp_dir() / ".upload-new.part"
    old.write_bytes(b"x")
    fresh.write_bytes(b"y")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    assert store.remove_stale_uploads(older_than_s=3600) == 1
    assert not old.exists() and fresh.exists()


def test_non_finite_outputs_where_the_original_was_finite_fail_the_job() -> None:
    from workers.evaluation import Comparison
    from workers.pipeline import _refuse_non_finite

    def compared(reference: np.ndarray, candidate: np.ndarray) -> Comparison:
        result = Comparison(kind="features")
        result.add(reference, candidate, None, None)
        return result

    reference = np.ones((4, 3))
    _refuse_non_finite(compared(reference, reference * 2))  # worse, but finite: the report judges it
    broken = reference.copy()
    broken[1, 2] = np.nan
    broken[3, 0] = np.inf
    with pytest.raises(CompressionFailed) as failed:
        _refuse_non_finite(compared(reference, broken))
    assert failed.value.code == "non_finite" and "on 2 evaluation sample(s)" in failed.value.message
