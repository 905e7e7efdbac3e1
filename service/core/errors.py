"""The project's error types.

    ModelshrinkError                 base: a `code` a program can branch on and a `message` a person can act on
    +-- ApiError                     answered over HTTP with `status` and {"error": {"code", "message"}}
    |   +-- Unauthorized             401 missing/unknown API key
    |   +-- NotFound                 404 unknown id, or another tenant's id (never says which)
    |   +-- Conflict                 409 e.g. a job that already ended cannot be cancelled
    |   +-- PayloadTooLarge          413 an upload over the configured byte limit
    |   +-- InvalidInput             422 a bad model, dataset or job spec
    |   +-- QuotaExceeded            429 a tenant's queued/running jobs at their cap
    |   +-- StorageQuotaExceeded     507 a tenant's stored models and datasets at their cap
    |   +-- ServiceUnavailable       503 a dependency (broker, database) is unreachable
    +-- JobFailure                   ends a job as failed with {"code", "message"}
        +-- CompressionFailed        a method (or the library under it) could not do its work
        +-- JobCancelled             the user cancelled; raised at a step/epoch boundary

Messages never carry a stack trace, a host path or another tenant's id.
"""

from __future__ import annotations


class ModelshrinkError(Exception):
    code = "internal_error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def as_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


class ApiError(ModelshrinkError):
    status = 500

    def __init__(self, message: str, *, code: str | None = None, retry_after_s: int | None = None) -> None:
        super().__init__(message, code=code)
        self.headers = {"Retry-After": str(retry_after_s)} if retry_after_s else None


class Unauthorized(ApiError):
    status = 401
    code = "unauthorized"


class NotFound(ApiError):
    status = 404
    code = "not_found"


class Conflict(ApiError):
    status = 409
    code = "conflict"


class PayloadTooLarge(ApiError):
    status = 413
    code = "payload_too_large"


class InvalidInput(ApiError):
    status = 422
    code = "invalid_input"


class QuotaExceeded(ApiError):
    status = 429
    code = "quota_exceeded"


class StorageQuotaExceeded(ApiError):
    status = 507
    code = "storage_quota_exceeded"


class ServiceUnavailable(ApiError):
    status = 503
    code = "service_unavailable"


class JobFailure(ModelshrinkError):
    code = "job_failed"


class CompressionFailed(JobFailure):
    code = "compression_failed"


class JobCancelled(JobFailure):
    code = "cancelled"
