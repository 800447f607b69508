"""C-STORE SCU: push Part 10 objects to a DICOM peer (a PACS, a viewer, dcmtk's storescp) over one association.

How failures are classified (PS3.8 for the association, PS3.4 B.2.3 and PS3.7 C for C-STORE statuses):

- unreachable, refused connection, TLS handshake failure, timeout, A-ABORT, no C-STORE response: TransientError;
- A-ASSOCIATE-RJ "rejected (transient)", or with source "service provider (presentation)" (temporary congestion,
  local limit exceeded) whatever its result: TransientError;
- A-ASSOCIATE-RJ "rejected (permanent)" otherwise, for example "called AE title not recognised" or "calling AE title
  not recognised": DeliveryRejected. The peer refuses us by configuration, and a retry only repeats the refusal;
- no presentation context accepted for an object's SOP class (and a transfer syntax it can be sent in):
  DeliveryRejected, as the peer's 0x0122 "SOP class not supported" would be;
- C-STORE status 0x0000 Success and Bxxx Warning: delivered; A7xx Out of Resources and 0x0110 Processing Failure (the
  peer's own trouble, often a full disk or a busy database): TransientError; any other failure status (A9xx, Cxxx,
  0x0122, 0x0124, ...): DeliveryRejected naming each refused SOP Instance UID and its status.
"""

from __future__ import annotations

import io
import logging
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_context
from pynetdicom.association import Association
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.presentation import PresentationContext

from service.destinations import DeliveryRejected, RefusedInstance, describe_refused, is_transient_status
from service.errors import ConfigurationError, InvalidInput, TransientError

log = logging.getLogger(__name__)

_NATIVE_LITTLE_ENDIAN = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
_MAX_PRESENTATION_CONTEXTS = 128  # PS3.8 9.3.2.2: odd context ids 1..255
_ASSOCIATION_REJECTED_TRANSIENT = 0x02
_SOURCE_SERVICE_PROVIDER_PRESENTATION = 0x03
STATUS_SUCCESS = 0x0000


def _check_ae_title(argument: str, value: str) -> None:
    if not isinstance(value, str) or not 0 < len(value.strip()) <= 16 or "\\" in value:
        raise ValueError(f"{argument!r} must be an AE title of 1 to 16 characters without a backslash, not {value!r}")
    if any(not ch.isprintable() or not ch.isascii() for ch in value):
        raise ValueError(f"{argument!r} must be printable ASCII, not {value!r}")


@dataclass(frozen=True)
class TlsClientConfig:
    """TLS for a DIMSE destination (PS3.15 B.9 / BCP 195: TLS 1.2 or later, the peer's certificate verified).

    Attributes:
        ca_file: PEM bundle of the CAs that may sign the peer's certificate.
        cert_file: PEM certificate we present (when the peer requires client certificates); set with ``key_file``.
        key_file: PEM private key of ``cert_file`` (unencrypted).
        check_hostname: check that the peer's certificate names the destination's ``host`` (a DNS name or an IP
            address in its subjectAltName). Turn off only for peers whose certificates name no host.
    """

    ca_file: Path
    cert_file: Path | None = None
    key_file: Path | None = None
    check_hostname: bool = True

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("'cert_file' and 'key_file' are set together or not at all")

    def ssl_context(self) -> ssl.SSLContext:
        """A client context; raises ConfigurationError when a file is missing or not PEM."""
        try:
            context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(self.ca_file))
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            context.check_hostname = self.check_hostname
            if self.cert_file is not None and self.key_file is not None:
                context.load_cert_chain(certfile=str(self.cert_file), keyfile=str(self.key_file))
        except (OSError, ssl.SSLError) as e:
            raise ConfigurationError(f"TLS files for a DICOM destination could not be loaded: {e}") from e
        return context


@dataclass(frozen=True)
class _Outgoing:
    index: int  # 1-based position in the objects sent, for messages about objects without readable UIDs
    dataset: Dataset
    sop_class_uid: UID
    sop_instance_uid: str
    transfer_syntax_uid: UID


def _read(index: int, data: bytes) -> _Outgoing:
    try:
        dataset = pydicom.dcmread(io.BytesIO(data))
    except Exception as e:  # pydicom raises many types for malformed input (InvalidDicomError, EOFError, ValueError)
        raise InvalidInput(f"object {index} is not a readable DICOM Part 10 object: {e}") from e
    transfer_syntax = dataset.file_meta.get("TransferSyntaxUID")
    sop_class = dataset.get("SOPClassUID")
    sop_instance = dataset.get("SOPInstanceUID")
    if not transfer_syntax or not sop_class or not sop_instance:
        raise InvalidInput(f"object {index} lacks its Transfer Syntax, SOP Class or SOP Instance UID")
    return _Outgoing(index, dataset, UID(str(sop_class)), str(sop_instance), UID(str(transfer_syntax)))


def _presentation_contexts(objects: Sequence[_Outgoing]) -> list[PresentationContext]:
    """Per SOP class: Explicit + Implicit VR Little Endian, and each other transfer syntax present in its own context.

    A context with several transfer syntaxes gets one of them accepted; a compressed object can only travel in its
    own syntax, so that one needs a context where it is the only choice.
    """
    wanted: dict[UID, list[UID]] = {}
    for obj in objects:
        extra = wanted.setdefault(obj.sop_class_uid, [])
        if obj.transfer_syntax_uid not in _NATIVE_LITTLE_ENDIAN and obj.transfer_syntax_uid not in extra:
            extra.append(obj.transfer_syntax_uid)
    contexts = []
    for sop_class, extra in wanted.items():
        contexts.append(build_context(sop_class, list(_NATIVE_LITTLE_ENDIAN)))
        contexts.extend(build_context(sop_class, transfer_syntax) for transfer_syntax in extra)
    if len(contexts) > _MAX_PRESENTATION_CONTEXTS:
        raise InvalidInput(
            f"{len(contexts)} SOP class and transfer syntax combinations do not fit one association "
            f"(at most {_MAX_PRESENTATION_CONTEXTS})"
        )
    return contexts


def _has_context(assoc: Association, obj: _Outgoing) -> bool:
    """Whether pynetdicom can send ``obj`` on an accepted context (its own syntax, or a native one it converts to)."""
    ours = obj.transfer_syntax_uid
    for context in assoc.accepted_contexts:
        if context.abstract_syntax != obj.sop_class_uid or not context.as_scu:
            continue
        agreed = UID(context.transfer_syntax[0])
        if agreed == ours:
            return True
        if not ours.is_compressed and not agreed.is_compressed and ours.is_little_endian == agreed.is_little_endian:
            return True
    return False


@dataclass(frozen=True)
class DimseDestination:
    """A DICOM peer we C-STORE to.

    Attributes:
        name: the configured name, used in messages.
        host: the peer's host name or IP address.
        port: the peer's DICOM port.
        called_ae_title: the peer's AE title.
        calling_ae_title: ours, as the peer knows us.
        timeout: seconds for each of: connecting (TCP and TLS), association negotiation, each DIMSE response, and
            network silence.
        tls: TLS settings; None speaks plain TCP.
    """

    name: str
    host: str
    port: int
    called_ae_title: str
    calling_ae_title: str = "CLINFER"
    timeout: float = 30.0
    tls: TlsClientConfig | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError("'name' must be a non-empty str")
        if not isinstance(self.host, str) or not self.host:
            raise ValueError("'host' must be a non-empty str")
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 0 < self.port < 65536:
            raise ValueError(f"'port' must be an int from 1 to 65535, not {self.port!r}")
        _check_ae_title("called_ae_title", self.called_ae_title)
        _check_ae_title("calling_ae_title", self.calling_ae_title)
        if not isinstance(self.timeout, int | float) or not self.timeout > 0:
            raise ValueError(f"'timeout' must be a positive number of seconds, not {self.timeout!r}")

    @property
    def kind(self) -> str:
        return "dimse"

    @property
    def _peer(self) -> str:
        return f"DICOM destination {self.name!r} ({self.called_ae_title}@{self.host}:{self.port})"

    def send(self, objects: Sequence[bytes]) -> None:
        """C-STORE every object over one association.

        Args:
            objects: DICOM Part 10 files (with file meta information).

        Raises:
            TransientError: the peer could not be reached or reported a temporary condition; try again later.
            DeliveryRejected: the peer refused the association permanently or refused instances.
            InvalidInput: an object cannot be read or encoded.
            ConfigurationError: the TLS files cannot be loaded.
        """
        if not objects:
            return
        outgoing = [_read(index, data) for index, data in enumerate(objects, start=1)]
        contexts = _presentation_contexts(outgoing)
        tls_args = (self.tls.ssl_context(), self.host) if self.tls is not None else None
        ae = AE(ae_title=self.calling_ae_title)
        ae.connection_timeout = self.timeout
        ae.acse_timeout = self.timeout
        ae.dimse_timeout = self.timeout
        ae.network_timeout = self.timeout
        assoc = ae.associate(self.host, self.port, contexts=contexts, ae_title=self.called_ae_title, tls_args=tls_args)
        if not assoc.is_established:
            raise self._association_failure(assoc, outgoing)
        refused: list[RefusedInstance] = []
        try:
            for obj in outgoing:
                status = self._store(assoc, obj)
                if status is not None:
                    refused.append(RefusedInstance(obj.sop_instance_uid, status))
        except BaseException:
            if assoc.is_established:
                assoc.abort()
            raise
        assoc.release()
        if refused:
            raise DeliveryRejected(
                f"{self._peer} refused {len(refused)} of {len(outgoing)} instances: {describe_refused(refused)}",
                destination=self.name,
                refused=refused,
            )
        log.info("C-STORE of %d objects to destination %s done", len(outgoing), self.name)

    def _store(self, assoc: Association, obj: _Outgoing) -> int | None:
        """C-STORE one object; None when delivered, else the refusal status. Raises on transient trouble."""
        uid = obj.sop_instance_uid
        if not _has_context(assoc, obj):
            log.warning("destination %s accepted no presentation context for object %d", self.name, obj.index)
            return 0x0122  # what the peer would answer: SOP Class not supported
        if not assoc.is_established:
            raise TransientError(f"{self._peer} dropped the association before SOP instance {uid} was sent")
        try:
            response = assoc.send_c_store(obj.dataset)
        except (ValueError, AttributeError) as e:  # pynetdicom's way of saying the dataset cannot be encoded
            raise InvalidInput(f"SOP instance {uid} could not be encoded for {self._peer}: {e}") from e
        status = response.get("Status")
        if status is None:
            raise TransientError(
                f"{self._peer} gave no C-STORE response for SOP instance {uid} (association aborted or timed out)"
            )
        status = int(status)
        if status == STATUS_SUCCESS:
            return None
        if status & 0xF000 == 0xB000:
            log.warning("destination %s stored object %d with warning status 0x%04X", self.name, obj.index, status)
            return None
        if is_transient_status(status):
            raise TransientError(f"{self._peer} could not store SOP instance {uid} now: status 0x{status:04X}")
        return status

    def _association_failure(self, assoc: Association, outgoing: Sequence[_Outgoing]) -> Exception:
        answer: Any = assoc.acceptor.primitive
        rejected = assoc.is_rejected
        if answer is None:
            # pynetdicom races a peer that rejects and closes at once (dcmqrscp on loopback does): its ACSE sees the
            # connection already closed and aborts, leaving the A-ASSOCIATE-RJ unread in the DUL's queue
            late = assoc.dul.receive_pdu(wait=False)
            if isinstance(late, A_ASSOCIATE) and late.result in (0x01, 0x02):
                answer, rejected = late, True
        if rejected and answer is not None:
            what = (
                f"{answer.result_str.lower()}: {answer.reason_str} (result 0x{answer.result:02X}, "
                f"source 0x{answer.result_source:02X}, reason 0x{answer.diagnostic:02X})"
            )
            if (
                answer.result == _ASSOCIATION_REJECTED_TRANSIENT
                or answer.result_source == _SOURCE_SERVICE_PROVIDER_PRESENTATION
            ):
                return TransientError(f"{self._peer} rejected the association, {what}")
            return DeliveryRejected(f"{self._peer} rejected the association, {what}", destination=self.name)
        if answer is not None and answer.result == 0x00 and not assoc.accepted_contexts:
            # accepted, but not one presentation context: pynetdicom aborts; the peer supports none of our SOP classes
            sop_classes = sorted({str(obj.sop_class_uid) for obj in outgoing})
            refused = [RefusedInstance(obj.sop_instance_uid, 0x0122) for obj in outgoing]
            return DeliveryRejected(
                f"{self._peer} accepted no presentation context for SOP classes {', '.join(sop_classes)}: "
                f"{describe_refused(refused)}",
                destination=self.name,
                refused=refused,
            )
        return TransientError(f"{self._peer} could not be reached, or it aborted the association")
