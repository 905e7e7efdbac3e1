"""The process one delivery of a job runs in (`python -m workers.job_process REQUEST.json`).

workers.runner spawns it per job, in the job's own work directory, and watches it from outside: a
model that allocates without bound, a ONNX Runtime call that never returns, or a cancel that the job
cannot see at a step boundary all end with the runner killing this process, while the Celery worker
(and every other tenant's queued job) carries on. It reports progress straight to the job store and
Redis, and leaves its outcome in RESULT_FILE for the runner, which alone records the final status.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

RESULT_FILE = "result.json"
log = logging.getLogger("workers.job_process")


class LeaseLost(Exception):
    """Another delivery took the job over; this one must stop without recording anything."""


def _progress_reporter(settings, job_id: str, owner: str):
    from sqlalchemy.exc import DBAPIError

    from service.core.db import session_scope
    from service.core.errors import JobCancelled
    from service.core.events import publish
    from service.core.jobstore import set_progress

    last_write, last_publish = [0.0], [0.0]

    def progress(fraction: float, step: str | None, message: str, milestone: bool = False) -> None:
        state = {"fraction": round(fraction, 4), "step": step, "message": message}
        now = time.monotonic()
        if milestone or now - last_publish[0] >= 0.05:
            last_publish[0] = now
            publish(settings, job_id, {"status": "running", "progress": state})
        if not milestone and now - last_write[0] < 0.25:
            return  # thin out database writes; cancellation is still seen within a quarter second
        last_write[0] = now
        try:
            with session_scope(settings.resolved_database_url) as session:
                verdict = set_progress(session, job_id, owner, state)
        except DBAPIError:
            # Progress is best effort: a database blip must not fail the job. The runner's lease
            # heartbeat decides whether the job is still ours.
            log.warning("progress write for %s failed", job_id, exc_info=True)
            return
        if verdict == "lost":
            raise LeaseLost()
        if verdict == "cancel":
            raise JobCancelled("cancelled by the user")

    return progress


def run(request: dict[str, Any]) -> dict[str, Any]:
    """Run the pipeline; return the outcome as {"status", ...fields} (never raises)."""
    from service.core.artifacts import open_store
    from service.core.errors import JobCancelled, ModelshrinkError
    from service.core.settings import get_settings
    from workers.job_input import JobInput
    from workers.pipeline import run_pipeline

    settings = get_settings()
    job = JobInput(**request["job"])
    work_dir = Path(request["work_dir"])
    progress = _progress_reporter(settings, job.job_id, request["owner"])
    try:
        if job.model.get("format") == "hf_causal_lm":
            from workers.llm.pipeline import run_llm_pipeline

            metrics, artifacts = run_llm_pipeline(job, open_store(settings), settings, work_dir, progress)
        else:
            metrics, artifacts = run_pipeline(job, open_store(settings), settings, work_dir, progress)
    except LeaseLost:
        return {"status": "lease_lost"}
    except JobCancelled as exc:
        return {"status": "cancelled", "error": exc.as_dict(), "progress": {"fraction": 0.0, "step": None, "message": "cancelled"}}
    except ModelshrinkError as exc:
        return {"status": "failed", "error": exc.as_dict()}
    except MemoryError:
        return {"status": "failed", "error": {"code": "resource_limit", "message": "the job ran out of memory"}}
    except Exception:
        log.exception("job %s failed unexpectedly", job.job_id)
        return {"status": "failed", "error": {"code": "internal_error",
                "message": f"an unexpected error stopped the job; the operator's worker log has the details (job {job.job_id})"}}
    return {"status": "succeeded", "metrics": metrics, "artifacts": artifacts,
            "progress": {"fraction": 1.0, "step": None, "message": "done"}}


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    request_path = Path(sys.argv[1])
    request = json.loads(request_path.read_text())
    outcome = run(request)
    target = Path(request["work_dir"]) / RESULT_FILE
    partial = target.with_suffix(".part")
    partial.write_text(json.dumps(outcome, default=str))
    os.replace(partial, target)  # the runner never reads half an outcome


if __name__ == "__main__":
    main()
