"""Analysis flows: study -> jobs (routing), jobs -> queue, job execution stage by stage, sweeping."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime as dt
import io
import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy.orm import Session

from service import metrics
from service.errors import InvalidInput, NotFound, ServiceError, TransientError
from service.flows import queue, report_fhir
from service.flows.runtime import Runtime
from service.inference import pipeline
from service.inference.batcher import Arrival, DynamicBatcher, warm_up_runner
from service.ingest import dicom
from service.routing.rules import QUEUE_PRIORITY, InstanceAttributes, Priority
from service.schemas import SYSTEM_PRINCIPAL, JobStage, JobState, Principal, StudyStatus
from service.store import audit, clinical, fhir_store, jobs, reports, studies
from service.store.tables import Instance, Job, Series, Study, utcnow

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AnalysisRequest:
    study_instance_uid: str
    status: str
    jobs: list[Job]
    reason: str | None
    # routes still waiting: seconds until the first of them may be due (0: waiting on a running analysis)
    waiting_seconds: float | None = None


def instance_attributes(pairs: list[tuple[Series, Instance]]) -> list[InstanceAttributes]:
    return [
        InstanceAttributes(
            sop_instance_uid=instance.sop_instance_uid,
            sop_class_uid=instance.sop_class_uid,
            modality=series.modality,
            body_part_examined=series.body_part_examined,
            rows=instance.rows,
            columns=instance.columns,
            photometric_interpretation=instance.photometric_interpretation,
            series_instance_uid=series.series_instance_uid,
            series_description=series.series_description,
            view_position=instance.view_position,
            manufacturer=instance.manufacturer,
            calling_ae_title=instance.calling_ae_title,
            instance_number=instance.instance_number,
        )
        for series, instance in pairs
    ]


def request_analysis(
    runtime: Runtime, *, study_instance_uid: str, principal: Principal, trigger: str
) -> AnalysisRequest:
    """Create the jobs the routing rules ask for (idempotently) and enqueue the new ones after commit.

    A model whose job already ran gets a new revision (its report will be amended) only when instances its rule
    accepts arrived after that job was created, or, on an explicit request, when that job failed; while such a
    job is still running the amendment waits, and the study stays due for the sweeper.

    Args:
        trigger: "request" (explicit: now) or "stable" (the sweeper: each route waits for its rule's
            stable_seconds of quiet, default CLINFER_STUDY_STABLE_SECONDS).
    """
    manifests = runtime.manifests()
    with runtime.sessions.begin() as session:
        # the study locked (as a received instance locks it): an instance stored at this moment is either seen
        # below or stamped after this request, so the study is due again; the patient held: the audit below
        # finds it in the session
        study, patient = studies.get_with_patient_or_raise(
            session=session, study_instance_uid=study_instance_uid, for_update=True
        )
        now = utcnow()
        pairs = studies.instances_of(session=session, study=study, origin="received")
        received_at = {instance.sop_instance_uid: instance.received_at for _, instance in pairs}
        attributes = instance_attributes(pairs)
        routing = runtime.routing.route_study(manifests, attributes)
        quiet_seconds = (now - study.last_instance_at).total_seconds()
        ordered_stat = _ordered_stat(session, study)
        created: list[Job] = []
        all_jobs: list[Job] = []
        waiting = 0
        waiting_seconds: float | None = None
        for route in routing.routes:
            needed = runtime.settings.study_stable_seconds if route.stable_seconds is None else route.stable_seconds
            if trigger == "stable" and quiet_seconds < needed:
                waiting += 1
                left = needed - quiet_seconds
                waiting_seconds = left if waiting_seconds is None else min(waiting_seconds, left)
                continue
            latest = jobs.latest(
                session=session, study=study, model_name=route.model_name, model_version=route.model_version
            )
            revision = 1
            if latest is not None:
                accepted = runtime.routing.matching_instances(manifests, route, attributes)
                newer = [i for i in accepted if received_at[i.sop_instance_uid] > latest.created_at]
                all_jobs.append(latest)
                # an explicit request runs a failed analysis again (a new revision); the sweeper does not
                retry = trigger == "request" and latest.state == JobState.failed.value
                if not newer and not retry:
                    continue
                if not retry and route.sop_instance_uid == latest.sop_instance_uid:
                    # the rule's selection still reads the image read before (a late instance in a later series
                    # with series: first): an amendment would make the same report again, marked amended
                    continue
                if latest.state not in FINAL_STATES:
                    waiting += 1  # amend once the running analysis has finished
                    waiting_seconds = 0.0
                    continue
                revision = latest.revision + 1
            job, new = jobs.get_or_create(
                session=session,
                study=study,
                model_name=route.model_name,
                model_version=route.model_version,
                revision=revision,
                # a rule's STAT, or the order's: an AI read ordered stat, asap or urgent goes first in the queues
                priority=QUEUE_PRIORITY[Priority.stat] if ordered_stat else route.queue_priority,
                rule=route.rule,
                sop_instance_uid=route.sop_instance_uid,
                destinations=list(route.destinations),
                enqueued_at=now,
                created_at=now,
                timings={"enqueued_preprocess": time.time()},
            )
            if latest is not None and latest in all_jobs:
                all_jobs.remove(latest)
            all_jobs.append(job)
            if new:
                created.append(job)
                metrics.JOBS.labels(route.model_name, JobState.queued.value).inc()
        reason = routing.reason()
        previous_status = study.status
        if not routing.routes:
            study.status = StudyStatus.no_route.value
        elif created:
            study.status = StudyStatus.analyzing.value
        study.status_reason = reason
        if not created and not waiting and study.status == StudyStatus.receiving.value:
            # reopened by an instance that changes no analysis (one the rules do not take, or one the selection
            # does not read): the status its analyses left, not "receiving" for good
            _resettle(session, study)
        if not waiting:
            study.analysis_requested_at = now
        if trigger == "request" or created or study.status != previous_status:
            audit.append(
                session=session,
                principal=principal,
                event_type="study.analyze",
                action="E",
                entity_type="ImagingStudy",
                entity_ref=f"study:{study_instance_uid}",
                patient_ref=clinical.patient_reference(session=session, patient_id=study.patient_id),
                detail={
                    "trigger": trigger,
                    "jobs": [j.id for j in all_jobs],
                    "new_jobs": len(created),
                    "routes": [
                        {"model": f"{r.model_name}:{r.model_version}", "rule": r.rule, "priority": r.priority.value}
                        for r in routing.routes
                    ],
                    "waiting": waiting,
                    "reason": reason,
                },
            )
        if not routing.routes and previous_status != StudyStatus.no_route.value:
            metrics.NO_ROUTE.inc()
        status = study.status
        to_send = [(job.id, job.priority) for job in created]
    for job_id, priority in to_send:
        _enqueue(runtime, job_id, JobStage.preprocess, priority)
    return AnalysisRequest(study_instance_uid, status, all_jobs, reason, waiting_seconds)


# each stage's Celery task and the queue it is sent on
_STAGE_TASKS = {
    JobStage.preprocess: (queue.PREPROCESS_TASK, queue.PREPROCESS_QUEUE),
    JobStage.infer: (queue.INFER_TASK, queue.INFER_QUEUE),
}


def _enqueue(runtime: Runtime, job_id: str, stage: JobStage, priority: int) -> None:
    task, target = _STAGE_TASKS[stage]
    try:
        queue.send(task, job_id, queue=target, priority=priority)
    except Exception as e:  # the broker is down: the job row stays queued and the reconciler sends it later
        log.warning("enqueue of job %s failed, the reconciler will retry: %s", job_id, e)


def _observe_wait(job: Job, queue_name: str, enqueued_key: str, now: float) -> None:
    enqueued = (job.timings or {}).get(enqueued_key)
    if isinstance(enqueued, int | float):
        metrics.QUEUE_WAIT.labels(queue_name).observe(max(0.0, now - enqueued))


def _stamp(job: Job, **values: float | int | str) -> None:
    """Record stage timestamps (epoch seconds) and durations on the job, in the transaction at hand."""
    job.timings = {**(job.timings or {}), **values}


def _inputs_key(job_id: str) -> str:
    return f"jobs/{job_id}/prepared"


def heatmap_key(job_id: str) -> str:
    return f"jobs/{job_id}/heatmap.npz"


def enqueue_results(job_id: str, priority: int) -> None:
    """Ask for the DICOM results of a report version; the sweeper re-asks for any that are missing."""
    try:
        queue.send(queue.PUBLISH_TASK, job_id, queue=queue.RESULTS_QUEUE, priority=priority)
    except Exception as e:
        log.warning("enqueue of the results of job %s failed, the sweeper will retry: %s", job_id, e)


def _set_state(session: Session, job: Job, state: JobState, stage: JobStage) -> None:
    job.state, job.stage = state.value, stage.value
    job.updated_at = utcnow()
    metrics.JOBS.labels(job.model_name, state.value).inc()


FINAL_STATES = (JobState.succeeded.value, JobState.failed.value)


_URGENT_ORDER_PRIORITIES = ("urgent", "asap", "stat")  # FHIR R4 request-priority above routine


def _ordered_stat(session: Session, study: Study) -> bool:
    """Whether the AI-read order linked to the study (a FHIR ServiceRequest) asks for more than routine."""
    if study.order_resource_id is None:
        return False
    order = fhir_store.current(session=session, resource_type="ServiceRequest", resource_id=study.order_resource_id)
    return order is not None and not order.deleted and order.body.get("priority") in _URGENT_ORDER_PRIORITIES


def _resettle(session: Session, study: Study) -> None:
    """The status of a study reopened by an instance that changed no analysis, from its analyses as
    ``_settle_study`` sets it: "analyzing" while one runs; unchanged when it has none."""
    states = _latest_states(jobs.other_states(session=session, study=study, job_id=""))
    if any(state not in FINAL_STATES for state in states):
        study.status = StudyStatus.analyzing.value
    elif states:
        _settle_from(study, states, failure="every analysis failed; see the study's jobs")


def _latest_states(rows: Iterable[tuple[str, str, int, str]]) -> list[str]:
    """The state of each analysis (the latest revision of each model version's job) among (model name, model
    version, revision, state) rows: a revision that an amendment superseded no longer counts."""
    latest: dict[tuple[str, str], tuple[int, str]] = {}
    for name, version, revision, state in rows:
        if (name, version) not in latest or revision > latest[(name, version)][0]:
            latest[(name, version)] = (revision, state)
    return [state for _, state in latest.values()]


def _settle_from(study: Study, states: list[str], *, failure: str | None) -> None:
    """A study's status once all its analyses (``states``, all final) are done: "failed" with ``failure`` when every
    one failed, else "reported" (the reason says how many failed, when some did)."""
    failed = states.count(JobState.failed.value)
    if failed == len(states):
        study.status, study.status_reason = StudyStatus.failed.value, failure
        return
    study.status = StudyStatus.reported.value
    if failed:
        study.status_reason = f"{failed} of {len(states)} analyses failed; see the study's jobs"


def _settle_study(session: Session, study: Study, job: Job, *, failure: str | None = None) -> None:
    """The study's status once ``job`` (in its final state, in this transaction) was the last of its analyses to
    finish: "reported" when any stored a report (the reason says how many failed, when some did), "failed" when all
    failed (the reason is this one's error). While another still runs, nothing changes. An analysis is the latest
    revision of the study's job for one model version: a revision that an amendment superseded no longer counts.

    The caller holds the study's row locked, so that the states read here include any job of the study that
    finished in a transaction committed meanwhile.
    """
    others = jobs.other_states(session=session, study=study, job_id=job.id)
    states = _latest_states([(job.model_name, job.model_version, job.revision, job.state), *others])
    if any(state not in FINAL_STATES for state in states):
        return
    _settle_from(study, states, failure=failure)


def _fail(runtime: Runtime, job_id: str, stage: JobStage, error: ServiceError) -> None:
    with runtime.sessions.begin() as session:
        job = jobs.get_or_raise(session=session, job_id=job_id, for_update=True)
        if job.state in FINAL_STATES:  # a duplicate delivery already finished the job: keep its outcome
            return
        _set_state(session, job, JobState.failed, stage)
        job.error_code, job.error_message = error.code, error.message
        study = session.get(Study, job.study_id, with_for_update=True)  # locked: see _settle_study
        assert study is not None
        _settle_study(session, study, job, failure=error.message)
        audit.append(
            session=session,
            principal=SYSTEM_PRINCIPAL,
            event_type="job.failed",
            action="E",
            outcome=audit.SERIOUS_FAILURE,
            entity_type="Task",
            entity_ref=f"job:{job.id}",
            patient_ref=clinical.patient_reference(session=session, patient_id=study.patient_id),
            detail={"stage": stage.value, "code": error.code, "model": job.model_name},
        )
    metrics.JOB_FAILURES.labels(job.model_name, stage.value, error.code).inc()
    log.error("job %s failed at %s: %s", job_id, stage.value, error.message)
    _drop_derived(runtime, job_id)


def _drop_derived(runtime: Runtime, job_id: str) -> None:
    """Remove a failed job's prepared inputs and heatmap: derived from patient data, and nothing will read them."""
    for key in (_inputs_key(job_id), heatmap_key(job_id)):
        runtime.blobs.delete(key)


def record_unexpected_failure(runtime: Runtime, job_id: str, stage: JobStage, error: Exception) -> None:
    """A bug or an unforeseen error in a stage: the job fails visibly instead of being retried for ever."""
    _fail(
        runtime,
        job_id,
        stage,
        ServiceError(f"internal error ({type(error).__name__}); see the worker log", code="internal"),
    )


def record_transient_error(runtime: Runtime, job_id: str, stage: JobStage, error: TransientError) -> None:
    """Note on an active job why its stage is to be tried again (``GET /v1/jobs/{id}`` shows it, code "transient",
    while the job waits), and so move its ``updated_at`` on: a job in Celery's back-off is not lost. The note is
    cleared when the job next starts pre-processing or stores its report; the reconciler quotes it when it gives
    the job up (see :func:`sweep`). Only a stage that failed pays this write.

    A failure to write the note (the database may be what failed) is logged and left: the retry matters more.
    """
    try:
        with runtime.sessions.begin() as session:
            job = jobs.get(session=session, job_id=job_id, for_update=True)
            if job is None or job.state in FINAL_STATES:
                return
            job.error_code, job.error_message = error.code, error.message
    except Exception as e:  # the task is retried whether or not its reason was written
        log.warning("job %s: the %s error in %s could not be recorded: %s", job_id, error.code, stage.value, e)


RETRIES_EXHAUSTED = "retries-exhausted"


def _give_up(runtime: Runtime, job_id: str, stage: JobStage, resent: int, last_error: str | None) -> None:
    """Fail a job that the reconciler sent again ``resent`` times (``CLINFER_JOB_MAX_RESENDS``) without its stage
    finishing: terminal, with its stage and its last recorded error, rather than active for ever."""
    cause = f"last error: {last_error}" if last_error else "no error was recorded (its task was lost each time)"
    message = f"the {stage.value} stage did not finish after {resent} re-sends; {cause}"
    _fail(runtime, job_id, stage, ServiceError(message, code=RETRIES_EXHAUSTED))


def _study_datetime(study: Study) -> dt.datetime:
    if study.study_date is None:
        return study.created_at
    clock = dt.time(0, 0)
    if study.study_time:
        digits = study.study_time.split(".")[0]
        try:
            clock = dt.time(int(digits[0:2] or 0), int(digits[2:4] or 0), int(digits[4:6] or 0))
        except ValueError:
            pass
    return dt.datetime.combine(study.study_date, clock, tzinfo=dt.UTC)


def preprocess_job(runtime: Runtime, job_id: str) -> None:
    """Stage 1 (CPU): decode the routed image, build the clinical vector, keep both for the infer stage.

    Idempotent: a finished job, or one whose inputs are ready for the infer stage, is left alone; a re-run rewrites
    the same inputs. States only move forward: queued -> preprocessing -> inferring -> succeeded | failed.
    """
    with runtime.sessions.begin() as session:
        job, study, patient = jobs.get_with_study(session=session, job_id=job_id, for_update=True)
        if job.state in FINAL_STATES:
            return
        if job.state == JobState.inferring.value and runtime.blobs.exists(_inputs_key(job_id)):
            return  # a duplicate delivery: the infer stage has what it needs (the reconciler re-sends infer if lost)
        job.attempts += 1
        if job.error_code is not None:  # a transient error noted by an earlier try: this try is under way
            job.error_code = job.error_message = None
        _set_state(session, job, JobState.preprocessing, JobStage.preprocess)
        preprocess_started = time.time()
        _observe_wait(job, queue.PREPROCESS_QUEUE, "enqueued_preprocess", preprocess_started)
        _stamp(job, preprocess_started=preprocess_started)
        model = runtime.registry.models.get(job.model_name)
        pairs = studies.instances_of(session=session, study=study, origin="received")
        source_uid = job.sop_instance_uid
        if source_uid is None and model is not None:  # a job made before routing recorded its instance
            routing = runtime.routing.route_study({model.manifest.name: model.manifest}, instance_attributes(pairs))
            source_uid = routing.routes[0].sop_instance_uid if routing.routes else None
        priority = job.priority
        blob_keys = {i.sop_instance_uid: i.blob_key for _, i in pairs}
        context = clinical.clinical_context(session=session, patient=patient)
        study_at = _study_datetime(study)
    started = time.perf_counter()
    try:
        if model is None:
            raise NotFound(f"model {job.model_name} is no longer served")
        if source_uid is None or source_uid not in blob_keys:
            raise InvalidInput("no instance of the study matches the model any more")
        decoded = dicom.decode_image(
            runtime.blobs.read_bytes(blob_keys[source_uid]), max_pixels=runtime.settings.max_decoded_pixels
        )
        prepared = pipeline.pre_process(
            model.manifest,
            pixels=decoded.pixels,
            photometric_interpretation=decoded.photometric_interpretation,
            window=decoded.window,
            context=context,
            study_at=study_at,
            source_sop_instance_uid=source_uid,
        )
    except ServiceError as e:
        _fail(runtime, job_id, JobStage.preprocess, e)
        return
    # not fsync'd: the inputs can be made again, and a missing or damaged blob sends the job back to preprocess
    runtime.blobs.put_bytes(_inputs_key(job_id), pipeline.encode_prepared(prepared), durable=False)
    preprocess_seconds = time.perf_counter() - started
    metrics.PREPROCESS_DURATION.labels(job.model_name).observe(preprocess_seconds)
    timings = {**(job.timings or {}), "preprocess_seconds": round(preprocess_seconds, 6), "enqueued_infer": time.time()}
    with runtime.sessions.begin() as session:
        if not jobs.advance(
            session=session,
            job_id=job_id,
            from_state=JobState.preprocessing,
            state=JobState.inferring,
            stage=JobStage.infer,
            timings=timings,
        ):
            return  # another delivery moved the job on meanwhile
    metrics.JOBS.labels(job.model_name, JobState.inferring.value).inc()
    _enqueue(runtime, job_id, JobStage.infer, priority)


def _back_to_preprocess(runtime: Runtime, job_id: str) -> None:
    """The prepared inputs are gone (never made, or removed by a duplicate that finished) or unusable (damaged, or
    not of the model's shapes): pre-process again, unless the job is finished, rather than wait for them for ever."""
    with runtime.sessions.begin() as session:
        job = jobs.get_or_raise(session=session, job_id=job_id, for_update=True)
        if job.state in FINAL_STATES:
            return
        _set_state(session, job, JobState.queued, JobStage.preprocess)
        priority = job.priority
    log.warning("job %s: no usable prepared inputs for the infer stage; pre-processing again", job_id)
    _enqueue(runtime, job_id, JobStage.preprocess, priority)


@dataclass(frozen=True)
class Prediction:
    logits: np.ndarray
    batch_size: int
    batch_wait_seconds: float
    inference_seconds: float
    provider: str


def _batcher(runtime: Runtime, manifest: Any, runner: Any, version: str) -> DynamicBatcher | None:
    """The model version's dynamic batcher in this process (made on first use); None when batching is off."""
    settings = runtime.settings
    if not settings.batching:
        return None
    return runtime.batchers.get(
        manifest.name,
        version,
        lambda: DynamicBatcher(
            manifest,
            runner,
            version=version,
            max_batch=min(settings.batch_max_size, manifest.batching.max_batch_size)
            if settings.batch_max_size
            else None,
            max_delay_ms=settings.batch_max_delay_ms,
            wait_only_for_announced=True,
        ),
    )


def warm_models(runtime: Runtime) -> None:
    """Load every model's latest version and warm its batcher up, before a worker takes its first infer task, so
    that no study pays the loading, and on a GPU the per-shape algorithm searches (batching off: the runner, at
    batch 1). A model that fails to load is logged and left for the jobs to report."""
    for name, model in sorted(runtime.registry.models.items()):
        version = model.manifest.latest().version
        started = time.perf_counter()
        try:
            runner = runtime.registry.runner(name, version)
            if _batcher(runtime, model.manifest, runner, version) is None:  # made and warmed up when batching is on
                warm_up_runner(model.manifest, runner, version=version, max_batch=1)
        except ServiceError as e:
            log.warning("model %s %s could not be warmed up: %s", name, version, e.message)
            continue
        log.info("model %s %s ready on %s in %.2f s", name, version, runner.provider, time.perf_counter() - started)


def _predict(
    runtime: Runtime,
    manifest: Any,
    runner: Any,
    prepared: pipeline.PreparedInputs,
    *,
    priority: int,
    version: str,
    batcher: DynamicBatcher | None,
    arrival: Arrival | None,
) -> Prediction:
    """One study's logits: through the model's dynamic batcher when there is one, else a batch of one."""
    if batcher is None:
        logits, seconds = pipeline.predict(manifest, runner, [prepared])
        metrics.INFERENCE_DURATION.labels(manifest.name, version, runner.provider).observe(seconds)
        return Prediction(logits[0], 1, 0.0, seconds, runner.provider)
    result = batcher.submit(
        prepared, priority=priority, timeout=runtime.settings.batch_timeout_seconds, arrival=arrival
    )
    return Prediction(
        result.logits, result.batch_size, result.batch_wait_seconds, result.inference_seconds, result.provider
    )


class _ReportSignal:
    """Wakes API requests waiting for a study's report (GET .../report?wait=) when a report of that study is stored,
    in this process (from any thread) or (through ``queue.subscribe_report_events``) by a worker.

    Only the study's own waiters look in the database: with every waiter woken by every report, eight clients
    waiting made eight queries per report stored. ``notify()`` without a study wakes them all (an event that does
    not name its study)."""

    _REMEMBERED = 4096  # studies whose count is kept; a forgotten one reads 0 and at worst wakes its waiter once

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._everyone = 0
        self._studies: collections.OrderedDict[str, int] = collections.OrderedDict()
        # the waiters by study, each a future of its event loop (woken with call_soon_threadsafe; no thread held)
        self._futures: dict[str, set[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]]] = {}

    def notify(self, study_instance_uid: str | None = None) -> None:
        with self._lock:
            if study_instance_uid is None:
                self._everyone += 1
                woken = [w for waiters in self._futures.values() for w in waiters]
            else:
                self._studies[study_instance_uid] = self._studies.pop(study_instance_uid, 0) + 1
                if len(self._studies) > self._REMEMBERED:
                    self._studies.popitem(last=False)
                woken = list(self._futures.get(study_instance_uid, ()))
        for loop, future in woken:
            with contextlib.suppress(RuntimeError):  # that loop has closed: its waiter is gone
                loop.call_soon_threadsafe(_resolve, future)

    async def wait(self, timeout: float, *, since: tuple[int, int], study_instance_uid: str) -> bool:
        """Return when a report of the study (or an event naming none) came after the mark ``since``: True; or
        after ``timeout`` seconds: False. The request waits on its event loop as a future, not in a thread of the
        server's pool: forty such threads, held by waiting clients, stopped every other synchronous endpoint."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        waiter = (loop, future)
        with self._lock:
            if self._mark(study_instance_uid) != since:
                return True
            self._futures.setdefault(study_instance_uid, set()).add(waiter)
        try:
            await asyncio.wait_for(future, timeout)
            return True
        except TimeoutError:
            return False
        finally:
            with self._lock:
                waiters = self._futures.get(study_instance_uid)
                if waiters is not None:
                    waiters.discard(waiter)
                    if not waiters:
                        del self._futures[study_instance_uid]

    def _mark(self, study_instance_uid: str) -> tuple[int, int]:
        return self._everyone, self._studies.get(study_instance_uid, 0)

    def current(self, study_instance_uid: str) -> tuple[int, int]:
        """A mark to pass to ``wait``: take it *before* looking for the report, so that a report stored between
        the look and the wait still wakes the waiter."""
        with self._lock:
            return self._mark(study_instance_uid)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


REPORT_STORED = _ReportSignal()


def job_stage_seconds(timings: dict[str, Any]) -> dict[str, float]:
    """Seconds in each stage from a job's recorded timings (as GET /v1/jobs/{id} shows them); a stage not recorded
    (yet) is left out. The two queue waits run from the enqueue to the stage's start, across processes."""
    spans = {
        "queue_wait_preprocess": ("enqueued_preprocess", "preprocess_started"),
        "queue_wait_infer": ("enqueued_infer", "infer_started"),
        "report": ("store_started", "report_stored"),
    }
    stages = {
        stage: float(timings[end] - timings[start])
        for stage, (start, end) in spans.items()
        if start in timings and end in timings
    }
    for stage in ("preprocess", "batch_wait", "inference", "postprocess"):
        if f"{stage}_seconds" in timings:
            stages[stage] = float(timings[f"{stage}_seconds"])
    return stages


def _observe_stages(model_name: str, timings: dict[str, Any]) -> None:
    """clinfer_job_stage_seconds from a finished job's timings."""
    for stage, seconds in job_stage_seconds(timings).items():
        metrics.JOB_STAGE_SECONDS.labels(model_name, stage).observe(max(0.0, seconds))


def infer_job(runtime: Runtime, job_id: str) -> None:
    """Stage 2 (GPU): run the model on the prepared inputs and store exactly one report per study x model version."""
    with runtime.sessions.begin() as session:  # a read: the store below locks the job
        job = jobs.get_or_raise(session=session, job_id=job_id)
        if job.state in FINAL_STATES:
            return
        model_name, model_version, priority = job.model_name, job.model_version, job.priority
        infer_started = time.time()
        _observe_wait(job, queue.INFER_QUEUE, "enqueued_infer", infer_started)
    try:
        model, version = runtime.registry.version_or_raise(model_name, model_version)
        runner = runtime.registry.runner(model_name, model_version)
        batcher = _batcher(runtime, model.manifest, runner, model_version)
        # announced while its inputs load, so that a batch being formed waits for this study and no other does
        with batcher.arriving() if batcher is not None else contextlib.nullcontext() as arrival:
            try:
                # checked against the manifest: inputs of another shape would fail every study of their batch
                prepared = pipeline.decode_prepared(
                    runtime.blobs.read_bytes(_inputs_key(job_id)), manifest=model.manifest
                )
            except (FileNotFoundError, pipeline.PreparedFormatError) as e:
                log.warning("job %s: prepared inputs unusable (%s)", job_id, e)
                _back_to_preprocess(runtime, job_id)
                return
            batched = _predict(
                runtime,
                model.manifest,
                runner,
                prepared,
                priority=priority,
                version=model_version,
                batcher=batcher,
                arrival=arrival,
            )
        postprocess_started = time.perf_counter()
        findings = pipeline.post_process(
            model.manifest, version, provider=batched.provider, logits=batched.logits, inputs=prepared
        )
        if runtime.settings.dicom_results:
            finding_index = pipeline.heatmap_finding(findings)
            heatmap = pipeline.occlusion_heatmap(model.manifest, runner, prepared, finding_index=finding_index)
            buffer = io.BytesIO()
            np.savez(buffer, heatmap=heatmap, finding_index=np.array(finding_index))
            runtime.blobs.put_bytes(heatmap_key(job_id), buffer.getvalue())
        postprocess_seconds = time.perf_counter() - postprocess_started
    except TransientError:
        raise
    except ServiceError as e:
        _fail(runtime, job_id, JobStage.infer, e)
        return
    with runtime.sessions.begin() as session:
        store_started = time.time()
        # the patient held: the report's FHIR resources and the audit find it in the session
        job, study, patient = jobs.get_with_study(session=session, job_id=job_id, for_update=True, lock_study=True)
        if job.state in FINAL_STATES:  # another run of this job (a re-sent task) finished it: keep its outcome
            if job.state == JobState.failed.value:  # this run wrote them after the failure removed them
                _drop_derived(runtime, job_id)
            return
        study_instance_uid = study.study_instance_uid
        report, created = reports.create_once(
            session=session,
            job=job,
            study=study,
            findings=findings,
            dicom_requested_at=utcnow() if runtime.settings.dicom_results else None,
        )
        if created:
            session.flush()
            report_fhir.publish(session, report=report, study=study, new_version=True)
        # the job's state and its timings in one UPDATE (its row is locked since the SELECT), before the audit
        _set_state(session, job, JobState.succeeded, JobStage.store)
        if job.error_code is not None:  # a transient error noted on the way: no longer why the job waits
            job.error_code = job.error_message = None
        _stamp(
            job,
            infer_started=infer_started,
            batch_size=batched.batch_size,
            batch_wait_seconds=round(batched.batch_wait_seconds, 6),
            inference_seconds=round(batched.inference_seconds, 6),
            postprocess_seconds=round(postprocess_seconds, 6),
            provider=batched.provider,
            store_started=store_started,
            report_stored=time.time(),
        )
        _settle_study(session, study, job)  # after the job's state and timings: they go in one UPDATE
        if created:
            amended = report.version > 1
            audit.append(  # last: the audit head is locked from here to the commit
                session=session,
                principal=SYSTEM_PRINCIPAL,
                event_type="report.amend" if amended else "report.create",
                action="U" if amended else "C",
                entity_type="DiagnosticReport",
                entity_ref=f"report:{report.id}",
                patient_ref=clinical.patient_reference(session=session, patient_id=study.patient_id),
                detail={
                    "study": f"study:{study.study_instance_uid}",
                    "model": model_name,
                    "version": model_version,
                    "report_version": report.version,
                    "positive": [f.code for f in findings.findings if f.positive],
                },
            )
        timings = dict(job.timings or {})
    _observe_stages(model_name, timings)
    if created:
        REPORT_STORED.notify(study_instance_uid)
        queue.publish_report_event(study_instance_uid)
        metrics.REPORTS.labels(model_name, model_version).inc()
        if amended:
            metrics.REPORT_AMENDMENTS.labels(model_name).inc()
        if runtime.settings.dicom_results:
            enqueue_results(job_id, priority)
    runtime.blobs.delete(_inputs_key(job_id))


_SWEEP_PAGE = 100  # stable studies read per query
# study UID -> (its last_instance_at, when its first waiting route is due), from this process's last round: a study
# waiting for a rule's longer quiet period is not locked and routed again every round until then
_NOT_DUE: dict[str, tuple[dt.datetime, dt.datetime]] = {}


def sweep(runtime: Runtime) -> tuple[int, int]:
    """Analyze studies that have been stable long enough, and re-enqueue jobs that were committed but lost.

    A job is lost when it has not moved for ``CLINFER_RECONCILE_AFTER_SECONDS`` while its stage's queue is empty
    (with a queue backlog it may still be waiting there: sent again, it would only lengthen the backlog). Each
    sweeper claims the lost jobs it sends again, so two sweepers never send one job twice. No job is sent again
    while the broker cannot be read. A job already sent again ``CLINFER_JOB_MAX_RESENDS`` times is failed instead
    (code "retries-exhausted", its stage, and the last transient error noted on it): retries are bounded.

    Returns:
        (stable studies whose analysis was requested, whether or not it could start; jobs re-enqueued).
    """
    now = utcnow()
    stable_before = now - dt.timedelta(
        seconds=runtime.routing.min_stable_seconds(runtime.settings.study_stable_seconds)
    )
    requested = 0
    after: tuple[dt.datetime, int] | None = None
    not_due: dict[str, tuple[dt.datetime, dt.datetime]] = {}
    while True:  # page by page: studies still waiting for their rule's quiet period never hide the ones behind
        with runtime.sessions() as session:
            page = studies.stable_unanalyzed(
                session=session,
                stable_before=stable_before,
                ordered_only=not runtime.settings.analyze_unordered,
                after=after,
                limit=_SWEEP_PAGE,
            )
            stable = [(s.study_instance_uid, s.last_instance_at) for s in page]
            if page:
                after = (page[-1].last_instance_at, page[-1].id)
        for study_uid, last_instance_at in stable:
            seen, due_at = _NOT_DUE.get(study_uid, (None, None))
            if seen == last_instance_at and due_at is not None and now < due_at:
                not_due[study_uid] = (seen, due_at)  # nothing received since, and its rule's quiet time not over
                continue
            requested += 1
            try:
                request = request_analysis(
                    runtime, study_instance_uid=study_uid, principal=SYSTEM_PRINCIPAL, trigger="stable"
                )
                if request.waiting_seconds:
                    not_due[study_uid] = (last_instance_at, now + dt.timedelta(seconds=request.waiting_seconds))
            except ServiceError as e:
                log.warning("automatic analysis of a stable study failed: %s", e.message)
            except Exception:  # one study's error (a deadlock, a lock timeout) leaves the others and the lost jobs
                log.exception("automatic analysis of stable study %s failed", study_uid)
        if len(page) < _SWEEP_PAGE:
            break
    _NOT_DUE.clear()  # only the studies still waiting are remembered
    _NOT_DUE.update(not_due)
    depths = _queue_depths(runtime)
    # a backlog: the job may still be waiting there. Unreadable: the broker is away, a re-send would be lost (and
    # would count towards the job's bound for nothing)
    skipped = {name for name, depth in depths.items() if depth is None or depth > 0}
    max_resends = runtime.settings.job_max_resends
    lost: list[tuple[str, JobStage, int]] = []
    exhausted: list[tuple[str, JobStage, int, str | None]] = []
    with runtime.sessions.begin() as session:
        older_than = now - dt.timedelta(seconds=runtime.settings.reconcile_after_seconds)
        for job in jobs.lost(session=session, older_than=older_than):
            stage = JobStage.infer if job.stage == JobStage.infer.value else JobStage.preprocess
            if _STAGE_TASKS[stage][1] in skipped:
                continue
            resent = int((job.timings or {}).get("resent", 0))
            if resent >= max_resends:  # claimed like a re-send, so that one sweeper alone gives it up
                if jobs.claim_lost(session=session, job=job, older_than=older_than, now=now, timings=job.timings or {}):
                    last_error = job.error_message if job.error_code == TransientError.code else None
                    exhausted.append((job.id, JobStage(job.stage), resent, last_error))
                continue
            timings = {**(job.timings or {}), "resent": resent + 1}
            if jobs.claim_lost(session=session, job=job, older_than=older_than, now=now, timings=timings):
                lost.append((job.id, stage, job.priority))  # one re-send per reconcile period
    for job_id, stage, priority in lost:
        _enqueue(runtime, job_id, stage, priority)
        metrics.RECONCILED_JOBS.inc()
    for job_id, job_stage, resent, last_error in exhausted:  # after the claims' commit: _fail locks the job again
        _give_up(runtime, job_id, job_stage, resent, last_error)
    return requested, len(lost)


def _queue_depths(runtime: Runtime) -> dict[str, int | None]:
    """Messages waiting per queue; nothing known on the embedded broker (its worker is in this process)."""
    return {} if runtime.settings.embedded_worker else queue.queue_depths()


def sample_job_gauges(runtime: Runtime) -> None:
    """Sample clinfer_jobs_in_state and clinfer_queue_depth; a queue whose depth cannot be read has no sample."""
    from sqlalchemy import func, select

    with runtime.sessions() as session:
        counts = dict(session.execute(select(Job.state, func.count(Job.id)).group_by(Job.state)).all())
    for state in JobState:
        metrics.JOBS_IN_STATE.labels(state.value).set(counts.get(state.value, 0))
    for name, depth in _queue_depths(runtime).items():
        if depth is None:
            # the broker cannot be read: no sample at all rather than the last one, which alerts would take as now
            metrics.QUEUE_DEPTH.remove(name)
        else:
            metrics.QUEUE_DEPTH.labels(name).set(depth)
