"""The process's long-lived resources, built once from Settings: database, blobs, models, task queue."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from service.config import Settings, get_settings
from service.inference.batcher import BatcherPool
from service.inference.manifest import Manifest
from service.inference.registry import ModelRegistry
from service.routing.rules import RoutingTable, build_table
from service.store import db
from service.store.blobs import LocalBlobStore

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    blobs: LocalBlobStore
    registry: ModelRegistry
    routing: RoutingTable
    batchers: BatcherPool = field(default_factory=BatcherPool)
    models_warm: threading.Event = field(default_factory=lambda: _set(threading.Event()))
    """cleared while this process loads and warms its models up (the embedded worker's, at start)"""

    def manifests(self) -> dict[str, Manifest]:
        return {name: model.manifest for name, model in self.registry.models.items()}


def _set(event: threading.Event) -> threading.Event:
    event.set()
    return event


_runtime: Runtime | None = None
_lock = threading.Lock()


def build_runtime(settings: Settings, *, migrate: bool = True) -> Runtime:
    """Connect, migrate the schema, open the blob store and load the model repository."""
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    engine = db.make_engine(settings.effective_database_url)
    if migrate:
        db.upgrade(engine)
    registry = ModelRegistry(**settings.model_registry_options())
    registry.load()
    log.info("models served: %s", ", ".join(sorted(registry.models)) or "none")
    routing = build_table(settings.routing_rules, {name: m.manifest for name, m in registry.models.items()})
    log.info("routing: %d rules from %s", len(routing.rules), routing.source)
    return Runtime(
        settings=settings,
        engine=engine,
        sessions=db.make_session_factory(engine),
        blobs=LocalBlobStore(settings.effective_blob_dir),
        registry=registry,
        routing=routing,
    )


def get_runtime() -> Runtime:
    global _runtime
    with _lock:
        if _runtime is None:
            _runtime = build_runtime(get_settings())
        return _runtime


def set_runtime(runtime: Runtime | None) -> None:
    """Install (or clear) the process's runtime; the API and tests use this."""
    global _runtime
    with _lock:
        if _runtime is not None and runtime is not _runtime:
            _runtime.engine.dispose()
        _runtime = runtime
