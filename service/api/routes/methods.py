"""/v1/methods: every compression method a job step can name, with its JSON Schema."""

from __future__ import annotations

from fastapi import APIRouter

from service.api.deps import CurrentTenant
from service.api.schemas import AUTH_RESPONSES, MethodsPublic
from service.core.specs import STEP_TYPES

router = APIRouter(prefix="/v1/methods", tags=["methods"], responses=AUTH_RESPONSES)


@router.get("", response_model=MethodsPublic, response_model_by_alias=True)
def list_methods(tenant: CurrentTenant) -> dict:
    data = [
        {
            "name": spec.model_fields["method"].default,
            "description": (spec.__doc__ or "").strip(),
            "schema": spec.model_json_schema(),
        }
        for spec in STEP_TYPES
    ]
    return {"data": data, "count": len(data)}
