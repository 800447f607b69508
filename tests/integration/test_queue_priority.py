"""STAT before routine, carried into the queue: on the real Redis, a STAT job sent after routine ones is consumed
first."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.flows import queue
from service.routing.rules import QUEUE_PRIORITY, Priority
from tests.conftest import make_settings

pytestmark = pytest.mark.redis


def test_a_stat_job_overtakes_routine_jobs_on_redis(tmp_path: Path, redis_url: str) -> None:
    app = queue.create_celery(make_settings(tmp_path, broker_url=redis_url))
    for number in range(3):
        app.send_task(
            queue.PREPROCESS_TASK,
            args=[f"routine-{number}"],
            queue=queue.PREPROCESS_QUEUE,
            priority=QUEUE_PRIORITY[Priority.routine],
        )
    app.send_task(
        queue.PREPROCESS_TASK, args=["stat"], queue=queue.PREPROCESS_QUEUE, priority=QUEUE_PRIORITY[Priority.stat]
    )
    order = []
    with app.connection_for_read() as connection:
        consumer_queue = connection.SimpleQueue(queue.PREPROCESS_QUEUE, no_ack=True)
        for _ in range(4):
            message = consumer_queue.get(timeout=5)
            args, _kwargs, _embed = message.decode()
            order.append(args[0])
        consumer_queue.close()
    assert order == ["stat", "routine-0", "routine-1", "routine-2"]
