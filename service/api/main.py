"""The FastAPI application."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio.to_thread
from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import metrics
from service.api import errors
from service.api.routes import dicomweb, dicomweb_query, fhir, health, ui, v1
from service.flows import analysis, queue
from service.flows.runtime import Runtime, build_runtime, get_runtime, set_runtime

log = logging.getLogger(__name__)
access_log = logging.getLogger("service.access")


def _warm_up_in_background(runtime: Runtime) -> None:
    """The embedded worker's models loaded and warmed up (every batch size) before the first study needs them,
    as `clinfer worker` does for the infer queue: the first study paid several hundred milliseconds otherwise."""
    runtime.models_warm.clear()

    def warm() -> None:
        try:
            analysis.warm_models(runtime)
        finally:
            runtime.models_warm.set()

    threading.Thread(target=warm, name="clinfer-warm-up", daemon=True).start()


def create_app(
    runtime: Runtime | None = None, *, embedded_worker: bool | None = None, warm_up: bool | None = None
) -> FastAPI:
    """Build the app.

    Args:
        runtime: resources to use; built from Settings at start-up when None.
        embedded_worker: run the in-process Celery worker and sweeper; default: when no broker is configured.
        warm_up: with the embedded worker, load and warm every model up at start, in the background, and be not
            ready (/readyz) until done; default: when the runtime is built here (`clinfer serve`), not for a
            runtime given by the caller.
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if runtime is not None:
            set_runtime(runtime)
        current = get_runtime() if runtime is not None else _build_and_install()
        # the threads that run blocking endpoints and dependencies (anyio's default: 40 a process)
        anyio.to_thread.current_default_thread_limiter().total_tokens = current.settings.api_threads
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
            if warm_up if warm_up is not None else runtime is None:
                _warm_up_in_background(current)
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
    app.include_router(ui.router)

    app.add_middleware(_MeasureRequests)
    return app


class _MeasureRequests:
    """Counts, times and logs every HTTP request by route template (never the concrete path: paths carry study
    UIDs and patient references).

    A plain ASGI middleware: Starlette's ``BaseHTTPMiddleware`` (``@app.middleware``) runs each request through a
    task group and memory streams, a measurable CPU cost per request. The time covers the whole response, body
    included.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            method = scope["method"]
            elapsed = time.perf_counter() - started
            metrics.HTTP_REQUESTS.labels(route, method, str(status)).inc()
            metrics.HTTP_DURATION.labels(route, method).observe(elapsed)
            access_log.info("%s %s %d %.1fms", method, route, status, elapsed * 1000)


def _build_and_install() -> Runtime:
    from service.config import get_settings

    built = build_runtime(get_settings())
    set_runtime(built)
    return built
