"""The FastAPI application."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response

from service import metrics
from service.api import errors
from service.api.routes import dicomweb, dicomweb_query, fhir, health, v1
from service.flows import analysis, queue
from service.flows.runtime import Runtime, build_runtime, get_runtime, set_runtime

log = logging.getLogger(__name__)
access_log = logging.getLogger("service.access")


def create_app(runtime: Runtime | None = None, *, embedded_worker: bool | None = None) -> FastAPI:
    """Build the app.

    Args:
        runtime: resources to use; built from Settings at start-up when None.
        embedded_worker: run the in-process Celery worker and sweeper; default: when no broker is configured.
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if runtime is not None:
            set_runtime(runtime)
        current = get_runtime() if runtime is not None else _build_and_install()
        run_embedded = current.settings.embedded_worker if embedded_worker is None else embedded_worker
        worker = sweeper = listener = None
        if run_embedded and current.settings.dimse_embedded:
            from service.dimse import scp

            listener = scp.start(current, block=False)
        if run_embedded:
            from service.worker.app import EmbeddedWorker, Sweeper

            worker, sweeper = EmbeddedWorker(concurrency=current.settings.worker_concurrency), Sweeper(current)
            worker.start()
            sweeper.start()
            metrics.register_gpu_metrics()  # the models run in this process: its GPUs are on this /metrics
            log.info("embedded worker started (in-memory broker)")
        events_stop = threading.Event()
        queue.subscribe_report_events(analysis.REPORT_STORED.notify, events_stop)  # reports stored by workers
        try:
            yield
        finally:
            events_stop.set()
            if listener is not None:
                listener.shutdown()
            if sweeper is not None:
                sweeper.stop()
            if worker is not None:
                worker.stop()
                current.batchers.close_all()

    app = FastAPI(
        title="clinfer",
        version="0.1.0",
        description="Clinical inference: DICOM and FHIR in; AI findings out as JSON and FHIR DiagnosticReport. "
        "Demonstration models are not for clinical use.",
        lifespan=lifespan,
    )
    errors.install(app)
    app.include_router(health.router)
    app.include_router(dicomweb.router)
    app.include_router(dicomweb_query.router)
    app.include_router(fhir.router)
    app.include_router(v1.router)

    @app.middleware("http")
    async def _measure(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        started = time.perf_counter()
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            # the route template, never the concrete path: paths carry study UIDs and patient references
            route = getattr(request.scope.get("route"), "path", "unmatched")
            elapsed = time.perf_counter() - started
            metrics.HTTP_REQUESTS.labels(route, request.method, str(status)).inc()
            metrics.HTTP_DURATION.labels(route, request.method).observe(elapsed)
            access_log.info("%s %s %d %.1fms", request.method, route, status, elapsed * 1000)

    return app


def _build_and_install() -> Runtime:
    from service.config import get_settings

    built = build_runtime(get_settings())
    set_runtime(built)
    return built
