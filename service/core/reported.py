"""The base of everything a job reports (metrics, measurements, step reports): tolerant when read,
strict when checked as written.

Stored reports must stay readable when a field is added later, so undeclared keys are kept
(extra="allow"). Validated with the STRICT context, an undeclared key raises instead: the tests
that run every method on real exports validate so, and a misspelt key fails them."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationInfo, model_validator

STRICT: dict[str, Any] = {"strict_keys": True}


class Reported(BaseModel):
    model_config = ConfigDict(extra="allow")

    @model_validator(mode="after")
    def _declared_keys_only_when_strict(self, info: ValidationInfo) -> Reported:
        if info.context and info.context.get("strict_keys") and self.model_extra:
            raise ValueError(f"{type(self).__name__} has keys its schema does not declare: {sorted(self.model_extra)}")
        return self
