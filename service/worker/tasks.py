"""Celery tasks: thin, ids in, idempotent. The work is in service.flows.analysis."""

from __future__ import annotations

import logging

from service.errors import TransientError
from service.flows import analysis, queue
from service.flows.runtime import get_runtime
from service.schemas import JobStage

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
    except TransientError:
        raise  # retried with backoff by Celery
    except Exception as e:  # the worker's edge: any other error fails the job, with its stage, visibly
        log.exception("job %s: unexpected error in %s", job_id, stage.value)
        analysis.record_unexpected_failure(runtime, job_id, stage, e)


@app.task(name=queue.PREPROCESS_TASK, **TASK_OPTIONS)
def preprocess(job_id: str) -> None:
    _run(JobStage.preprocess, job_id)


@app.task(name=queue.INFER_TASK, **TASK_OPTIONS)
def infer(job_id: str) -> None:
    _run(JobStage.infer, job_id)
