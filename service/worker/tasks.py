"""Celery tasks: thin, ids in, idempotent. The work is in service.flows.analysis and service.flows.results."""

from __future__ import annotations

import logging

from service.errors import TransientError
from service.flows import analysis, queue, results
from service.flows.runtime import get_runtime
from service.schemas import JobStage
from service.store import db

log = logging.getLogger(__name__)

app = queue.get_celery()

# late acknowledgement and re-delivery when a worker dies: safe because both stages are idempotent
TASK_OPTIONS = {
    "acks_late": True,
    "reject_on_worker_lost": True,
    "autoretry_for": (TransientError,),
    "max_retries": 5,
    "retry_backoff": True,
    "retry_backoff_max": 60,
}


def _run(stage: JobStage, job_id: str) -> None:
    runtime = get_runtime()
    work = analysis.preprocess_job if stage == JobStage.preprocess else analysis.infer_job
    try:
        work(runtime, job_id)
    except TransientError as e:
        analysis.record_transient_error(runtime, job_id, stage, e)
        raise  # retried with backoff by Celery
    except Exception as e:
        if db.is_transient(e):  # the database or the disk, for a moment: the job stays active and is tried again
            log.warning("job %s: %s in %s; tried again: %s", job_id, type(e).__name__, stage.value, e)
            transient = TransientError(_transient_reason(e, stage))
            analysis.record_transient_error(runtime, job_id, stage, transient)
            raise transient from e
        # the worker's edge: any other error fails the job, with its stage, visibly
        log.exception("job %s: unexpected error in %s", job_id, stage.value)
        analysis.record_unexpected_failure(runtime, job_id, stage, e)


def _transient_reason(error: Exception, stage: JobStage) -> str:
    """The reason a job's row shows while its stage waits to be tried again: the error's class and, for a disk
    error, what its errno means. Not its whole message: a path or a database error's parameters may name a study."""
    reason = f"{type(error).__name__} in {stage.value}"
    if isinstance(error, OSError) and error.strerror:
        reason += f": {error.strerror}"
    return reason


@app.task(name=queue.PREPROCESS_TASK, **TASK_OPTIONS)
def preprocess(job_id: str) -> None:
    _run(JobStage.preprocess, job_id)


@app.task(name=queue.INFER_TASK, **TASK_OPTIONS)
def infer(job_id: str) -> None:
    _run(JobStage.infer, job_id)


@app.task(name=queue.PUBLISH_TASK, **TASK_OPTIONS)
def publish(job_id: str) -> None:
    """The DICOM results (SR, heatmap) of the report version a job produced; the sweeper re-asks if lost."""
    try:
        results.publish_results(get_runtime(), job_id)
    except TransientError:
        raise
    except Exception:  # the report stands; its DICOM results stay pending and the sweeper tries again later
        log.exception("DICOM results of job %s failed", job_id)


@app.task(name=queue.DELIVER_TASK, acks_late=True, reject_on_worker_lost=True)
def deliver(delivery_id: str) -> None:
    """One try of one push; retries are scheduled in the deliveries table (bounded), not by Celery."""
    try:
        results.deliver(get_runtime(), delivery_id)
    except Exception:
        log.exception(
            "delivery %s failed unexpectedly; the sweeper tries again after the reconcile period", delivery_id
        )
