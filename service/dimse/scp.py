"""The DICOM listener: C-ECHO and C-STORE SCP (pynetdicom), storing through the same ingest path as STOW-RS.

Exceptions from the ingest are turned into DIMSE statuses here, in one place; every association, refusal and
stored instance is audited.

With CLINFER_DIMSE_TLS_CERT and CLINFER_DIMSE_TLS_KEY the listener speaks only TLS (1.2 or later; PS3.15 B.9 and
BCP 195); with CLINFER_DIMSE_TLS_CA as well, a calling AE must present a certificate that CA signed.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
from collections.abc import Callable
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from service import metrics
from service.config import Settings
from service.errors import ConfigurationError
from service.flows import ingest
from service.flows.runtime import Runtime
from service.schemas import Principal
from service.store import audit

log = logging.getLogger(__name__)

STATUS_SUCCESS = 0x0000
# PS3.4 B.2.3: C-STORE failures are A7xx (out of resources), A9xx (does not match SOP class), Cxxx (cannot
# understand), plus the general 0110 (processing failure) and 0122 (SOP class not supported). Ingest reasons outside
# those ranges are sent as Cxxx with the same low bits, and the reason is always in ErrorComment.
_C_STORE_STATUS_PREFIXES = (0xA700, 0xA900, 0xC000)
_C_STORE_GENERAL = (0x0110, 0x0122)


def c_store_status(failure_reason: int) -> int:
    if failure_reason in _C_STORE_GENERAL or (failure_reason & 0xFF00) in _C_STORE_STATUS_PREFIXES:
        return failure_reason
    return 0xC000 | (failure_reason & 0x0FFF)


def _principal(event: Any) -> Principal:
    requestor = event.assoc.requestor
    return Principal(subject=f"dicom:{requestor.ae_title}", role="ingest", source_address=requestor.address)


def _audit_association(runtime: Runtime, event: Any, *, accepted: bool) -> None:
    """Audit an association accepted or rejected. An accepted one that cannot be audited (the database gone) is
    aborted: nothing is received without its record. pynetdicom logs and swallows what a notification handler
    raises, so the failure is handled here."""
    requestor = event.assoc.requestor
    try:
        with runtime.sessions.begin() as session:
            audit.append(
                session=session,
                principal=_principal(event),
                event_type="dimse.association" if accepted else "dimse.association-rejected",
                action="E",
                outcome=audit.SUCCESS if accepted else audit.MINOR_FAILURE,
                entity_type="Association",
                entity_ref=f"{requestor.ae_title}->{event.assoc.acceptor.ae_title}",
                detail={"calling_ae_title": requestor.ae_title, "address": requestor.address},
            )
    except Exception:
        metrics.AUDIT_FAILURES.labels("dimse.association").inc()
        log.exception("the association from %s could not be audited", requestor.ae_title)
        if accepted:
            event.assoc.abort()


def handle_store(event: Any, runtime: Runtime) -> int | Dataset:
    """C-STORE: make the instance durable (or refuse it) and answer with the matching DIMSE status."""
    try:
        data = event.encoded_dataset(include_meta=True)
    except Exception as e:  # a malformed dataset from the peer; pynetdicom gives no narrower type
        log.warning("C-STORE dataset could not be encoded: %s", e)
        return 0xC000
    result = ingest.store_instance(
        runtime,
        data,
        principal=_principal(event),
        part=1,
        protocol="dimse",
        calling_ae_title=str(event.assoc.requestor.ae_title).strip() or None,
    )
    if isinstance(result, ingest.FailedInstance):
        status = Dataset()
        status.Status = c_store_status(result.failure_reason)
        status.ErrorComment = result.message[:64]
        log.info("C-STORE refused with status 0x%04X", status.Status)
        return status
    return STATUS_SUCCESS


# The largest P-DATA PDU we take, announced as our Maximum Length Received (PS3.8 D.1). A peer's larger PDU, or a
# DIMSE message (a C-STORE's object) larger than CLINFER_MAX_UPLOAD_BYTES, ends the association: pynetdicom would
# otherwise read whatever length a PDU header claims, and gather an object of any size, in memory.
MAX_PDU_BYTES = 4 * 1024**2


def _guard_received(event: Any, runtime: Runtime) -> None:
    """EVT_CONN_OPEN, before the association reads anything: bound what one PDU and one DIMSE message may hold."""
    assoc = event.assoc
    sock, dimse = assoc.dul.socket, assoc.dimse
    address = str(event.address[0]) if event.address else ""
    read_pdu, receive_primitive = sock.recv, dimse.receive_primitive
    limit = runtime.settings.max_upload_bytes
    gathered = 0

    def recv(nr_bytes: int) -> bytearray:
        if nr_bytes > MAX_PDU_BYTES:  # a PDU's length, read after its 6-byte header
            log.warning("DICOM peer %s sent a PDU of %d bytes (more than %d): closed", address, nr_bytes, MAX_PDU_BYTES)
            metrics.DIMSE_REFUSED.labels("pdu-too-large").inc()
            raise OSError(f"a PDU of {nr_bytes} bytes exceeds our maximum of {MAX_PDU_BYTES}")
        return read_pdu(nr_bytes)  # type: ignore[no-any-return]

    def receive(primitive: Any) -> None:
        nonlocal gathered
        if gathered > limit:
            return  # the association is being aborted
        gathered += sum(len(value) for _, value in primitive.presentation_data_value_list)
        if gathered > limit:
            log.warning("DICOM peer %s sent an object over %d bytes: association aborted", address, limit)
            metrics.DIMSE_REFUSED.labels("object-too-large").inc()
            _audit_refused_object(runtime, event, limit)
            assoc.dul.event_queue.put("Evt19")  # an invalid PDU: A-ABORT to the peer, then the connection closes
            return
        receive_primitive(primitive)
        if dimse.message is None:  # a whole message received
            gathered = 0

    sock.recv = recv
    dimse.receive_primitive = receive


def _audit_refused_object(runtime: Runtime, event: Any, limit: int) -> None:
    try:
        with runtime.sessions.begin() as session:
            audit.append(
                session=session,
                principal=_principal(event),
                event_type="dimse.object-too-large",
                action="C",
                outcome=audit.MINOR_FAILURE,
                entity_type="Association",
                entity_ref=f"{event.assoc.requestor.ae_title}->{event.assoc.acceptor.ae_title}",
                detail={"limit_bytes": limit},
            )
    except Exception:  # the association is aborted all the same; the failure is counted and logged
        metrics.AUDIT_FAILURES.labels("dimse.object-too-large").inc()
        log.exception("the refused object could not be audited")


def build_ae(runtime: Runtime) -> AE:
    settings = runtime.settings
    ae = AE(ae_title=settings.dimse_ae_title)
    ae.maximum_associations = settings.dimse_max_associations
    ae.acse_timeout = settings.dimse_acse_timeout
    ae.network_timeout = settings.dimse_network_timeout
    ae.maximum_pdu_size = MAX_PDU_BYTES  # what we receive; the peer's own maximum applies to what we send
    ae.require_called_aet = True
    if settings.dimse_allowed_calling_ae_titles:
        ae.require_calling_aet = list(settings.dimse_allowed_calling_ae_titles)
    ae.add_supported_context(Verification)
    for context in AllStoragePresentationContexts:
        assert context.abstract_syntax is not None
        ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    return ae


def handlers(runtime: Runtime) -> list[Any]:
    return [
        (evt.EVT_CONN_OPEN, _guard_received, [runtime]),
        (evt.EVT_C_ECHO, lambda event: STATUS_SUCCESS),
        (evt.EVT_C_STORE, handle_store, [runtime]),
        (evt.EVT_ACCEPTED, lambda event: _audit_association(runtime, event, accepted=True)),
        (evt.EVT_REJECTED, lambda event: _audit_association(runtime, event, accepted=False)),
    ]


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    """The listener's server-side TLS context, or None for plain TCP when no certificate is configured.

    Raises:
        ConfigurationError: a certificate, key or CA file is missing or unreadable.
    """
    if settings.dimse_tls_cert is None or settings.dimse_tls_key is None:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(certfile=settings.dimse_tls_cert, keyfile=settings.dimse_tls_key)
        if settings.dimse_tls_ca is not None:
            context.load_verify_locations(cafile=settings.dimse_tls_ca)
            context.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as e:
        raise ConfigurationError(f"the DICOM listener's TLS files could not be loaded: {e}") from e
    return context


class ListenerServer(ThreadedAssociationServer):
    """pynetdicom's threaded server, with a bound on open connections.

    pynetdicom starts a thread for every connection and refuses associations over its maximum only once their
    A-ASSOCIATE-RQ has arrived, so connections that send nothing (or close before a word) each hold a thread until
    the ACSE timeout (CLINFER_DIMSE_ACSE_TIMEOUT), and one that stops in the middle of a PDU until the network
    timeout (CLINFER_DIMSE_NETWORK_TIMEOUT). Up to
    ``max_connections`` (twice the maximum associations, so a peer over that maximum still gets its A-ASSOCIATE-RJ)
    are served; a connection beyond is closed at once.
    """

    # the listen queue: socketserver's default of 5 holds a sixth modality connecting at the same moment back for
    # seconds (the kernel drops its handshake's last packet and the peer resends it later)
    request_queue_size = 64

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.max_connections = 2 * self.ae.maximum_associations
        self._pending = 0  # accepted, their association thread not started yet
        self._pending_lock = threading.Lock()

    def connections(self) -> int:
        return len(self.active_associations) + self._pending

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._pending_lock:
            if self.connections() >= self.max_connections:
                refused = True
            else:
                refused = False
                self._pending += 1
        if refused:
            log.warning("DICOM connection from %s closed: %d connections open", client_address[0], self.max_connections)
            metrics.DIMSE_REFUSED.labels("too-many-connections").inc()
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)  # starts the connection's thread
        except BaseException:
            self._started()
            raise

    def _started(self) -> None:
        with self._pending_lock:
            self._pending -= 1

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            # pynetdicom reads a PDU whole, blocking, and its timers are only looked at between PDUs: without a
            # timeout on the socket, a peer that sends part of a PDU and waits holds its connection (and a place
            # under max_connections) for ever; with one, the read fails and the connection is closed
            request.settimeout(self.network_timeout)
            self._serve_connection(request, client_address)
        finally:
            self._started()  # its association thread runs (and is counted) from here, or the connection is closed

    @property
    def network_timeout(self) -> float:
        return float(self.ae.network_timeout or 60)

    def _serve_connection(self, request: Any, client_address: Any) -> None:
        super().process_request_thread(request, client_address)


class TlsAssociationServer(ListenerServer):
    """The listener's server, with the TLS handshake moved from the accept loop into the connection's thread.

    pynetdicom wraps each accepted socket in the accept loop and handshakes there without a timeout, so one client
    that connects and sends nothing would stop the listener accepting anyone else.

    Args:
        on_refused: called with the peer's address and the reason when a handshake fails for a cause other than
            the peer going away (no certificate, one we do not trust, plain DICOM on the TLS port), so it can be
            audited; connections closed before a word (port probes, health checks) are only logged.
    """

    def __init__(self, *args: Any, on_refused: Callable[[str, str], None] | None = None, **kwargs: Any) -> None:
        self.on_refused = on_refused
        super().__init__(*args, **kwargs)

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        assert self.socket is not None and self.ssl_context is not None
        client_socket, address = self.socket.accept()
        wrapped = self.ssl_context.wrap_socket(client_socket, server_side=True, do_handshake_on_connect=False)
        return wrapped, address

    def _serve_connection(self, request: Any, client_address: Any) -> None:
        handshake_timeout = self.ae.acse_timeout or 30
        try:
            request.settimeout(handshake_timeout)
            request.do_handshake()
            request.settimeout(self.network_timeout)
        except OSError as e:  # ssl.SSLError and socket timeouts are OSErrors
            self.shutdown_request(request)
            refused = isinstance(e, ssl.SSLError) and not isinstance(e, ssl.SSLEOFError | ssl.SSLZeroReturnError)
            if not refused:
                log.debug("TLS connection from %s closed before its handshake: %s", client_address[0], e)
                return
            log.warning("TLS handshake with %s failed: %s", client_address[0], e)
            if self.on_refused is not None:
                self.on_refused(str(client_address[0]), getattr(e, "reason", None) or str(e))
            return
        super()._serve_connection(request, client_address)


def _audit_tls_refusal(runtime: Runtime, address: str, reason: str) -> None:
    metrics.AUTH_DENIALS.labels("dimse-tls-handshake").inc()
    try:
        with runtime.sessions.begin() as session:
            audit.append(
                session=session,
                principal=Principal(subject="unauthenticated", source_address=address),
                event_type="dimse.tls-refused",
                action="E",
                outcome=audit.MINOR_FAILURE,
                entity_type="Association",
                entity_ref=f"tls->{runtime.settings.dimse_ae_title}",
                detail={"address": address, "reason": reason[:200]},
            )
    except Exception:  # the connection is refused all the same; the failure is counted and logged
        metrics.AUDIT_FAILURES.labels("dimse.tls-refused").inc()
        log.exception("the refused TLS connection from %s could not be audited", address)


def start(runtime: Runtime, *, block: bool) -> ThreadedAssociationServer | None:
    """Listen on CLINFER_DIMSE_HOST:CLINFER_DIMSE_PORT as CLINFER_DIMSE_AE_TITLE, over TLS when configured."""
    settings = runtime.settings
    ae = build_ae(runtime)
    address = (settings.dimse_host, settings.dimse_port)
    context = tls_context(settings)
    log.info(
        "DICOM listener %s on %s:%d%s",
        settings.dimse_ae_title,
        settings.dimse_host,
        settings.dimse_port,
        "" if context is None else " (TLS" + (", client certificates required)" if settings.dimse_tls_ca else ")"),
    )
    # what AE.start_server does, with our server class: the AE keeps its servers (AssociationServer.shutdown
    # removes itself from that list, and AE.shutdown stops them all)
    if context is None:
        server = ae.make_server(address, evt_handlers=handlers(runtime), server_class=ListenerServer)
    else:
        server = ae.make_server(
            address,
            ssl_context=context,
            evt_handlers=handlers(runtime),
            server_class=TlsAssociationServer,
            on_refused=lambda peer, reason: _audit_tls_refusal(runtime, peer, reason),
        )
    ae._servers.append(server)
    if block:
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            server.shutdown()
        return None
    threading.Thread(target=server.serve_forever, name="dimse-listener", daemon=True).start()
    return server
