"""Results as DICOM: per report version, a Structured Report and an occlusion-heatmap Secondary Capture, stored as
instances of the study (so QIDO-RS and WADO-RS find them) and pushed to the destinations the routing rule names,
with bounded retries and a visible failed state.

Everything here is idempotent: the objects' UIDs and bytes derive from the report id and version, so a second
run stores the same objects again (a no-op) and deliveries are unique per report version and destination.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import logging
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from service import metrics
from service.config import Settings
from service.destinations import DeliveryRejected, Destination
from service.destinations.dimse import DimseDestination, TlsClientConfig
from service.destinations.stow import StowDestination
from service.errors import InvalidInput, NotFound, ServiceError, TransientError
from service.flows import ingest, queue
from service.flows.analysis import heatmap_key
from service.flows.runtime import Runtime
from service.ingest import dicom
from service.results import dicom_sr
from service.routing.rules import DimseDestinationSpec, StowDestinationSpec
from service.schemas import SYSTEM_PRINCIPAL, Findings, Principal
from service.store import audit, clinical, reports, studies
from service.store.tables import Delivery, Job, Report, ReportVersion, Study, utcnow

log = logging.getLogger(__name__)


def derived_uid(*parts: str) -> str:
    """A UID under the 2.25 root (ITU-T X.667) made from a hash of ``parts``: the same parts, the same UID."""
    digest = hashlib.sha256("\x1f".join(("clinfer", *parts)).encode()).digest()
    return f"2.25.{int.from_bytes(digest[:16], 'big')}"


@dataclass(frozen=True)
class ResultUids:
    sr_series: str
    sr: str
    heatmap_series: str
    heatmap: str


def result_uids(report_id: str, version: int) -> ResultUids:
    return ResultUids(
        sr_series=derived_uid(report_id, "sr-series"),
        sr=derived_uid(report_id, str(version), "sr"),
        heatmap_series=derived_uid(report_id, "heatmap-series"),
        heatmap=derived_uid(report_id, str(version), "heatmap"),
    )


def _store_result(runtime: Runtime, data: bytes) -> None:
    outcome = ingest.store_instance(
        runtime, data, principal=SYSTEM_PRINCIPAL, part=1, protocol="result", origin="result"
    )
    if isinstance(outcome, ingest.FailedInstance):
        if outcome.transient:  # the task is tried again (the report's results stay pending meanwhile)
            raise TransientError(f"storing a DICOM result failed: {outcome.message}")
        raise ServiceError(f"storing a DICOM result failed: {outcome.message}", code="result-store")


def publish_results(runtime: Runtime, job_id: str) -> None:
    """Make and store the SR (and heatmap SC) of the report version a job produced; then queue its pushes.

    A version already superseded by an amendment is skipped: only the current version is published.
    """
    with runtime.sessions() as session:
        version_row = session.scalar(select(ReportVersion).where(ReportVersion.job_id == job_id))
        if version_row is None:
            log.warning("job %s has no report version: nothing to publish", job_id)
            return
        report = reports.get_or_raise(session=session, report_id=version_row.report_id)
        if report.version != version_row.version or report.dicom_state in ("stored", "failed"):
            return
        study = session.get(Study, report.study_id)
        job = session.get(Job, job_id)
        assert study is not None and job is not None
        source = studies.get_instance(session=session, sop_instance_uid=report.source_sop_instance_uid)
        source_key = source.blob_key if source is not None else None
        findings = Findings.model_validate(version_row.findings)
        version, report_id, created_at = version_row.version, report.id, version_row.created_at
        destinations = [str(d) for d in job.destinations]
        uids = result_uids(report_id, version)
        # an amendment's SR names its predecessor's when that is stored; an SR an earlier run of this publication
        # stored is kept as it is (built again, it could name a predecessor stored since: other bytes under the
        # same UID, refused). Everything else is built the same on every run: stored again, it is a duplicate
        previous_sr = result_uids(report_id, version - 1).sr if version > 1 else None
        stored = studies.get_instances(session=session, sop_instance_uids=[uids.sr, previous_sr]) if previous_sr else {}
        sr_stored = uids.sr in stored
        previous = stored.get(previous_sr) if previous_sr else None
        predecessor = (
            (study.study_instance_uid, uids.sr_series, previous.sop_class_uid, previous.sop_instance_uid)
            if previous is not None
            else None
        )
    sr_uid: str | None = None
    heatmap_uid: str | None = None
    errors: list[str] = []
    try:
        if source_key is None:
            raise NotFound(f"the source instance {findings.source_sop_instance_uid} is no longer stored")
        source_dataset = dicom.parse_instance(
            runtime.blobs.read_bytes(source_key), max_pixels=runtime.settings.max_decoded_pixels
        ).dataset
        if not sr_stored:
            sr = dicom_sr.build_findings_sr(
                source_dataset,
                findings,
                series_instance_uid=uids.sr_series,
                sop_instance_uid=uids.sr,
                instance_number=version,
                content_datetime=created_at,
                predecessor=predecessor,
            )
            _store_result(runtime, dicom_sr.to_part10(sr))
            metrics.DICOM_RESULTS.labels(findings.model.name, "sr").inc()
        sr_uid = uids.sr
        try:
            _store_heatmap(runtime, source_dataset, findings, job_id, uids, version, created_at)
            heatmap_uid = uids.heatmap
        except FileNotFoundError:
            errors.append("no heatmap was made for this version")
        except TransientError:
            raise
        except ServiceError as e:
            errors.append(f"heatmap: {e.message}")
    except TransientError:
        raise
    except ServiceError as e:
        errors.append(f"SR: {e.message}")
    with runtime.sessions.begin() as session:
        # locked, and read again: an amendment committed meanwhile, or another run of this publication (a re-sent
        # or re-delivered task) that recorded its results first, leaves nothing for this run to write
        locked = session.get(Report, report_id, with_for_update=True, populate_existing=True)
        if locked is None or locked.version != version or locked.dicom_state in ("stored", "failed"):
            return
        report = locked
        report.sr_sop_instance_uid, report.heatmap_sop_instance_uid = sr_uid, heatmap_uid
        report.dicom_state = "stored" if sr_uid else "failed"
        report.dicom_error = "; ".join(errors) or None
        created = (
            _create_deliveries(session, report, destinations, lease_seconds=runtime.settings.reconcile_after_seconds)
            if sr_uid
            else []
        )
        audit.append(
            session=session,
            principal=SYSTEM_PRINCIPAL,
            event_type="report.dicom",
            action="C",
            outcome=audit.SUCCESS if sr_uid else audit.SERIOUS_FAILURE,
            entity_type="DiagnosticReport",
            entity_ref=f"report:{report.id}",
            patient_ref=clinical.patient_reference(session=session, patient_id=report.patient_id),
            detail={"version": version, "sr": sr_uid, "heatmap": heatmap_uid, "errors": errors},
        )
    if errors:
        log.warning("DICOM results of report %s v%d: %s", report_id, version, "; ".join(errors))
    for delivery_id in created:
        _send_delivery(delivery_id)
    if sr_uid:
        runtime.blobs.delete(heatmap_key(job_id))


def _store_heatmap(
    runtime: Runtime,
    source_dataset: Any,
    findings: Findings,
    job_id: str,
    uids: ResultUids,
    version: int,
    created_at: dt.datetime,
) -> None:
    """Make and store the heatmap Secondary Capture of a report version, from the map its inference left.

    Raises:
        FileNotFoundError: no heatmap was made for the version.
    """
    with np.load(io.BytesIO(runtime.blobs.read_bytes(heatmap_key(job_id)))) as arrays:
        heatmap, finding_index = arrays["heatmap"], int(arrays["finding_index"])
    sc = dicom_sr.build_heatmap_sc(
        source_dataset,
        heatmap,
        finding_display=findings.findings[finding_index].display,
        model=findings.model,
        series_instance_uid=uids.heatmap_series,
        sop_instance_uid=uids.heatmap,
        instance_number=version,
        content_datetime=created_at,
    )
    _store_result(runtime, dicom_sr.to_part10(sc))
    metrics.DICOM_RESULTS.labels(findings.model.name, "heatmap").inc()


def _create_deliveries(session: Session, report: Report, destinations: list[str], *, lease_seconds: float) -> list[str]:
    """Pending deliveries, one per destination; sent at once, so the sweeper waits ``lease_seconds`` first."""
    lease = dt.timedelta(seconds=lease_seconds)
    created = []
    for name in destinations:
        exists = session.scalar(
            select(Delivery.id).where(
                Delivery.report_id == report.id,
                Delivery.report_version == report.version,
                Delivery.destination == name,
            )
        )
        if exists is None:
            delivery = Delivery(
                id=str(uuid.uuid4()),
                report_id=report.id,
                report_version=report.version,
                destination=name,
                state="pending",
                attempts=0,
                next_attempt_at=utcnow() + lease,
            )
            session.add(delivery)
            created.append(delivery.id)
    return created


def _send_delivery(delivery_id: str) -> None:
    try:
        queue.send(queue.DELIVER_TASK, delivery_id, queue=queue.RESULTS_QUEUE)
    except Exception as e:
        log.warning("enqueue of delivery %s failed, the sweeper will retry: %s", delivery_id, e)


def destination_for(name: str, spec: DimseDestinationSpec | StowDestinationSpec) -> Destination:
    """A transport client for a configured destination."""
    if isinstance(spec, DimseDestinationSpec):
        tls = (
            TlsClientConfig(ca_file=spec.tls_ca, cert_file=spec.tls_cert, key_file=spec.tls_key)
            if spec.tls_ca is not None
            else None
        )
        return DimseDestination(
            name=name,
            host=spec.host,
            port=spec.port,
            called_ae_title=spec.ae_title,
            calling_ae_title=spec.calling_ae_title,
            timeout=spec.timeout_seconds,
            tls=tls,
        )
    token = spec.bearer_token_file.read_text().strip() if spec.bearer_token_file is not None else None
    return StowDestination(
        name=name, url=spec.url, bearer_token=token, timeout=spec.timeout_seconds, verify=spec.verify_tls
    )


def deliver(runtime: Runtime, delivery_id: str) -> None:
    """One try of one push. A refusal fails it at once; a transient error is retried with exponential back-off
    (from CLINFER_DELIVERY_RETRY_SECONDS) until CLINFER_DELIVERY_MAX_ATTEMPTS tries, then it fails visibly; so does
    an unexpected error (a fault of ours or of a transport library: retrying would repeat it).

    Each try is numbered when it claims the row (``attempts``), and records its outcome only while it is still the
    latest try: a re-sent task that claimed the row meanwhile (the sweeper re-sends a try that outlives the
    reconcile period) owns the outcome, so a late try cannot turn "delivered" back into "pending", nor audit twice.
    """
    settings = runtime.settings
    with runtime.sessions.begin() as session:
        delivery = session.get(Delivery, delivery_id, with_for_update=True, populate_existing=True)
        if delivery is None or delivery.state != "pending":
            return
        name, version, report_id = delivery.destination, delivery.report_version, delivery.report_id
        if delivery.attempts >= settings.delivery_max_attempts:  # the last tries ended with their worker
            gave_up = f"no outcome was recorded for the last of {delivery.attempts} tries (its worker stopped)"
            _record_push(
                session, delivery, state="failed", error=gave_up, attempts=delivery.attempts, settings=settings
            )
            metrics.DELIVERIES.labels(name, "failed").inc()
            log.warning("push of report %s v%d to %s: %s", report_id, version, name, gave_up)
            return
        delivery.attempts += 1
        # while this try runs, the sweeper leaves it alone; if the worker dies, it is tried again after this
        delivery.next_attempt_at = utcnow() + dt.timedelta(seconds=settings.reconcile_after_seconds)
        attempts = delivery.attempts
        uids = result_uids(report_id, version)
        keys = [
            instance.blob_key
            for uid in (uids.sr, uids.heatmap)
            if (instance := studies.get_instance(session=session, sop_instance_uid=uid)) is not None
        ]
    spec = runtime.routing.destinations.get(name)
    state, error = "delivered", None
    try:
        if spec is None:
            raise DeliveryRejected(f"destination {name} is no longer configured", destination=name)
        if not keys:
            raise DeliveryRejected(f"report {report_id} v{version} has no stored DICOM results", destination=name)
        destination_for(name, spec).send([runtime.blobs.read_bytes(key) for key in keys])
    except TransientError as e:
        error = e.message
        state = "failed" if attempts >= settings.delivery_max_attempts else "pending"
    except ServiceError as e:  # DeliveryRejected and any other refusal: retrying will not help
        state, error = "failed", e.message
    except OSError as e:  # an unreadable token file or blob
        state, error = "failed", f"{type(e).__name__}: {e}"
    except Exception as e:
        log.exception("push of report %s v%d to %s failed unexpectedly", report_id, version, name)
        state, error = "failed", f"internal error ({type(e).__name__}: {e}); see the worker log"
    with runtime.sessions.begin() as session:
        delivery = session.get(Delivery, delivery_id, with_for_update=True, populate_existing=True)
        assert delivery is not None
        if delivery.attempts != attempts or delivery.state != "pending":
            log.warning(
                "push of report %s v%d to %s (try %d): a later try owns the outcome; this one was %s",
                report_id,
                version,
                name,
                attempts,
                state,
            )
            return
        _record_push(session, delivery, state=state, error=error, attempts=attempts, settings=settings)
    metrics.DELIVERIES.labels(name, "retry" if state == "pending" else state).inc()
    if error:
        log.warning("push of report %s v%d to %s (try %d): %s", report_id, version, name, attempts, error)


def retry_delay(settings: Settings, attempts: int) -> dt.timedelta:
    """How long a push waits after its ``attempts``-th try failed: doubling from CLINFER_DELIVERY_RETRY_SECONDS, at
    most CLINFER_DELIVERY_RETRY_MAX_SECONDS."""
    doublings = min(attempts - 1, 64)  # 2**64 times any positive first back-off is past every maximum
    seconds = min(settings.delivery_retry_seconds * 2.0**doublings, settings.delivery_retry_max_seconds)
    return dt.timedelta(seconds=seconds)


def _record_push(
    session: Session, delivery: Delivery, *, state: str, error: str | None, attempts: int, settings: Settings
) -> None:
    """A try's outcome on the (locked) delivery row; a final one is audited."""
    delivery.state, delivery.last_error = state, error
    delivery.next_attempt_at = utcnow() + retry_delay(settings, attempts) if state == "pending" else None
    if state == "pending":
        return
    report = session.get(Report, delivery.report_id)  # its patient, for the audit (a report is never deleted)
    assert report is not None
    _audit_push(
        session,
        SYSTEM_PRINCIPAL,
        delivery,
        report,
        event_type="report.push",
        outcome=audit.SUCCESS if state == "delivered" else audit.SERIOUS_FAILURE,
        detail={"attempts": attempts, "error": error},
    )


def _audit_push(
    session: Session,
    principal: Principal,
    delivery: Delivery,
    report: Report,
    *,
    event_type: str,
    outcome: str = audit.SUCCESS,
    detail: dict[str, Any],
) -> None:
    """An event about one push of a report version's results (its outcome, or a request to send it again)."""
    audit.append(
        session=session,
        principal=principal,
        event_type=event_type,
        action="E",
        outcome=outcome,
        entity_type="DiagnosticReport",
        entity_ref=f"report:{report.id}",
        patient_ref=clinical.patient_reference(session=session, patient_id=report.patient_id),
        detail={"destination": delivery.destination, "version": delivery.report_version, **detail},
    )


def sweep_results(runtime: Runtime, *, limit: int = 100) -> tuple[int, int]:
    """Re-ask for DICOM results still pending after the reconcile period, and send pushes that are due.

    Returns:
        (publications re-sent, deliveries sent).
    """
    now = utcnow()
    stale = now - dt.timedelta(seconds=runtime.settings.reconcile_after_seconds)
    with runtime.sessions.begin() as session:
        pending_reports = session.scalars(
            select(Report).where(Report.dicom_state == "pending", Report.dicom_requested_at < stale).limit(limit)
        )
        republish = []
        for report in pending_reports:
            report.dicom_requested_at = now  # one re-send per reconcile period
            republish.append(report.job_id)
        due = list(
            session.scalars(  # rows another sweeper is re-sending are skipped, not sent twice
                select(Delivery)
                .where(Delivery.state == "pending", Delivery.next_attempt_at <= now)
                .order_by(Delivery.next_attempt_at)
                .limit(limit)
                .with_for_update(skip_locked=True)
            )
        )
        for delivery in due:
            delivery.next_attempt_at = now + dt.timedelta(seconds=runtime.settings.reconcile_after_seconds)
        due_ids = [d.id for d in due]
    for job_id in republish:
        try:
            queue.send(queue.PUBLISH_TASK, job_id, queue=queue.RESULTS_QUEUE)
        except Exception as e:
            log.warning("re-enqueue of the results of job %s failed: %s", job_id, e)
    for delivery_id in due_ids:
        _send_delivery(delivery_id)
    return len(republish), len(due_ids)


DELIVERY_STATES = ("pending", "delivered", "failed")


def list_deliveries(
    *, session: Session, state: str | None = None, destination: str | None = None, limit: int = 50, offset: int = 0
) -> list[tuple[Delivery, Report, Study]]:
    """The most recently changed pushes first, each with its report and study, in one SELECT.

    Raises:
        InvalidInput: ``state`` is not one of :data:`DELIVERY_STATES`.
    """
    if state is not None and state not in DELIVERY_STATES:
        raise InvalidInput(f"state must be one of {', '.join(DELIVERY_STATES)}")
    query = (
        select(Delivery, Report, Study)
        .join(Report, Report.id == Delivery.report_id)
        .join(Study, Study.id == Report.study_id)
    )
    if state is not None:
        query = query.where(Delivery.state == state)
    if destination is not None:
        query = query.where(Delivery.destination == destination)
    query = query.order_by(Delivery.updated_at.desc(), Delivery.id).limit(limit).offset(offset)
    return [(delivery, report, study) for delivery, report, study in session.execute(query)]


def retry_failed_deliveries(
    runtime: Runtime, *, principal: Principal, destination: str | None = None, limit: int = 1000
) -> list[str]:
    """Try the failed pushes of the reports' current versions again, from their first try (after a peer's outage
    outlasted the tries, say), at most ``limit`` of them, oldest failure first; each is audited as re-sent for
    ``principal``. A push to a destination no longer configured, or of a version since amended, stays failed.

    Returns:
        The ids of the deliveries re-sent (pending again, their tasks enqueued).

    Raises:
        InvalidInput: ``destination`` is not configured.
    """
    configured = sorted(runtime.routing.destinations)
    if destination is not None and destination not in configured:
        raise InvalidInput(
            f"no destination {destination!r} is configured (configured: {', '.join(configured) or 'none'})"
        )
    names = [destination] if destination is not None else configured
    lease = dt.timedelta(seconds=runtime.settings.reconcile_after_seconds)
    with runtime.sessions.begin() as session:
        failed = [
            (delivery, report)
            for delivery, report in session.execute(  # a row another request is re-sending is left to it
                select(Delivery, Report)
                .join(Report, Report.id == Delivery.report_id)
                .where(
                    Delivery.state == "failed",
                    Delivery.report_version == Report.version,
                    Delivery.destination.in_(names),
                )
                .order_by(Delivery.updated_at, Delivery.id)
                .limit(limit)
                .with_for_update(of=Delivery, skip_locked=True)
            )
        ]
        clinical.remember_patients(session=session, patient_ids=[report.patient_id for _, report in failed])
        for delivery, report in failed:
            delivery.state, delivery.attempts = "pending", 0
            delivery.next_attempt_at = utcnow() + lease  # sent at once below; the sweeper's if that send is lost
            _audit_push(
                session,
                principal,
                delivery,
                report,
                event_type="report.push-retry",
                detail={"last_error": delivery.last_error},
            )
        ids = [delivery.id for delivery, _ in failed]
    for delivery_id in ids:
        _send_delivery(delivery_id)
    if ids:
        log.info("%d failed pushes re-sent (destination %s)", len(ids), destination or "any")
    return ids


def deliveries_of(*, session: Session, report: Report) -> list[Delivery]:
    return list(
        session.scalars(
            select(Delivery)
            .where(Delivery.report_id == report.id)
            .order_by(Delivery.report_version, Delivery.destination)
        )
    )


def dicom_json(*, session: Session, report: Report, study_instance_uid: str) -> dict[str, Any]:
    """The DICOM results of a report's current version, where to retrieve them, and their pushes."""
    objects: dict[str, dict[str, str] | None] = {}
    for kind, uid in (("sr", report.sr_sop_instance_uid), ("heatmap", report.heatmap_sop_instance_uid)):
        instance = studies.get_instance(session=session, sop_instance_uid=uid) if uid else None
        if instance is None:
            objects[kind] = None
            continue
        series_uid = instance.series.series_instance_uid
        path = f"/dicomweb/studies/{study_instance_uid}/series/{series_uid}/instances/{instance.sop_instance_uid}"
        objects[kind] = {
            "sop_class_uid": instance.sop_class_uid,
            "series_instance_uid": series_uid,
            "sop_instance_uid": instance.sop_instance_uid,
            "wado_rs": path,
        }
    return {
        "state": report.dicom_state,
        "error": report.dicom_error,
        **objects,
        "deliveries": [delivery_json(d) for d in deliveries_of(session=session, report=report)],
    }


def delivery_json(delivery: Delivery) -> dict[str, Any]:
    """One push as the API shows it: where to, which version, its state, tries, last error and next try."""
    return {
        "destination": delivery.destination,
        "report_version": delivery.report_version,
        "state": delivery.state,
        "attempts": delivery.attempts,
        "last_error": delivery.last_error,
        "next_attempt_at": delivery.next_attempt_at.isoformat()
        if delivery.next_attempt_at and delivery.state == "pending"
        else None,
        "updated_at": delivery.updated_at.isoformat(),
    }
