"""Domain errors. Each carries its HTTP status; the API renders every one of them as
`{"error": <code>, "detail": <message>}` in one handler (api/errors.py)."""
from __future__ import annotations


class SlimlineError(Exception):
    status: int = 500
    code: str = "InternalError"

    def __init__(self, detail: str, *, retry_after: float | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        # seconds; rendered as a `Retry-After` header (429 and 503 answers)
        self.retry_after = retry_after

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if "code" not in cls.__dict__:
            cls.code = cls.__name__


class BadRequest(SlimlineError):
    status = 400


class Unauthorized(SlimlineError):
    status = 401


class NotFound(SlimlineError):
    status = 404


class Conflict(SlimlineError):
    status = 409


class PayloadTooLarge(SlimlineError):
    status = 413


class UnsupportedMediaType(SlimlineError):
    status = 415


class Unprocessable(SlimlineError):
    status = 422


class Unavailable(SlimlineError):
    status = 503


class InvalidCheckpoint(Unprocessable):
    pass


class InvalidDataset(Unprocessable):
    pass


class InvalidSpec(Unprocessable):
    pass


class UnsupportedFormat(UnsupportedMediaType):
    pass


class UploadTooLarge(PayloadTooLarge):
    pass


class JobNotCancelable(Conflict):
    pass


class JobNotSearch(Conflict):
    """Trials asked of a job that is not an auto-compress search."""


class IdempotencyConflict(Conflict):
    pass


class InvalidTransition(Conflict):
    pass


class BrokerUnavailable(Unavailable):
    pass


class DatabaseUnavailable(Unavailable):
    pass


class Overloaded(Unavailable):
    pass


class QuotaExceeded(SlimlineError):
    status = 429
