"""Liveness, readiness and metrics."""

from __future__ import annotations

import datetime as dt
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.api import deps
from service.api.deps import RuntimeDep
from service.flows import queue
from service.store import db, jobs
from service.store.tables import utcnow

router = APIRouter(tags=["operations"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
def readyz(runtime: RuntimeDep) -> JSONResponse:
    checks: dict[str, Any] = {}
    try:
        db.ping(runtime.engine)
        checks["database"] = "ok"
    except Exception as e:  # readiness reports any failure, whatever its type
        checks["database"] = f"error: {type(e).__name__}"
    if runtime.settings.embedded_worker:
        checks["broker"] = "embedded"
    else:
        try:
            queue.broker_ping()
            checks["broker"] = "ok"
        except Exception as e:
            checks["broker"] = f"error: {type(e).__name__}"
    try:
        # informational: the API stays ready (it can still take studies in) while workers are stuck
        with runtime.sessions() as session:
            stalled = len(
                jobs.lost(
                    session=session,
                    older_than=utcnow() - dt.timedelta(seconds=runtime.settings.reconcile_after_seconds),
                )
            )
        checks["workers"] = "ok" if not stalled else f"{stalled} jobs not progressing (workers stopped consuming?)"
    except Exception as e:
        checks["workers"] = f"error: {type(e).__name__}"
    checks["models"] = sorted(runtime.registry.models) or "none loaded"
    if runtime.registry.errors:
        checks["model_errors"] = runtime.registry.errors
    warm = runtime.models_warm.is_set()
    checks["warm_up"] = "done" if warm else "in progress"  # the embedded worker's models, at start
    ready = (
        checks["database"] == "ok" and checks["broker"] in ("ok", "embedded") and bool(runtime.registry.models) and warm
    )
    return JSONResponse(
        {"status": "ready" if ready else "not ready", "checks": checks}, status_code=200 if ready else 503
    )


@router.get("/metrics", include_in_schema=False)
async def metrics_endpoint(request: Request, runtime: RuntimeDep) -> Response:
    if not runtime.settings.metrics_public:
        principal = await deps.authenticated(request, runtime)
        # as require() does: /metrics spans every patient's work, so patient/ scopes do not open it
        await deps.checked(request, runtime, principal, "Device", "r", patient_scopes=False)
    return Response(await run_in_threadpool(generate_latest), media_type=CONTENT_TYPE_LATEST)
