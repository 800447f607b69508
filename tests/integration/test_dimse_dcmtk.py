"""dcmtk's echoscu and storescu against the clinfer DICOM listener: real peers over real sockets."""

from __future__ import annotations

import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import func, select

from service.config import Settings
from service.flows.runtime import Runtime
from service.store.tables import AuditEvent, Instance
from tests.conftest import dcmtk_tool, dimse_listener, free_port, make_settings
from tests.factories import dx_instance


def _dcmtk(tool: str, port: int, *args: str, calling: str = "MODALITY1") -> subprocess.CompletedProcess[str]:
    """Run echoscu or storescu (verbose) against the listener as the calling AE title ``calling``."""
    command = [dcmtk_tool(tool), "-v", "-aet", calling, "-aec", "CLINFER", "127.0.0.1", str(port), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[Runtime]:
    settings: Settings = make_settings(tmp_path, dimse_port=free_port(), dimse_allowed_calling_ae_titles=["MODALITY1"])
    with dimse_listener(settings) as runtime:
        yield runtime


def test_echoscu_and_storescu_store_a_multi_instance_study(listener: Runtime, tmp_path: Path) -> None:
    echo = _dcmtk("echoscu", listener.settings.dimse_port)
    assert echo.returncode == 0, echo.stderr
    study_uid, series_uid = generate_uid(), generate_uid()
    files = []
    for i in range(4):
        path = tmp_path / f"img{i}.dcm"
        path.write_bytes(
            dx_instance(study_uid=study_uid, series_uid=series_uid, seed=i, size=256, instance_number=i + 1)
        )
        files.append(str(path))
    store = _dcmtk("storescu", listener.settings.dimse_port, *files)
    assert store.returncode == 0, store.stdout + store.stderr
    with listener.sessions() as session:
        assert session.scalar(select(func.count(Instance.id))) == 4
        assert set(session.scalars(select(Instance.calling_ae_title))) == {"MODALITY1"}, "kept for routing rules"
        stored = session.scalars(select(AuditEvent).where(AuditEvent.event_type == "dicom.store")).all()
        assert len(stored) == 4 and {e.actor for e in stored} == {"dicom:MODALITY1"}
        assert {e.detail["protocol"] for e in stored} == {"dimse"}
    again = _dcmtk("storescu", listener.settings.dimse_port, *files)
    assert again.returncode == 0, "re-sending is idempotent"
    with listener.sessions() as session:
        assert session.scalar(select(func.count(Instance.id))) == 4


def test_unknown_calling_ae_title_is_refused_and_audited(listener: Runtime, tmp_path: Path) -> None:
    path = tmp_path / "img.dcm"
    path.write_bytes(dx_instance(size=256))
    store = _dcmtk("storescu", listener.settings.dimse_port, str(path), calling="STRANGER")
    assert store.returncode != 0
    assert "Association Rejected" in store.stdout + store.stderr
    with listener.sessions() as session:
        assert session.scalar(select(func.count(Instance.id))) == 0
    deadline = time.monotonic() + 5  # the listener audits the refusal in its own thread, after answering
    refusals: list[AuditEvent] = []
    while not refusals and time.monotonic() < deadline:
        with listener.sessions() as session:
            refusals = list(
                session.scalars(select(AuditEvent).where(AuditEvent.event_type == "dimse.association-rejected"))
            )
        time.sleep(0.1)
    [refusal] = refusals
    assert refusal.detail["calling_ae_title"] == "STRANGER" and refusal.outcome == "4"


def test_a_refused_instance_gets_a_failure_status(listener: Runtime, tmp_path: Path) -> None:
    path = tmp_path / "other-study.dcm"
    path.write_bytes(dx_instance(size=256, sop_uid="1.2.3.4.5.6.7"))
    first = _dcmtk("storescu", listener.settings.dimse_port, str(path))
    assert first.returncode == 0
    path.write_bytes(dx_instance(size=256, sop_uid="1.2.3.4.5.6.7", seed=9))  # same UID, different content
    second = _dcmtk("storescu", listener.settings.dimse_port, str(path))
    output = second.stdout + second.stderr
    assert second.returncode != 0 and "Error: CannotUnderstand" in output, output


def test_an_association_that_cannot_be_audited_is_aborted(
    listener: Runtime, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The database is gone when a modality associates. Before, pynetdicom swallowed the audit's error and the
    association went on: objects received with no record of who sent them. Now it is aborted (the sender retries
    later) and the failure is counted."""
    from sqlalchemy.exc import OperationalError

    from service import metrics
    from service.store import audit

    real_append = audit.append

    def database_gone(**kwargs: Any) -> None:
        if kwargs["event_type"] == "dimse.association":
            raise OperationalError("INSERT INTO audit_events ...", {}, Exception("server closed the connection"))
        real_append(**kwargs)

    monkeypatch.setattr(audit, "append", database_gone)
    failures = metrics.AUDIT_FAILURES.labels("dimse.association")
    before = failures._value.get()
    path = tmp_path / "img.dcm"
    path.write_bytes(dx_instance(size=256))
    store = _dcmtk("storescu", listener.settings.dimse_port, str(path))
    assert store.returncode != 0, store.stdout + store.stderr
    with listener.sessions() as session:
        assert session.scalar(select(func.count(Instance.id))) == 0
    assert failures._value.get() == before + 1


@pytest.fixture
def small_listener(tmp_path: Path) -> Iterator[Runtime]:
    """Two associations at most, objects up to 300 kB, 2 s for an association request or the rest of a PDU."""
    settings = make_settings(
        tmp_path,
        dimse_port=free_port(),
        dimse_max_associations=2,
        max_upload_bytes=300_000,
        dimse_acse_timeout=2,
        dimse_network_timeout=2,
    )
    with dimse_listener(settings) as runtime:
        yield runtime


def _closed_by_peer(sock: socket.socket, within: float) -> bool:
    sock.settimeout(within)
    try:
        return sock.recv(1024) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def test_an_object_over_the_upload_limit_ends_its_association_and_nothing_is_kept(
    small_listener: Runtime, tmp_path: Path
) -> None:
    """Before, a C-STORE object of any size was gathered in memory and stored: nothing bounded what a peer could
    make the listener hold (the STOW-RS route has CLINFER_MAX_UPLOAD_BYTES)."""
    large, small = tmp_path / "large.dcm", tmp_path / "small.dcm"
    large.write_bytes(dx_instance(size=512))  # 512 kB of pixels
    small.write_bytes(dx_instance(size=256))  # 128 kB
    refused = _dcmtk("storescu", small_listener.settings.dimse_port, str(large))
    assert refused.returncode != 0, refused.stdout + refused.stderr
    stored = _dcmtk("storescu", small_listener.settings.dimse_port, str(small))
    assert stored.returncode == 0, stored.stdout + stored.stderr
    with small_listener.sessions() as session:
        assert session.scalar(select(func.count(Instance.id))) == 1
        [event] = session.scalars(select(AuditEvent).where(AuditEvent.event_type == "dimse.object-too-large"))
    assert event.actor == "dicom:MODALITY1" and event.detail == {"limit_bytes": 300_000}


def test_a_pdu_longer_than_we_announced_closes_the_connection(small_listener: Runtime) -> None:
    """Before, the listener read whatever length a PDU header claimed (up to 4 GiB) into memory."""
    with socket.create_connection(("127.0.0.1", small_listener.settings.dimse_port)) as sock:
        sock.sendall(struct.pack(">BBL", 0x01, 0, 2**31) + b"\0" * 4096)  # an A-ASSOCIATE-RQ of 2 GiB
        assert _closed_by_peer(sock, within=10)
    echo = _dcmtk("echoscu", small_listener.settings.dimse_port)
    assert echo.returncode == 0, echo.stderr


def _acceptor_threads(port: int) -> int:
    """The association threads the listener on ``port`` runs (pynetdicom names them AcceptorThread@...)."""
    return sum(
        1
        for thread in threading.enumerate()
        if "AcceptorThread" in thread.name
        and getattr(getattr(thread, "_server", None), "server_address", (0, 0))[1] == port
    )


@pytest.fixture
def two_associations_listener(tmp_path: Path) -> Iterator[Runtime]:
    """Two associations at most; 8 s for an association request: time enough, however slow the machine, to see
    the connections beyond the limit closed while those within it stay open."""
    settings = make_settings(
        tmp_path, dimse_port=free_port(), dimse_max_associations=2, dimse_acse_timeout=8, dimse_network_timeout=8
    )
    with dimse_listener(settings) as runtime:
        yield runtime


def test_connections_beyond_twice_the_maximum_associations_are_closed_at_once(
    two_associations_listener: Runtime,
) -> None:
    """Before, every connection got a thread until its ACSE timeout, however many were open: connections that
    send nothing could pile up threads without bound."""
    port = two_associations_listener.settings.dimse_port
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(4)]  # 2 x 2 associations
    try:
        # all four taken from the listen queue first (a full queue would hold the next ones back for seconds)
        deadline = time.monotonic() + 10
        while _acceptor_threads(port) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        extra = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]
        assert [_closed_by_peer(s, within=5) for s in extra] == [True, True]
        assert [_closed_by_peer(s, within=0.2) for s in idle] == [False] * 4
        for s in extra:
            s.close()
    finally:
        for s in idle:
            s.close()
    deadline = time.monotonic() + 20
    while True:  # the idle connections' threads end at the ACSE timeout
        echo = _dcmtk("echoscu", port)
        if echo.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert echo.returncode == 0, echo.stderr


def test_peers_that_stop_in_the_middle_of_a_pdu_are_closed_and_lock_no_one_out(small_listener: Runtime) -> None:
    """Found in review: pynetdicom reads a PDU whole, blocking, with no timeout on an accepted socket, so a peer that
    sent part of one held its connection for ever; twice the maximum associations of them shut every sender out."""
    port = small_listener.settings.dimse_port
    stalled = [socket.create_connection(("127.0.0.1", port)) for _ in range(4)]
    try:
        for sock in stalled:
            sock.sendall(struct.pack(">BBL", 0x01, 0, 100) + b"\0" * 10)  # 10 bytes of a 100-byte A-ASSOCIATE-RQ
        assert [_closed_by_peer(s, within=15) for s in stalled] == [True] * 4
    finally:
        for sock in stalled:
            sock.close()
    deadline = time.monotonic() + 10
    while True:
        echo = _dcmtk("echoscu", port)
        if echo.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert echo.returncode == 0, echo.stderr
