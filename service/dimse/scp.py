"""The DICOM listener: C-ECHO and C-STORE SCP (pynetdicom), storing through the same ingest path as STOW-RS.

Exceptions from the ingest are turned into DIMSE statuses here, in one place; every association, refusal and
stored instance is audited.
"""

from __future__ import annotations

import logging
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

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
    requestor = event.assoc.requestor
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


def handle_store(event: Any, runtime: Runtime) -> int | Dataset:
    """C-STORE: make the instance durable (or refuse it) and answer with the matching DIMSE status."""
    try:
        data = event.encoded_dataset(include_meta=True)
    except Exception as e:  # a malformed dataset from the peer; pynetdicom gives no narrower type
        log.warning("C-STORE dataset could not be encoded: %s", e)
        return 0xC000
    result = ingest.store_instance(runtime, data, principal=_principal(event), part=1, protocol="dimse")
    if isinstance(result, ingest.FailedInstance):
        status = Dataset()
        status.Status = c_store_status(result.failure_reason)
        status.ErrorComment = result.message[:64]
        log.info("C-STORE refused with status 0x%04X", status.Status)
        return status
    return STATUS_SUCCESS


def build_ae(runtime: Runtime) -> AE:
    settings = runtime.settings
    ae = AE(ae_title=settings.dimse_ae_title)
    ae.maximum_associations = settings.dimse_max_associations
    ae.maximum_pdu_size = 0  # no limit on what we receive; the peer's limit applies to what we send
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
        (evt.EVT_C_ECHO, lambda event: STATUS_SUCCESS),
        (evt.EVT_C_STORE, handle_store, [runtime]),
        (evt.EVT_ACCEPTED, lambda event: _audit_association(runtime, event, accepted=True)),
        (evt.EVT_REJECTED, lambda event: _audit_association(runtime, event, accepted=False)),
    ]


def start(runtime: Runtime, *, block: bool) -> ThreadedAssociationServer | None:
    """Listen on CLINFER_DIMSE_HOST:CLINFER_DIMSE_PORT as CLINFER_DIMSE_AE_TITLE."""
    settings = runtime.settings
    ae = build_ae(runtime)
    log.info("DICOM listener %s on %s:%d", settings.dimse_ae_title, settings.dimse_host, settings.dimse_port)
    return ae.start_server((settings.dimse_host, settings.dimse_port), block=block, evt_handlers=handlers(runtime))
