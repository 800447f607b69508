"""clinfer_queue_depth on the real Redis: a queue that drains reads 0, and a broker that cannot be read leaves no
sample behind, so the alerts on a waiting backlog see what is there now."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis
from prometheus_client import REGISTRY

from service.config import get_settings
from service.flows import analysis, queue
from service.flows.runtime import Runtime, build_runtime
from service.routing.rules import QUEUE_PRIORITY, Priority
from tests.conftest import make_settings

pytestmark = pytest.mark.redis


def _broker_runtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, broker_url: str) -> Runtime:
    """A runtime whose broker (the one ``queue`` sends to and reads from) is ``broker_url``."""
    monkeypatch.setenv("CLINFER_BROKER_URL", broker_url)
    get_settings.cache_clear()
    queue.reset_celery()
    return build_runtime(make_settings(tmp_path, broker_url=broker_url))


def _gauge(name: str) -> float | None:
    return REGISTRY.get_sample_value("clinfer_queue_depth", {"queue": name})


def test_a_queue_that_drained_reads_zero_and_its_gauge_says_zero(
    tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before, kombu's deletion of the drained queue's lists made the depth unknown (None) and the gauge kept its
    last value (3) for ever, which fired ClinferWorkersNotConsuming in every quiet period."""
    runtime = _broker_runtime(tmp_path, monkeypatch, redis_url)
    for job_id, priority in [("a", Priority.stat), ("b", Priority.routine), ("c", Priority.routine)]:
        queue.send(queue.INFER_TASK, job_id, queue=queue.INFER_QUEUE, priority=QUEUE_PRIORITY[priority])
    client = redis.Redis.from_url(redis_url)
    stat_list, routine_list = b"infer", b"infer\x06\x166"  # one list per priority step
    assert (client.llen(stat_list), client.llen(routine_list)) == (1, 2)

    assert queue.queue_depths() == {queue.PREPROCESS_QUEUE: 0, queue.INFER_QUEUE: 3, queue.RESULTS_QUEUE: 0}
    analysis.sample_job_gauges(runtime)
    assert (_gauge(queue.INFER_QUEUE), _gauge(queue.PREPROCESS_QUEUE)) == (3.0, 0.0)

    with queue.get_celery().connection_for_read() as connection:
        consumer = connection.SimpleQueue(queue.INFER_QUEUE, no_ack=True)
        for _ in range(3):
            consumer.get(timeout=5)
        consumer.close()
    assert client.exists(stat_list, routine_list) == 0  # the drained queue is gone from Redis

    assert queue.queue_depths()[queue.INFER_QUEUE] == 0
    analysis.sample_job_gauges(runtime)
    assert _gauge(queue.INFER_QUEUE) == 0.0


def test_a_broker_that_cannot_be_read_leaves_no_stale_depth(
    tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    runtime = _broker_runtime(tmp_path, monkeypatch, redis_url)
    queue.send(queue.INFER_TASK, "a", queue=queue.INFER_QUEUE)
    analysis.sample_job_gauges(runtime)
    assert _gauge(queue.INFER_QUEUE) == 1.0

    unreachable = _broker_runtime(tmp_path, monkeypatch, "redis://127.0.0.1:1/15")  # nothing listens on port 1
    assert queue.queue_depths() == dict.fromkeys((queue.PREPROCESS_QUEUE, queue.INFER_QUEUE, queue.RESULTS_QUEUE))
    analysis.sample_job_gauges(unreachable)
    assert _gauge(queue.INFER_QUEUE) is None  # unknown, not the last value read
