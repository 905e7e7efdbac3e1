"""/v1/models: upload, list, show and delete models."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

from fastapi import APIRouter, Query, Request, Response
from sqlalchemy import func, select

from service.api.deps import CurrentTenant, SessionDep, SettingsDep, StoreDep
from starlette.concurrency import run_in_threadpool

from service.api.routes.uploads_common import accept_upload, commit_within_quota, move_into_store, multipart_body
from service.api.schemas import AUTH_RESPONSES, INVALID_RESPONSE, ITEM_RESPONSES, MAX_OFFSET, ErrorResponse, ModelPublic, ModelsPublic
from service.core.artifacts import sha256_of
from service.core.errors import Conflict, NotFound
from service.core.uploads import ReceivedUpload
from service.core.onnx_probe import probe_onnx
from service.core.tables import Job, StoredModel, new_id

router = APIRouter(prefix="/v1/models", tags=["models"], responses=AUTH_RESPONSES)


def _adopt_checked_file(upload: ReceivedUpload, checked: Path) -> ReceivedUpload:
    """A zipped model with external data was checked and rewritten (as one file, or as a canonical
    archive when over 2 GB): store that instead of the upload."""
    upload.path.unlink(missing_ok=True)
    return replace(upload, path=checked, size_bytes=checked.stat().st_size, sha256=sha256_of(checked))


def owned_model(session, tenant_id: str, model_id: str) -> StoredModel:
    model = session.get(StoredModel, model_id)
    if model is None or model.tenant_id != tenant_id:
        raise NotFound(f"model {model_id} not found")
    return model


@router.post("", status_code=201, response_model=ModelPublic, responses={200: {"model": ModelPublic, "description": "The same bytes were uploaded before: the stored model."}, 422: INVALID_RESPONSE, 503: {"model": ErrorResponse}, 507: {"model": ErrorResponse}}, openapi_extra=multipart_body("An ONNX model: one .onnx file, or a .zip of one .onnx with its external data files (what torch.onnx.export writes by default); or a .zip of a Hugging Face causal-LM folder (config.json, *.safetensors, tokenizer files)."))
async def upload_model(request: Request, response: Response, session: SessionDep, tenant: CurrentTenant, settings: SettingsDep, store: StoreDep) -> StoredModel:
    """Upload an ONNX model (multipart field `file`): a single .onnx, or a .zip holding one .onnx and
    its external data files (stored as one file, or over 2 GB as a canonical .zip of `model.onnx` and its data). It is checked with onnx.checker and loaded and
    run in ONNX Runtime in a sandboxed child process before it is accepted. A .zip of a Hugging Face
    causal-LM folder (`config.json`, one or sharded `*.safetensors`, tokenizer files) is stored as
    format `hf_causal_lm`, checked from its headers without loading the weights (pickles, code files
    and remote code refused); `llm` describes it. The same bytes uploaded
    again by the same tenant answer 200 with the model already stored (no second copy)."""

    def same_as(sha256: str) -> StoredModel | None:
        return session.scalars(select(StoredModel).where(StoredModel.tenant_id == tenant.id, StoredModel.sha256 == sha256).limit(1)).first()

    def check(path, _filename):
        return probe_onnx(path, timeout_s=settings.probe_timeout_s, memory_bytes=settings.probe_memory_bytes,
                          max_unpacked_bytes=settings.max_upload_bytes, single_file_limit=settings.single_file_limit_bytes)

    upload, info = await accept_upload(request, session, tenant.id, settings, store, check, same_as)
    if "existing" in info:
        response.status_code = 200
        return info["existing"]
    bundle_dir = None
    if info.get("stored_file"):
        checked = Path(info.pop("stored_file"))
        upload, bundle_dir = await run_in_threadpool(_adopt_checked_file, upload, checked), checked.parent
    model_id = new_id("mdl")
    if "llm" in info:  # a Hugging Face checkpoint: stored as uploaded (checked, never unpacked here)
        key = f"models/{tenant.id}/{model_id}/checkpoint.zip"
        move_into_store(upload, store, key)
        model = StoredModel(id=model_id, tenant_id=tenant.id, name=upload.fields.get("name") or upload.filename, format="hf_causal_lm",
                            size_bytes=upload.size_bytes, sha256=upload.sha256, artifact_key=key, inputs=[], outputs=[],
                            parameters=info["llm"]["parameters"], opset=None, llm=info["llm"])
        await run_in_threadpool(commit_within_quota, session, model, settings, store, key)
        return model
    # Over 2 GB a model keeps its external data: stored (and served) as model.zip.
    key = f"models/{tenant.id}/{model_id}/{'model.zip' if info.pop('external_data', False) else 'model.onnx'}"
    move_into_store(upload, store, key)
    if bundle_dir is not None:
        shutil.rmtree(bundle_dir, ignore_errors=True)
    model = StoredModel(
        id=model_id,
        tenant_id=tenant.id,
        name=upload.fields.get("name") or upload.filename,
        format="onnx_zip" if key.endswith(".zip") else "onnx",
        size_bytes=upload.size_bytes,
        sha256=upload.sha256,
        artifact_key=key,
        inputs=info["inputs"],
        outputs=info["outputs"],
        parameters=info["parameters"],
        opset=info["opset"],
    )
    await run_in_threadpool(commit_within_quota, session, model, settings, store, key)
    return model


@router.get("", response_model=ModelsPublic)
def list_models(session: SessionDep, tenant: CurrentTenant, limit: int = Query(100, ge=1, le=1000), offset: int = Query(0, ge=0, le=MAX_OFFSET)) -> dict:
    where = StoredModel.tenant_id == tenant.id
    rows = session.scalars(select(StoredModel).where(where).order_by(StoredModel.created_at.desc()).limit(limit).offset(offset)).all()
    return {"data": rows, "count": session.scalar(select(func.count()).select_from(StoredModel).where(where))}


@router.get("/{model_id}", responses=ITEM_RESPONSES, response_model=ModelPublic)
def get_model(model_id: str, session: SessionDep, tenant: CurrentTenant) -> StoredModel:
    return owned_model(session, tenant.id, model_id)


@router.delete("/{model_id}", responses={**ITEM_RESPONSES, 409: {"model": ErrorResponse, "description": "The model is used by a queued or running job (`conflict`)."}}, status_code=204)
def delete_model(model_id: str, session: SessionDep, tenant: CurrentTenant, store: StoreDep) -> Response:
    model = owned_model(session, tenant.id, model_id)
    # A model is in use as a job's input or as a model one of its steps refers to (a distillation student).
    active_jobs = session.execute(
        select(Job.model_id, Job.steps).where(Job.tenant_id == tenant.id, Job.status.in_(("queued", "running")))
    ).all()
    active = sum(1 for input_id, steps in active_jobs if input_id == model_id or any(s.get("student_model_id") == model_id for s in steps or []))
    if active:
        raise Conflict(f"model {model_id} is used by {active} queued or running job(s); cancel them first")
    session.delete(model)
    session.commit()
    store.delete_prefix(f"models/{tenant.id}/{model_id}")
    return Response(status_code=204)
