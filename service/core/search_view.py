"""A search as the API shows it: its candidates with their measured points, the Pareto front, the
best so far (final once the search ends) and why it ended."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.core.jobstore import aware
from service.core.search_driver import points_of
from service.core.search_plan import LAST_RUNG
from service.core.search_select import best, pareto
from service.core.tables import TERMINAL_STATUSES, Job, Search


def candidate_jobs(session: Session, search_id: str) -> list[Job]:
    return list(session.scalars(select(Job).where(Job.search_id == search_id).order_by(Job.created_at, Job.id)).all())


def live_progress(search: Search, jobs: list[Job]) -> dict[str, Any]:
    """The search's progress with its running candidates' own progress counted in: a search is
    otherwise updated only when a candidate ends, and read 0% through its whole first candidate."""
    stored: dict[str, Any] = dict(search.progress or {"fraction": 0.0, "step": None, "message": "planning"})
    planned = int((search.result or {}).get("planned") or len(jobs) or 0)
    if search.status in TERMINAL_STATUSES or not planned:
        return stored
    ended = sum(1 for j in jobs if j.status in TERMINAL_STATUSES)
    running = [j for j in jobs if j.status == "running"]
    partial = sum(float((j.progress or {}).get("fraction") or 0.0) for j in running)
    stored["fraction"] = round(min(1.0, (ended + partial) / planned), 4)
    if jobs:
        stored["message"] = f"{ended} of {len(jobs)} candidates finished, {len(running)} running"
    return stored


def search_public(search: Search, jobs: list[Job]) -> dict[str, Any]:
    points = {p.job_id: p for p in points_of(search, jobs)}
    objective = search.request["objective"]
    result = search.result or {}
    ended = search.status in TERMINAL_STATUSES
    so_far = best(list(points.values()), objective)
    chosen = result.get("best") if ended else (so_far.job_id if so_far else None)
    candidates = []
    for job in jobs:
        info = (job.options or {}).get("search") or {}
        p = points.get(job.id)
        candidates.append({
            "job_id": job.id,
            "recipe": info.get("recipe"),
            "rung": info.get("rung", 0),
            "status": job.status,
            "steps": job.steps,
            "metrics": p.public().model_dump() if p else None,
            "error": job.error,
        })
    return {
        "id": search.id,
        "status": search.status,
        "model_id": search.model_id,
        "dataset_id": search.dataset_id,
        "eval_dataset_id": search.eval_dataset_id,
        "request": search.request,
        "rungs": LAST_RUNG + 1,
        "rung": search.rung,
        "progress": live_progress(search, jobs),
        "candidates": candidates,
        "pareto": [p.job_id for p in pareto(list(points.values()))],
        "best": chosen,
        "closest": result.get("closest", []),
        "reason": result.get("reason"),
        "error": search.error,
        "cancel_requested": search.cancel_requested,
        "webhook_url": search.webhook_url,
        "deadline_at": aware(search.deadline_at),
        "created_at": aware(search.created_at),
        "finished_at": aware(search.finished_at),
    }
