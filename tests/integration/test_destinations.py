"""Result destinations against real peers: dcmtk's storescp and dcmqrscp (C-STORE, plain and TLS), our own DICOM
listener, and our own STOW-RS endpoint served by uvicorn."""

from __future__ import annotations

import http.server
import io
import json
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, RLELossless, SecondaryCaptureImageStorage, generate_uid
from sqlalchemy import select

from service.api.auth import mint_token
from service.destinations import DeliveryRejected, Destination, RefusedInstance
from service.destinations.dimse import DimseDestination, TlsClientConfig
from service.destinations.stow import StowDestination
from service.errors import TransientError
from service.flows.runtime import Runtime, build_runtime, set_runtime
from service.store.tables import Instance
from tests.conftest import dcmtk_tool, dimse_listener, free_port, make_settings, serve_over_http
from tests.factories import dx_instance
from tests.integration.test_dimse_tls import Pki, make_pki


def secondary_capture(
    *, study_uid: str, transfer_syntax: str = ExplicitVRLittleEndian, sop_class_uid: str = SecondaryCaptureImageStorage
) -> bytes:
    """A small Secondary Capture image (8 bits, a gradient), uncompressed or RLE Lossless."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class_uid
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = "MRN-1001"
    ds.PatientName = "Synthetic^Test"
    ds.Modality = "OT"
    ds.ConversionType = "WSD"
    ds.SeriesNumber = 900
    ds.InstanceNumber = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = 48, 64
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    pixels = (np.arange(48 * 64, dtype=np.uint32) % 251).astype(np.uint8).reshape(48, 64)
    ds.PixelData = pixels.tobytes()
    if transfer_syntax != ExplicitVRLittleEndian:
        ds.compress(transfer_syntax, pixels)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _wait_listening(port: int, process: subprocess.Popen[bytes] | None = None, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            if process is not None and process.poll() is not None:
                raise AssertionError(f"the peer exited with {process.returncode} before listening") from None
            if time.monotonic() > deadline:
                raise AssertionError(f"nothing listens on port {port}") from None
            time.sleep(0.1)


def _run_peer(command: list[str], port: int, log: Path) -> Iterator[None]:
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        _wait_listening(port, process)
        yield
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()


StoreScp = Callable[..., tuple[int, Path]]


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[StoreScp]:
    """Start dcmtk's storescp as STORESCP with extra options; returns its port and output directory."""
    peers: list[Iterator[None]] = []

    def start(*options: str) -> tuple[int, Path]:
        port = free_port()
        received = tmp_path / f"received-{port}"
        received.mkdir()
        command = [dcmtk_tool("storescp"), "-v", "-aet", "STORESCP", "-od", str(received), *options, str(port)]
        peer = _run_peer(command, port, tmp_path / f"storescp-{port}.log")
        next(peer)
        peers.append(peer)
        return port, received

    yield start
    for peer in peers:
        next(peer, None)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _datasets(directory: Path) -> dict[str, pydicom.Dataset]:
    read = [pydicom.dcmread(path) for path in sorted(directory.iterdir())]
    return {str(ds.SOPInstanceUID): ds for ds in read}


def _assert_received_intact(sent: list[bytes], received_dir: Path) -> None:
    received = _datasets(received_dir)
    originals = [pydicom.dcmread(io.BytesIO(data)) for data in sent]
    assert set(received) == {str(ds.SOPInstanceUID) for ds in originals}
    for original in originals:
        copy = received[str(original.SOPInstanceUID)]
        assert copy == original, "same elements and values, file meta aside"
        assert copy.PixelData == original.PixelData
        assert copy.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID


def _dimse(port: int, *, called: str = "STORESCP", tls: TlsClientConfig | None = None) -> DimseDestination:
    return DimseDestination(name="archive", host="127.0.0.1", port=port, called_ae_title=called, timeout=10, tls=tls)


def test_destinations_follow_the_protocol() -> None:
    destinations: list[Destination] = [
        _dimse(104),
        StowDestination(name="web", url="http://127.0.0.1:8000/dicomweb"),
    ]
    assert [(d.name, d.kind) for d in destinations] == [("archive", "dimse"), ("web", "stow")]


def test_arguments_are_checked_early() -> None:
    with pytest.raises(ValueError, match="'port'"):
        DimseDestination(name="x", host="h", port=0, called_ae_title="PACS")
    with pytest.raises(ValueError, match="'called_ae_title'"):
        DimseDestination(name="x", host="h", port=104, called_ae_title="A" * 17)
    with pytest.raises(ValueError, match="'cert_file' and 'key_file'"):
        TlsClientConfig(ca_file=Path("ca.crt"), cert_file=Path("client.crt"))
    with pytest.raises(ValueError, match="'/studies' is appended"):
        StowDestination(name="x", url="http://pacs/dicom-web/studies")
    with pytest.raises(ValueError, match="credentials"):
        StowDestination(name="x", url="http://user:secret@pacs/dicom-web")


def test_c_store_to_storescp_delivers_both_objects_intact(storescp: StoreScp) -> None:
    port, received = storescp("+xa")  # accept every transfer syntax it knows, RLE Lossless included
    study_uid = generate_uid()
    sent = [
        dx_instance(study_uid=study_uid, size=64),
        secondary_capture(study_uid=study_uid, transfer_syntax=RLELossless),
    ]
    _dimse(port).send(sent)
    _assert_received_intact(sent, received)


def test_a_transfer_syntax_the_peer_refuses_is_rejected_and_the_rest_delivered(storescp: StoreScp) -> None:
    port, received = storescp()  # uncompressed transfer syntaxes only
    study_uid = generate_uid()
    plain = dx_instance(study_uid=study_uid, size=64)
    compressed = secondary_capture(study_uid=study_uid, transfer_syntax=RLELossless)
    with pytest.raises(DeliveryRejected) as refused:
        _dimse(port).send([plain, compressed])
    compressed_uid = str(pydicom.dcmread(io.BytesIO(compressed)).SOPInstanceUID)
    assert refused.value.refused == (RefusedInstance(compressed_uid, 0x0122),)
    assert compressed_uid in refused.value.message and "0x0122" in refused.value.message
    assert "archive" in refused.value.message
    _assert_received_intact([plain], received)


def test_a_sop_class_the_peer_does_not_support_is_rejected(storescp: StoreScp) -> None:
    port, received = storescp()  # not promiscuous: storage SOP classes it knows only
    private = secondary_capture(study_uid=generate_uid(), sop_class_uid="1.2.826.0.1.3680043.9.9999.1")
    with pytest.raises(DeliveryRejected, match="accepted no presentation context") as refused:
        _dimse(port).send([private])
    [instance] = refused.value.refused
    assert instance.status == 0x0122
    assert list(received.iterdir()) == []


def test_c_store_to_a_closed_port_is_transient() -> None:
    with pytest.raises(TransientError, match="could not be reached"):
        _dimse(free_port()).send([dx_instance(size=64)])


def test_an_association_the_peer_aborts_mid_store_is_transient(storescp: StoreScp) -> None:
    port, _ = storescp("--abort-after")  # aborts after the C-STORE-RQ, before answering it
    with pytest.raises(TransientError, match="no C-STORE response for SOP instance"):
        _dimse(port).send([dx_instance(size=64)])


def test_a_called_ae_title_the_peer_does_not_know_is_rejected(tmp_path: Path) -> None:
    port = free_port()
    archive = tmp_path / "archive"
    archive.mkdir()
    config = tmp_path / "dcmqrscp.cfg"
    config.write_text(
        f"NetworkTCPPort = {port}\nMaxPDUSize = 16384\nMaxAssociations = 4\n"
        "HostTable BEGIN\nHostTable END\nVendorTable BEGIN\nVendorTable END\n"
        f"AETable BEGIN\nARCHIVE {archive} RW (10, 64mb) ANY\nAETable END\n"
    )
    peer = _run_peer([dcmtk_tool("dcmqrscp"), "-v", "-c", str(config), str(port)], port, tmp_path / "dcmqrscp.log")
    next(peer)
    try:
        with pytest.raises(DeliveryRejected, match="(?i)rejected permanent.*called AE title not recogni") as refused:
            _dimse(port, called="WRONG").send([dx_instance(size=64)])
        assert refused.value.destination == "archive" and refused.value.code == "delivery-rejected"
        _dimse(port, called="ARCHIVE").send([dx_instance(size=64)])  # the same peer, its own title: delivered
    finally:
        next(peer, None)


def test_c_store_over_tls_to_storescp(storescp: StoreScp, pki: Pki) -> None:
    port, received = storescp("+tls", str(pki.server.key), str(pki.server.cert), "+cf", str(pki.ca))
    sent = [dx_instance(size=64), secondary_capture(study_uid=generate_uid())]
    tls = TlsClientConfig(ca_file=pki.ca, cert_file=pki.client.cert, key_file=pki.client.key)
    _dimse(port, tls=tls).send(sent)
    _assert_received_intact(sent, received)
    with pytest.raises(TransientError):  # storescp requires a client certificate by default
        _dimse(port, tls=TlsClientConfig(ca_file=pki.ca)).send(sent)
    with pytest.raises(TransientError):  # plain TCP to a TLS port
        _dimse(port).send(sent)


# our own listener answers with real failure statuses


@pytest.fixture
def our_listener(tmp_path: Path) -> Iterator[Runtime]:
    with dimse_listener(make_settings(tmp_path, dimse_port=free_port())) as runtime:
        yield runtime


def test_failure_statuses_from_our_listener_are_classified(our_listener: Runtime) -> None:
    destination = _dimse(our_listener.settings.dimse_port, called="CLINFER")
    sop_uid = generate_uid()
    destination.send([dx_instance(size=64, sop_uid=sop_uid)])
    with pytest.raises(DeliveryRejected) as refused:  # the same SOP instance with other content: Cxxx
        destination.send([dx_instance(size=64, sop_uid=sop_uid, seed=7)])
    [(uid, status)] = [(r.sop_instance_uid, r.status) for r in refused.value.refused]
    assert uid == sop_uid and status & 0xF000 == 0xC000
    assert f"0x{status:04X}" in refused.value.message
    our_listener.settings.max_decoded_pixels = 16  # our listener answers A700 Out of Resources
    with pytest.raises(TransientError, match="status 0xA7[0-9A-F]{2}"):
        destination.send([dx_instance(size=64)])


# STOW-RS against our own service, served by uvicorn


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, Runtime]]:
    runtime = build_runtime(make_settings(tmp_path))
    set_runtime(runtime)
    with serve_over_http(runtime) as base:
        yield f"{base}/dicomweb", runtime


def _stored_sop_uids(runtime: Runtime) -> set[str]:
    with runtime.sessions() as session:
        return set(session.scalars(select(Instance.sop_instance_uid)))


def test_stow_to_our_service_stores_both_objects(served: tuple[str, Runtime]) -> None:
    url, runtime = served
    study_uid = generate_uid()
    sent = [dx_instance(study_uid=study_uid, seed=i, size=64, instance_number=i + 1) for i in range(2)]
    StowDestination(name="clinfer", url=url, bearer_token=mint_token(runtime.settings, role="ingest")).send(sent)
    assert _stored_sop_uids(runtime) == {str(pydicom.dcmread(io.BytesIO(d)).SOPInstanceUID) for d in sent}


def test_stow_of_a_corrupt_object_is_rejected_with_its_failure_reason(served: tuple[str, Runtime]) -> None:
    url, runtime = served
    study_uid = generate_uid()
    good = dx_instance(study_uid=study_uid, size=64)
    truncated_uid = generate_uid()
    truncated = dx_instance(study_uid=study_uid, sop_uid=truncated_uid, size=64, seed=3)[:-2000]
    destination = StowDestination(name="clinfer", url=url, bearer_token=mint_token(runtime.settings, role="ingest"))
    with pytest.raises(DeliveryRejected) as refused:
        destination.send([good, truncated])
    assert refused.value.refused == (RefusedInstance(truncated_uid, 0xC000),)
    assert truncated_uid in refused.value.message and "0xC000" in refused.value.message
    assert "HTTP 202" in refused.value.message and "'clinfer'" in refused.value.message
    assert _stored_sop_uids(runtime) == {str(pydicom.dcmread(io.BytesIO(good)).SOPInstanceUID)}


def test_stow_without_a_valid_token_is_rejected(served: tuple[str, Runtime]) -> None:
    url, runtime = served
    for token in (None, mint_token(runtime.settings, role="clinician")):  # 401, then 403 (no ingest scope)
        with pytest.raises(DeliveryRejected, match="HTTP 40[13]") as refused:
            StowDestination(name="clinfer", url=url, bearer_token=token).send([dx_instance(size=64)])
        assert refused.value.refused == ()
    assert _stored_sop_uids(runtime) == set()


def test_stow_to_a_closed_port_is_transient() -> None:
    destination = StowDestination(name="nowhere", url=f"http://127.0.0.1:{free_port()}/dicomweb", timeout=5)
    with pytest.raises(TransientError, match="'nowhere'.*could not be reached"):
        destination.send([dx_instance(size=64)])


def test_stow_to_a_peer_that_takes_the_request_and_does_not_answer_is_transient() -> None:
    """A read timeout is not "could not be reached": the peer got the objects and may have stored them."""
    took: list[int] = []

    class Silent(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            took.append(len(self.rfile.read(int(self.headers["Content-Length"]))))
            time.sleep(3)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Silent)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/dicom-web"
        with pytest.raises(TransientError, match="was sent the request but did not answer within 1 s") as failed:
            StowDestination(name="slow", url=url, timeout=1).send([dx_instance(size=64)])
        assert "could not be reached" not in str(failed.value) and took and took[0] > 0
    finally:
        server.shutdown()
        server.server_close()


# answers our own service never gives, from a stand-in HTTP peer: only the status line and body matter here


def _failed_sop_sequence(*items: tuple[str, int]) -> bytes:
    return json.dumps(
        {
            "00081198": {
                "vr": "SQ",
                "Value": [
                    {"00081155": {"vr": "UI", "Value": [uid]}, "00081197": {"vr": "US", "Value": [reason]}}
                    for uid, reason in items
                ],
            }
        }
    ).encode()


@pytest.fixture
def http_peer() -> Iterator[Callable[[int, bytes], str]]:
    """An HTTP server answering every POST with the status and body last given; returns its DICOMweb base."""
    answer: list[tuple[int, bytes]] = [(200, b"")]
    received: list[int] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            received.append(len(self.rfile.read(int(self.headers["Content-Length"]))))
            status, body = answer[-1]
            self.send_response(status)
            self.send_header("Content-Type", "application/dicom+json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()

    def answering(status: int, body: bytes = b"") -> str:
        answer.append((status, body))
        return f"http://127.0.0.1:{server.server_address[1]}/dicom-web"

    try:
        yield answering
    finally:
        server.shutdown()
        server.server_close()
    assert received, "the peer was asked"


@pytest.mark.parametrize(
    ("status", "body", "outcome"),
    [
        (200, b"", None),
        (204, b"", None),
        (202, b"{}", None),  # stored, with warnings only
        (503, b"", TransientError),
        (500, b"", TransientError),
        (429, b"", TransientError),
        (408, b"", TransientError),
        (202, _failed_sop_sequence(("1.2.3", 0xA700)), TransientError),  # only temporary failure reasons
        (409, _failed_sop_sequence(("1.2.3", 0xA700), ("1.2.4", 0xA900)), DeliveryRejected),
        (400, b"", DeliveryRejected),
        (404, b"", DeliveryRejected),
        (413, b"", DeliveryRejected),
        (302, b"", DeliveryRejected),
        (200, _failed_sop_sequence(("1.2.3", 0xC000)), DeliveryRejected),
    ],
)
def test_stow_answers_are_classified(
    http_peer: Callable[[int, bytes], str], status: int, body: bytes, outcome: type[Exception] | None
) -> None:
    destination = StowDestination(name="peer", url=http_peer(status, body))
    if outcome is None:
        destination.send([dx_instance(size=64)])
        return
    with pytest.raises(outcome, match=f"HTTP {status}"):
        destination.send([dx_instance(size=64)])
