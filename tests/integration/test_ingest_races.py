"""Two requests storing objects with one SOP Instance UID at the same moment, on SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import generate_uid
from sqlalchemy.exc import OperationalError

from service.flows import ingest
from service.flows.runtime import Runtime, build_runtime, set_runtime
from service.schemas import SYSTEM_PRINCIPAL
from service.store import audit, studies
from tests.conftest import make_settings
from tests.factories import dx_instance


def test_a_conflicting_object_stored_at_the_same_moment_is_refused_and_the_first_kept_intact(
    any_runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A and B carry one SOP Instance UID and different pixels. Both find it absent and write their file; A's rows
    are committed first. B must be refused, and the stored object must be A's bytes. Before, both wrote the same
    file, so it held B's bytes under A's row (and its sha256), and B was answered as a duplicate."""
    runtime = any_runtime
    uids = {"study_uid": generate_uid(), "series_uid": generate_uid(), "sop_uid": generate_uid()}
    first, second = (dx_instance(**uids, size=64, seed=seed) for seed in (1, 2))  # type: ignore[arg-type]
    sop_uid = uids["sop_uid"]
    assert first != second
    second_written, first_done = threading.Event(), threading.Event()
    real_add = studies.add_instance

    def add_in_order(**kwargs: Any) -> Any:
        if kwargs["sha256"] == hashlib.sha256(second).hexdigest():
            second_written.set()  # its file is written; its rows wait for the first's to be committed
            assert first_done.wait(30)
        else:
            assert second_written.wait(30)
        return real_add(**kwargs)

    monkeypatch.setattr(studies, "add_instance", add_in_order)
    outcomes: dict[str, Any] = {}

    def store(name: str, data: bytes) -> None:
        try:
            outcomes[name] = ingest.store_instance(runtime, data, principal=SYSTEM_PRINCIPAL, part=1, protocol="test")
        finally:
            if name == "first":
                first_done.set()

    threads = [threading.Thread(target=store, args=("first", first))]
    threads[0].start()
    threads.append(threading.Thread(target=store, args=("second", second)))
    threads[1].start()
    for thread in threads:
        thread.join(timeout=60)
    assert isinstance(outcomes["first"], ingest.StoredInstance) and outcomes["first"].new
    assert isinstance(outcomes["second"], ingest.FailedInstance)
    assert "different content" in outcomes["second"].message
    with runtime.sessions() as session:
        stored = studies.get_instance(session=session, sop_instance_uid=sop_uid)
        assert stored is not None
        kept = runtime.blobs.read_bytes(stored.blob_key)
    assert kept == first and stored.sha256 == hashlib.sha256(first).hexdigest()
    files = [p for p in Path(runtime.settings.effective_blob_dir).rglob("*.dcm")]
    assert len(files) == 1, files  # the refused object's file is gone


def test_an_object_stored_twice_keeps_its_file_when_the_first_store_fails(
    postgres_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sender stores an object and, its first association timing out, the same bytes again: two requests, one
    file name (the same content). The first fails in its transaction (the database connection lost) while the
    second waits for the first's locks; the first removes the file it wrote, and the second then commits its row.
    Before, the second's row named a file that no longer existed: an object acknowledged and lost. Now a store
    that commits puts the file back when it is gone, and a failed store that finds the row committed after its
    removal writes it again."""
    runtime = build_runtime(make_settings(tmp_path, database_url=postgres_url))
    set_runtime(runtime)
    data = dx_instance(study_uid=generate_uid(), size=64)
    deleted = threading.Event()
    real_append, real_delete = audit.append, runtime.blobs.delete

    def waiting_on_locks() -> int:
        with runtime.engine.connect() as connection:
            return int(
                connection.exec_driver_sql(
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND wait_event_type = 'Lock'"
                ).scalar_one()
            )

    def append(**kwargs: Any) -> None:
        if threading.current_thread().name == "first":
            deadline = time.monotonic() + 30
            while waiting_on_locks() == 0 and time.monotonic() < deadline:
                time.sleep(0.02)  # the second store is waiting for this transaction
            raise OperationalError("INSERT INTO audit_events ...", {}, Exception("server closed the connection"))
        assert deleted.wait(30)  # the second store commits after the first removed the file
        real_append(**kwargs)

    def delete(key: str) -> None:
        real_delete(key)
        deleted.set()

    monkeypatch.setattr(audit, "append", append)
    monkeypatch.setattr(runtime.blobs, "delete", delete)
    outcomes: dict[str, Any] = {}

    def store(name: str) -> None:
        outcomes[name] = ingest.store_instance(runtime, data, principal=SYSTEM_PRINCIPAL, part=1, protocol="test")

    first = threading.Thread(target=store, args=("first",), name="first")
    second = threading.Thread(target=store, args=("second",), name="second")
    first.start()
    time.sleep(0.2)  # the first holds its locks before the second starts
    second.start()
    for thread in (first, second):
        thread.join(timeout=60)
    assert isinstance(outcomes["first"], ingest.FailedInstance) and outcomes["first"].transient
    assert isinstance(outcomes["second"], ingest.StoredInstance) and outcomes["second"].new
    with runtime.sessions() as session:
        stored = studies.get_instance(session=session, sop_instance_uid=outcomes["second"].sop_instance_uid)
        assert stored is not None
        assert runtime.blobs.read_bytes(stored.blob_key) == data
    runtime.engine.dispose()
