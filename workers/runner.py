"""One delivery of a job: take its lease, keep it alive, run the pipeline, record the outcome.

A delivery that finds the job already ended does nothing; one that finds another live worker
holding the lease asks to be retried after that lease would expire; one that finds an expired lease
(the previous worker died) takes over, counting the attempt, and gives up after max_attempts.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from service.core.artifacts import ArtifactStore
from service.core.db import session_scope
from service.core.errors import JobCancelled, JobFailure, ModelshrinkError
from service.core.events import publish
from service.core.jobstore import finish, renew_lease, set_progress, take_lease
from service.core.settings import Settings
from service.core.tables import StoredDataset, StoredModel
from workers.pipeline import JobInput, run_pipeline

log = logging.getLogger(__name__)


class LeaseLost(Exception):
    """Another worker took the job over (our heartbeats stopped reaching the database)."""


@dataclass
class Outcome:
    finished: bool = False
    retry_after_s: float | None = None


class _Heartbeat(threading.Thread):
    def __init__(self, settings: Settings, job_id: str, owner: str) -> None:
        super().__init__(daemon=True, name=f"lease-{job_id}")
        self.settings, self.job_id, self.owner = settings, job_id, owner
        self.stop_event = threading.Event()
        self.lost = False

    def run(self) -> None:
        interval = max(0.2, self.settings.lease_ttl_s / 3)
        while not self.stop_event.wait(interval):
            try:
                with session_scope(self.settings.resolved_database_url) as session:
                    if not renew_lease(session, self.job_id, self.owner, self.settings.lease_ttl_s):
                        self.lost = True
                        return
            except Exception:  # a database blip: keep trying until the lease would expire
                log.warning("lease renewal failed for %s", self.job_id, exc_info=True)


def _job_input(session, job) -> JobInput:  # noqa: ANN001
    def row(model_cls, id_):  # noqa: ANN001, ANN202
        if id_ is None:
            return None
        obj = session.get(model_cls, id_)
        if obj is None:
            raise JobFailure(f"{model_cls.__tablename__[:-1]} {id_} was deleted before the job ran", code="input_deleted")
        return obj

    model = row(StoredModel, job.model_id)
    dataset, eval_ds = row(StoredDataset, job.dataset_id), row(StoredDataset, job.eval_dataset_id)
    as_ds = lambda d: d and {"artifact_key": d.artifact_key, "arrays": d.arrays}  # noqa: E731
    referenced = {}
    for step in job.steps:
        other_id = step.get("student_model_id")
        if other_id:
            other = row(StoredModel, other_id)
            if other.tenant_id != job.tenant_id:  # never another tenant's model, whatever the row says
                raise JobFailure(f"model {other_id} was deleted before the job ran", code="input_deleted")
            referenced[other_id] = other.artifact_key
    return JobInput(
        job_id=job.id,
        tenant_id=job.tenant_id,
        model={"artifact_key": model.artifact_key, "inputs": model.inputs, "outputs": model.outputs, "name": model.name},
        dataset=as_ds(dataset),
        eval_dataset=as_ds(eval_ds),
        steps=job.steps,
        options=job.options or {},
        referenced_models=referenced,
    )


def run_job(job_id: str, settings: Settings) -> Outcome:
    url = settings.resolved_database_url
    owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    with session_scope(url) as session:
        lease = take_lease(session, job_id, owner, settings.lease_ttl_s)
        job = lease.job
        if job is None:
            return Outcome()
        if not lease.acquired:
            if job.status == "queued" and job.cancel_requested:
                finish(session, job_id, "cancelled", error={"code": "cancelled", "message": "cancelled by the user before it started"})
                return Outcome(finished=True)
            return Outcome(retry_after_s=lease.retry_after_s or None)
        if job.attempts > settings.max_attempts:
            finish(
                session, job_id, "failed", owner=owner,
                error={"code": "worker_lost", "message": f"the worker running this job stopped {job.attempts - 1} times "
                       "(it may have run out of memory); the job was not retried again"},
            )
            return Outcome(finished=True)
        try:
            job_input = _job_input(session, job)
        except JobFailure as exc:
            finish(session, job_id, "failed", owner=owner, error=exc.as_dict())
            return Outcome(finished=True)

    heartbeat = _Heartbeat(settings, job_id, owner)
    heartbeat.start()
    last_write, last_publish = [0.0], [0.0]

    def progress(fraction: float, step: str | None, message: str, milestone: bool = False) -> None:
        if heartbeat.lost:
            raise LeaseLost()
        state = {"fraction": round(fraction, 4), "step": step, "message": message}
        now = time.monotonic()
        if milestone or now - last_publish[0] >= 0.05:
            last_publish[0] = now
            publish(settings, job_id, {"status": "running", "progress": state})
        if not milestone and now - last_write[0] < 0.25:
            return  # thin out database writes; cancellation is still seen within a quarter second
        last_write[0] = now
        with session_scope(url) as s:
            if set_progress(s, job_id, owner, state):
                raise JobCancelled("cancelled by the user")

    work_dir = Path(tempfile.mkdtemp(prefix=f"modelshrink-{job_id}-"))
    store = ArtifactStore(settings.resolved_artifact_dir)
    status, fields = "failed", {}
    try:
        metrics, artifacts = run_pipeline(job_input, store, settings, work_dir, progress)
        status = "succeeded"
        fields = {"metrics": metrics, "artifacts": artifacts, "progress": {"fraction": 1.0, "step": None, "message": "done"}}
    except LeaseLost:
        log.warning("lost the lease on %s; another worker has taken it over", job_id)
        return Outcome()
    except JobCancelled as exc:
        status, fields = "cancelled", {"error": exc.as_dict(), "progress": {"fraction": 0.0, "step": None, "message": "cancelled"}}
    except ModelshrinkError as exc:
        fields = {"error": exc.as_dict()}
    except MemoryError:
        fields = {"error": {"code": "out_of_memory", "message": "the worker ran out of memory running this job"}}
    except Exception:
        log.exception("job %s failed unexpectedly", job_id)
        fields = {"error": {"code": "internal_error", "message": f"an unexpected error stopped the job; the operator's worker log has the details (job {job_id})"}}
    finally:
        heartbeat.stop_event.set()
        shutil.rmtree(work_dir, ignore_errors=True)
    with session_scope(url) as session:
        finished = finish(session, job_id, status, owner=owner, **fields)
    publish(settings, job_id, {"status": status, "progress": fields.get("progress") or {"fraction": 0.0, "step": None, "message": status}})
    return Outcome(finished=finished)
