"""/v1/datasets: upload, list, show and delete datasets (.npz arrays, or text for LLM checkpoints)."""

from __future__ import annotations

from fastapi import APIRouter, Query, Request, Response
from sqlalchemy import func, or_, select

from service.api.deps import CurrentTenant, SessionDep, SettingsDep, StoreDep
from starlette.concurrency import run_in_threadpool

from service.api.routes.uploads_common import accept_upload, commit_within_quota, move_into_store, multipart_body
from service.api.schemas import AUTH_RESPONSES, INVALID_RESPONSE, ITEM_RESPONSES, MAX_OFFSET, ErrorResponse, DatasetPublic, DatasetsPublic
from service.core.datasets import inspect_npz
from service.core.text_datasets import inspect_text, is_text_upload
from service.core.errors import Conflict, NotFound
from service.core.tables import Job, StoredDataset, new_id

router = APIRouter(prefix="/v1/datasets", tags=["datasets"], responses=AUTH_RESPONSES)

NPZ_HELP = (
    "A .npz file (numpy.savez): one array per model input, named after the input (any name for a "
    "single-input model), samples on axis 0; optional 1-D integer `labels`. For LLM checkpoints: "
    "UTF-8 text, a .txt (documents separated by blank lines) or a .jsonl (a `text` field per line)."
)


def owned_dataset(session, tenant_id: str, dataset_id: str) -> StoredDataset:
    dataset = session.get(StoredDataset, dataset_id)
    if dataset is None or dataset.tenant_id != tenant_id:
        raise NotFound(f"dataset {dataset_id} not found")
    return dataset


@router.post("", status_code=201, response_model=DatasetPublic, responses={422: INVALID_RESPONSE, 503: {"model": ErrorResponse}, 507: {"model": ErrorResponse}}, openapi_extra=multipart_body(NPZ_HELP))
async def upload_dataset(request: Request, session: SessionDep, tenant: CurrentTenant, settings: SettingsDep, store: StoreDep) -> StoredDataset:
    """Upload a dataset. It is never unpickled; sizes are checked from headers before decompressing."""

    def check(path, filename):
        if is_text_upload(filename, path):
            return inspect_text(path, filename)
        return inspect_npz(path, max_members=settings.max_dataset_members, max_decompressed_bytes=settings.max_dataset_decompressed_bytes)

    upload, info = await accept_upload(request, session, tenant.id, settings, store, check)
    dataset_id = new_id("ds")
    suffix = ".jsonl" if upload.filename.lower().endswith(".jsonl") else ".txt" if info.get("kind") == "text" else ".npz"
    key = f"datasets/{tenant.id}/{dataset_id}/data{suffix}"
    move_into_store(upload, store, key)
    dataset = StoredDataset(
        id=dataset_id,
        tenant_id=tenant.id,
        name=upload.fields.get("name") or upload.filename,
        size_bytes=upload.size_bytes,
        sha256=upload.sha256,
        artifact_key=key,
        **info,
    )
    await run_in_threadpool(commit_within_quota, session, dataset, settings, store, key)
    return dataset


@router.get("", response_model=DatasetsPublic)
def list_datasets(session: SessionDep, tenant: CurrentTenant, limit: int = Query(100, ge=1, le=1000), offset: int = Query(0, ge=0, le=MAX_OFFSET)) -> dict:
    where = StoredDataset.tenant_id == tenant.id
    rows = session.scalars(select(StoredDataset).where(where).order_by(StoredDataset.created_at.desc()).limit(limit).offset(offset)).all()
    return {"data": rows, "count": session.scalar(select(func.count()).select_from(StoredDataset).where(where))}


@router.get("/{dataset_id}", responses=ITEM_RESPONSES, response_model=DatasetPublic)
def get_dataset(dataset_id: str, session: SessionDep, tenant: CurrentTenant) -> StoredDataset:
    return owned_dataset(session, tenant.id, dataset_id)


@router.delete("/{dataset_id}", responses=ITEM_RESPONSES, status_code=204)
def delete_dataset(dataset_id: str, session: SessionDep, tenant: CurrentTenant, store: StoreDep) -> Response:
    dataset = owned_dataset(session, tenant.id, dataset_id)
    active = session.scalar(
        select(func.count()).select_from(Job).where(
            or_(Job.dataset_id == dataset_id, Job.eval_dataset_id == dataset_id), Job.status.in_(("queued", "running"))
        )
    )
    if active:
        raise Conflict(f"dataset {dataset_id} is used by {active} queued or running job(s); cancel them first")
    session.delete(dataset)
    session.commit()
    store.delete_prefix(f"datasets/{tenant.id}/{dataset_id}")
    return Response(status_code=204)
