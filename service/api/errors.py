"""ServiceError -> HTTP, in each protocol's own shape: OperationOutcome under /fhir, JSON elsewhere."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.errors import ServiceError
from service.results.fhir import issue_code_for_status, operation_outcome
from service.store import db

log = logging.getLogger(__name__)

FHIR_JSON = "application/fhir+json"


RETRY_AFTER_SECONDS = 5  # told to a client whose request met a passing failure of the database or the disk


def error_response(
    request: Request,
    status: int,
    code: str,
    message: str,
    expression: list[str] | None = None,
    *,
    retry_after: int | None = None,
) -> JSONResponse:
    """The error in the shape of the request's protocol; a 503 says when to come back (``retry_after`` seconds, by
    default RETRY_AFTER_SECONDS)."""
    headers = {"WWW-Authenticate": 'Bearer realm="clinfer"'} if status == 401 else None
    if status == 503:
        headers = {"Retry-After": str(retry_after or RETRY_AFTER_SECONDS)}
    if request.url.path.startswith("/fhir"):
        body = operation_outcome(
            severity="error" if status < 500 else "fatal",
            code=issue_code_for_status(status),
            diagnostics=message,
            expression=expression,
        )
        return JSONResponse(body, status_code=status, media_type=FHIR_JSON, headers=headers)
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


def install(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        if exc.http_status >= 500:
            log.error("%s %s failed: %s", request.method, request.url.path, exc.message)
        return error_response(
            request,
            exc.http_status,
            exc.code,
            exc.message,
            exc.expression,
            retry_after=getattr(exc, "retry_after", None),  # KeySetUnavailable: when the issuer's keys are tried again
        )

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        details = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:5])
        return error_response(request, 400, "invalid", details)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(request, exc.status_code, issue_code_for_status(exc.status_code), str(exc.detail))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        if db.is_transient(exc):  # the database unreachable, a deadlock broken, the disk failing: worth a retry
            return error_response(
                request, 503, "transient", "the database or the disk failed for a moment; send the request again"
            )
        return error_response(request, 500, "internal", "internal error; see the service log")
