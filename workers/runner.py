"""One delivery of a job: take its lease, keep it alive, run the job in a child process it watches,
record the outcome.

A delivery that finds the job already ended does nothing; one that finds another live worker
holding the lease asks to be retried after that lease would expire; one that finds an expired lease
(the previous worker died) takes over, counting the attempt, and gives up after max_attempts. A
delivery that finds a cancelled job whose worker died ends it as cancelled.

The job itself runs in `workers.job_process`, so its memory (resident set of the whole process tree)
and wall-clock time are limited from outside and a cancel stops it even inside a long ONNX Runtime
call: the child is killed, the job ends with `resource_limit`, `timed_out` or `cancelled`, and this
Celery worker takes the next job.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from service.core.db import session_scope
from service.core.errors import JobFailure
from service.core.events import publish
from service.core.jobstore import cancel_requested, finish, renew_lease, take_lease
from workers.presence import job_threads
from service.core.settings import Settings
from service.core.specs import step_adapter
from service.core.tables import StoredDataset, StoredModel
from workers.job_process import RESULT_FILE
from workers.job_input import JobInput

log = logging.getLogger(__name__)
WATCH_INTERVAL_S = 0.05
CANCEL_POLL_S = 1.0


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


def _job_input(session, job) -> JobInput:
    def row(model_cls, id_):
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
    for other_id in {i for step in job.steps for i in step_adapter.validate_python(step).referenced_models()}:
        if other_id:
            other = row(StoredModel, other_id)
            if other.tenant_id != job.tenant_id:  # never another tenant's model, whatever the row says
                raise JobFailure(f"model {other_id} was deleted before the job ran", code="input_deleted")
            referenced[other_id] = other.artifact_key
    return JobInput(
        job_id=job.id,
        tenant_id=job.tenant_id,
        model={"artifact_key": model.artifact_key, "inputs": model.inputs, "outputs": model.outputs, "name": model.name, "format": model.format, "llm": model.llm},
        dataset=as_ds(dataset),
        eval_dataset=as_ds(eval_ds),
        steps=job.steps,
        options=job.options or {},
        referenced_models=referenced,
    )


def run_job(job_id: str, settings: Settings, node: str | None = None) -> Outcome:
    """Run one delivery of a job; `node` is the Celery worker's name, recorded with the process id."""
    url = settings.resolved_database_url
    owner = f"{socket.gethostname()}:{os.getpid()}:{os.urandom(4).hex()}"
    worker = f"{node or socket.gethostname()} pid {os.getpid()}"
    with session_scope(url) as session:
        lease = take_lease(session, job_id, owner, settings.lease_ttl_s, worker=worker)
        job = lease.job
        if job is None:
            return Outcome()
        if not lease.acquired:
            if job.status in ("queued", "running") and job.cancel_requested and not lease.held_by_other:
                # Cancelled, and nobody holds a live lease (never started, or its worker died).
                message = "cancelled by the user" + (" before it started" if job.status == "queued" else "")
                done = finish(session, job_id, "cancelled", error={"code": "cancelled", "message": message},
                              progress={"fraction": 0.0, "step": None, "message": "cancelled"})
                publish(settings, job_id, {"status": "cancelled", "progress": {"fraction": 0.0, "step": None, "message": "cancelled"}})
                return Outcome(finished=done)
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
        limits = job_limits(job.options or {}, settings)

    heartbeat = _Heartbeat(settings, job_id, owner)
    heartbeat.start()
    work_dir = Path(tempfile.mkdtemp(prefix=f"modelshrink-{job_id}-", dir=settings.resolved_work_dir))
    try:
        status, fields = _run_in_child(job_input, owner, work_dir, limits, settings, heartbeat)
    finally:
        heartbeat.stop_event.set()
        shutil.rmtree(work_dir, ignore_errors=True)
    if status == "lease_lost":
        log.warning("lost the lease on %s; another worker has taken it over", job_id)
        return Outcome()
    with session_scope(url) as session:
        finished = finish(session, job_id, status, owner=owner, **fields)
    publish(settings, job_id, {"status": status, "progress": fields.get("progress") or {"fraction": 0.0, "step": None, "message": status}})
    return Outcome(finished=finished)


@dataclass(frozen=True)
class Limits:
    memory_bytes: int
    time_s: float


def job_limits(options: dict, settings: Settings) -> Limits:
    """The job's own limits (checked against the operator's caps at submit), else the operator's."""
    asked = options.get("limits") or {}
    memory = asked.get("memory_limit_mb")
    seconds = asked.get("time_limit_s")
    return Limits(
        memory_bytes=min(settings.job_memory_limit_bytes, memory * 1024**2) if memory else settings.job_memory_limit_bytes,
        time_s=min(settings.job_time_limit_s, float(seconds)) if seconds else settings.job_time_limit_s,
    )


def _child_setup(niceness: int) -> None:  # runs in the child before exec
    # Below the API and the worker's own loop (heartbeats, cancellation) in CPU priority: on one box
    # (`modelshrink serve`) a job's ONNX Runtime threads took the cores other tenants' requests needed.
    # Nice only matters under contention: alone on a machine, the job runs at full speed.
    if niceness:
        os.nice(niceness)
    if sys.platform.startswith("linux"):
        import ctypes

        # If this worker dies, its job process must not run on unsupervised.
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:  # exited between listing and reading
            pass
    return total


def _kill_tree(proc: subprocess.Popen) -> None:
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        children = []
    for p in [*children]:
        try:
            p.kill()
        except psutil.Error:
            pass
    proc.kill()
    proc.wait()


def _run_in_child(job: JobInput, owner: str, work_dir: Path, limits: Limits, settings: Settings, heartbeat: _Heartbeat) -> tuple[str, dict]:
    request_path = work_dir / "request.json"
    request_path.write_text(json.dumps({"job": asdict(job), "owner": owner, "work_dir": str(work_dir)}))
    # The job's working directory and TMPDIR are its work dir: whatever a library writes beside it
    # (ONNX Runtime's quantizer leaves sym_shape_infer_temp.onnx and <uuid>.data files) goes with it.
    env = {**os.environ, "TMPDIR": str(work_dir), "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parent.parent), os.environ.get("PYTHONPATH")]))}
    # Several workers on one machine must share its cores: OpenMP threads that outnumber them spin
    # against each other (two fine-tuning jobs on two cores ran 5x slower each, not 2x).
    threads = str(job_threads(settings))
    env.update({"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads})
    proc = subprocess.Popen([sys.executable, "-m", "workers.job_process", str(request_path)], cwd=work_dir, env=env, preexec_fn=functools.partial(_child_setup, settings.job_niceness))
    watched = psutil.Process(proc.pid)
    started = time.monotonic()
    cancel_seen_at: float | None = None
    next_cancel_poll = started + CANCEL_POLL_S
    verdict: tuple[str, dict] | None = None
    while proc.poll() is None:
        now = time.monotonic()
        if heartbeat.lost:
            _kill_tree(proc)
            return "lease_lost", {}
        rss = _tree_rss(watched)
        if rss > limits.memory_bytes:
            verdict = ("failed", {"error": {"code": "resource_limit", "message":
                       f"the job used more than its memory limit of {limits.memory_bytes / 1024**2:.0f} MiB "
                       f"({rss / 1024**2:.0f} MiB resident) and was stopped; use a smaller evaluation batch or dataset, or ask the operator for a higher limit"}})
        elif now - started > limits.time_s:
            verdict = ("failed", {"error": {"code": "timed_out", "message": f"the job ran longer than its time limit of {limits.time_s:.0f} s and was stopped"}})
        elif cancel_seen_at is not None and now - cancel_seen_at > settings.cancel_grace_s:
            # The job did not reach a step/epoch boundary in time (e.g. inside one long ONNX Runtime call).
            verdict = ("cancelled", {"error": {"code": "cancelled", "message": "cancelled by the user"},
                                     "progress": {"fraction": 0.0, "step": None, "message": "cancelled"}})
        if verdict is not None:
            _kill_tree(proc)
            return verdict
        if cancel_seen_at is None and now >= next_cancel_poll:
            next_cancel_poll = now + CANCEL_POLL_S
            try:
                with session_scope(settings.resolved_database_url) as session:
                    if cancel_requested(session, job.job_id):
                        cancel_seen_at = now
            except Exception:  # the database blinked; the child's own progress writes also see a cancel
                log.warning("cancel check failed for %s", job.job_id, exc_info=True)
        try:
            proc.wait(WATCH_INTERVAL_S)
        except subprocess.TimeoutExpired:
            pass
    result_path = work_dir / RESULT_FILE
    if result_path.is_file():
        outcome = json.loads(result_path.read_text())
        return outcome.pop("status"), outcome
    how = f"signal {signal.Signals(-proc.returncode).name}" if proc.returncode < 0 else f"exit status {proc.returncode}"
    code, hint = ("resource_limit", " (the system may have run out of memory)") if proc.returncode == -signal.SIGKILL else ("job_crashed", "")
    return "failed", {"error": {"code": code, "message": f"the job's process ended abruptly ({how}){hint}; the model or data may be too large or malformed"}}
