"""Celery tasks: thin, ids in, idempotent. The work is in service.flows.analysis."""

from __future__ import annotations

from service.errors import TransientError
from service.flows import analysis, queue
from service.flows.runtime import get_runtime

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


@app.task(name=queue.PREPROCESS_TASK, **TASK_OPTIONS)
def preprocess(job_id: str) -> None:
    analysis.preprocess_job(get_runtime(), job_id)


@app.task(name=queue.INFER_TASK, **TASK_OPTIONS)
def infer(job_id: str) -> None:
    analysis.infer_job(get_runtime(), job_id)
