"""Moves a search forward: creates its candidates as jobs, promotes the promising ones to the next
rung, enforces the budget, cancels, and records the outcome.

`advance` is idempotent and safe to call from anywhere at any time: the API (create, cancel), a
worker when one of the search's jobs ends, and the reconciler's periodic pass (which also catches a
deadline passing with nothing running). Each call reads the search and its jobs and commits its
decision with the new jobs in one transaction guarded by the search's version, so two callers racing
cannot both create the next rung. Candidates are ordinary jobs: fair dispatch hands them to every
worker, a lost worker's candidate is redelivered like any job, and each is visible in /v1/jobs.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from service.core.db import rowcount, session_scope
from service.core.dispatch import dispatch
from service.core.events import publish
from service.core.jobstore import request_cancel
from service.core.queue import enqueue_webhook
from service.core.job_metrics import JobMetrics
from service.core.quota import active_jobs, lock_tenant
from service.core.search_plan import LAST_RUNG, Recipe, recipes, steps_at_rung
from service.core.search_select import Point, best, closest, point, promote
from service.core.settings import Settings
from service.core.specs import MeasureSpec
from service.core.tables import TERMINAL_STATUSES, Job, Search, new_id, utcnow

log = logging.getLogger(__name__)
# A rung whose candidates would have less than this left of the budget is not started.
MIN_RUNG_SECONDS = 30.0


@dataclass
class Decision:
    values: dict[str, Any] = field(default_factory=dict)
    new_jobs: list[Job] = field(default_factory=list)
    cancel: list[str] = field(default_factory=list)


def constraint_of(request: dict[str, Any]) -> dict[str, float | None]:
    return {"max_accuracy_drop": request.get("max_accuracy_drop"), "min_fidelity": request.get("min_fidelity"),
            "max_perplexity_increase": request.get("max_perplexity_increase")}


def search_recipes(search: Search) -> list[Recipe]:
    request = search.request
    target: dict[str, float] = {}
    if request.get("min_fidelity") is not None:
        target["min_cosine"] = request["min_fidelity"]
    if request.get("max_accuracy_drop") is not None:
        target["max_accuracy_drop"] = request["max_accuracy_drop"]
    if request.get("max_perplexity_increase") is not None:
        target["max_perplexity_increase"] = request["max_perplexity_increase"]
    return recipes(request["objective"], search.facts, target, request.get("seed", 0), request.get("methods"))


def points_of(search: Search, jobs: list[Job]) -> list[Point]:
    constraint = constraint_of(search.request)
    found = []
    for job in jobs:
        if job.status == "succeeded" and job.metrics:
            info = (job.options or {}).get("search") or {}
            found.append(point(job.id, info.get("recipe", "?"), int(info.get("rung", 0)), JobMetrics.model_validate(job.metrics), constraint))
    return found


def _candidate(search: Search, recipe: Recipe, rung: int, time_left_s: float, settings: Settings) -> Job:
    # Rounded up (and a second over): a candidate stopped by its limit ends after the deadline, so the
    # search then reports the budget as why it ended.
    limit = int(math.ceil(max(1.0, min(time_left_s + 1.0, settings.job_time_limit_s))))
    return Job(
        id=new_id("job"),
        tenant_id=search.tenant_id,
        model_id=search.model_id,
        dataset_id=search.dataset_id,
        eval_dataset_id=search.eval_dataset_id,
        search_id=search.id,
        steps=steps_at_rung(recipe, rung),
        options={
            "measure": search.request.get("measure") or MeasureSpec().model_dump(mode="json"),
            # A candidate never outlives its search's budget.
            "limits": {"time_limit_s": limit, "memory_limit_mb": None},
            "search": {"id": search.id, "recipe": recipe.name, "rung": rung},
        },
        webhook_url=None,
    )


def _progress(search: Search, jobs: list[Job], rung: int, planned: int) -> dict[str, Any]:
    ended = sum(1 for j in jobs if j.status in TERMINAL_STATUSES)
    return {
        "fraction": round(min(1.0, ended / planned), 4) if planned else 0.0,
        "step": f"rung {rung + 1} of {LAST_RUNG + 1}",
        "message": f"{ended} of {len(jobs)} candidates finished" if jobs else "planning",
    }


def _finish(search: Search, jobs: list[Job], status: str | None, reason: str) -> dict[str, Any]:
    """The values that end a search: succeeded with a best, else failed with the closest candidates."""
    points = points_of(search, jobs)
    chosen = best(points, search.request["objective"])
    result = {"reason": reason, "best": chosen.job_id if chosen else None, "closest": [p.job_id for p in closest(points)] if chosen is None else []}
    error = None
    if status is None:
        status = "succeeded" if chosen else "failed"
        if chosen is None:
            near = closest(points)
            detail = "; ".join(f"{p.recipe} (job {p.job_id}): violation {p.violation:.4g}" for p in near) or "no candidate finished"
            error = {"code": "search_target_missed", "message": f"no candidate met the constraint ({reason}); closest: {detail}"}
    elif status == "cancelled":
        error = {"code": "cancelled", "message": "cancelled by the user"}
    return {"status": status, "result": result, "error": error, "finished_at": utcnow(),
            "progress": {"fraction": 1.0, "step": None, "message": reason}}


def decide(search: Search, jobs: list[Job], settings: Settings) -> Decision:
    now = utcnow()
    active = [j.id for j in jobs if j.status not in TERMINAL_STATUSES]
    time_left = (search.deadline_at - now).total_seconds()
    plan = search_recipes(search)
    if search.cancel_requested:
        return Decision(_finish(search, jobs, "cancelled", f"cancelled with {len(jobs) - len(active)} of {len(jobs)} candidates finished"), cancel=active)
    if not jobs:
        if not plan:
            return Decision(_finish(search, jobs, "failed", "no recipe uses only the allowed methods") | {
                "error": {"code": "search_no_candidates", "message": "no recipe uses only the methods in `methods`"}})
        new = [_candidate(search, r, 0, time_left, settings) for r in plan]
        planned = len(new) + math.ceil(sum(r.trainable for r in plan) / 2)
        return Decision({"progress": _progress(search, new, 0, planned), "result": {"planned": planned}}, new_jobs=new)
    planned = int(search.result.get("planned", len(jobs)))
    if time_left <= 0:
        budget = f"budget of {search.request['budget_minutes']} minutes reached"
        return Decision(_finish(search, jobs, None, budget + (f"; {len(active)} unfinished candidates cancelled" if active else "")), cancel=active)
    new = _promotions(search, jobs, plan, bool(active), time_left, settings)
    if new:
        planned = max(planned, len(jobs) + len(new))
        return Decision({"rung": LAST_RUNG, "progress": _progress(search, jobs + new, LAST_RUNG, planned), "result": {"planned": planned}}, new_jobs=new)
    if active:
        return Decision({"progress": _progress(search, jobs, search.rung, planned)})
    return Decision(_finish(search, jobs, None, f"all {len(jobs)} candidates finished"))


def _promotions(search: Search, jobs: list[Job], plan: list[Recipe], running: bool, time_left: float, settings: Settings) -> list[Job]:
    """Asynchronous successive halving: a first-rung candidate is promoted as soon as it qualifies
    (service.core.search_select.promote), not when its whole rung has ended, so workers never idle
    behind the slowest candidate. While the first rung still runs, only against a feasible incumbent:
    without one, a later candidate may still show the miss is hopeless."""
    if time_left < MIN_RUNG_SECONDS:
        return []
    trainable = {r.name for r in plan if r.trainable}
    info = [(j.options or {}).get("search", {}) for j in jobs]
    first_rung = sum(1 for i in info if i.get("rung", 0) == 0 and i.get("recipe") in trainable)
    promoted = {i.get("recipe") for i in info if i.get("rung", 0) > 0}
    room = math.ceil(first_rung / 2) - len(promoted)
    points = points_of(search, jobs)
    if room <= 0 or (running and best(points, search.request["objective"]) is None):
        return []
    chosen = promote(points, trainable - promoted, search.request["objective"], room)
    by_name = {r.name: r for r in plan}
    return [_candidate(search, by_name[p.recipe], LAST_RUNG, time_left, settings) for p in chosen]


def _within_job_quota(session: Session, tenant_id: str, promoted: list[Job], settings: Settings) -> list[Job]:
    """Promotions count against the tenant's active-job quota like any submission, checked under the
    tenant's lock with the insert; those without room are not started (the search ends on what it has)."""
    lock_tenant(session, tenant_id)
    room = max(0, settings.tenant_max_active_jobs - active_jobs(session, tenant_id))
    if room < len(promoted):
        log.info("search promotions: %d of %d started, the tenant's active-job quota (%d) is reached", room, len(promoted), settings.tenant_max_active_jobs)
    return promoted[:room]


def advance(settings: Settings, search_id: str) -> str | None:
    """Take the search one decision forward; returns its status afterwards (None if it does not exist)."""
    url = settings.resolved_database_url
    for _ in range(10):
        with session_scope(url) as session:
            search = session.get(Search, search_id)
            if search is None:
                return None
            if search.status in TERMINAL_STATUSES:
                return search.status
            jobs = list(session.scalars(select(Job).where(Job.search_id == search_id).order_by(Job.created_at, Job.id)).all())
            decision = decide(search, jobs, settings)
            won = rowcount(session.execute(
                update(Search).where(Search.id == search_id, Search.version == search.version)
                .values(version=search.version + 1, **decision.values).execution_options(synchronize_session=False)
            ))
            if not won:
                session.rollback()
                continue
            if decision.new_jobs and jobs:
                decision.new_jobs = _within_job_quota(session, search.tenant_id, decision.new_jobs, settings)
            session.add_all(decision.new_jobs)
            session.commit()
            tenant_id, status, webhook = search.tenant_id, str(decision.values.get("status", search.status)), search.webhook_url
            progress = decision.values.get("progress", search.progress)
        break
    else:
        log.warning("search %s: gave up advancing after repeated conflicts; the reconciler retries", search_id)
        return None
    for job_id in decision.cancel:
        with session_scope(url) as session:
            job = session.get(Job, job_id)
            if job is not None and job.status not in TERMINAL_STATUSES:
                publish(settings, job_id, {"status": request_cancel(session, job), "progress": job.progress or {}})
    publish(settings, search_id, {"status": status, "progress": progress})
    if decision.new_jobs or decision.cancel:
        dispatch(settings, tenant_id)
    if status in TERMINAL_STATUSES and webhook:
        try:
            enqueue_webhook(settings, search_id)
        except Exception:  # the search's outcome is recorded; a lost notification must not undo it
            log.warning("search %s: webhook not queued", search_id, exc_info=True)
    return status


def active_searches(settings: Settings, limit: int = 500) -> list[str]:
    with session_scope(settings.resolved_database_url) as session:
        return list(session.scalars(select(Search.id).where(Search.status.not_in(tuple(TERMINAL_STATUSES))).limit(limit)).all())
