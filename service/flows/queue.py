"""The Celery application, built from Settings: Redis in production, an in-memory broker embedded.

Tasks are sent by name, so nothing below the worker needs to import the task module.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from celery import Celery
from kombu.exceptions import ChannelError

from service.config import Settings, get_settings

log = logging.getLogger(__name__)

PREPROCESS_QUEUE = "preprocess"
INFER_QUEUE = "infer"
RESULTS_QUEUE = "results"

PREPROCESS_TASK = "service.worker.tasks.preprocess"
INFER_TASK = "service.worker.tasks.infer"
PUBLISH_TASK = "service.worker.tasks.publish"
DELIVER_TASK = "service.worker.tasks.deliver"

_app: Celery | None = None
_lock = threading.Lock()


def create_celery(settings: Settings) -> Celery:
    app = Celery("clinfer", broker=settings.broker_url or "memory://", include=["service.worker.tasks"])
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,  # results live in our database, not in a Celery backend
        result_backend=None,
        task_default_queue=PREPROCESS_QUEUE,
        task_routes={
            PREPROCESS_TASK: {"queue": PREPROCESS_QUEUE},
            INFER_TASK: {"queue": INFER_QUEUE},
            PUBLISH_TASK: {"queue": RESULTS_QUEUE},
            DELIVER_TASK: {"queue": RESULTS_QUEUE},
        },
        task_serializer="json",
        accept_content=["json"],
        broker_connection_retry_on_startup=True,
        # a task must finish (or be re-delivered) well inside the visibility timeout; we never use long ETAs
        broker_transport_options={
            "visibility_timeout": 3600,
            "queue_order_strategy": "priority",
            # Redis blocks on BRPOP; the embedded in-memory broker is polled, by default once a second per queue,
            # which would add a second to each stage of every job
            **({} if settings.broker_url else {"polling_interval": 0.005}),
        },
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
    )
    return app


def get_celery() -> Celery:
    global _app
    with _lock:
        if _app is None:
            _app = create_celery(get_settings())
        return _app


def reset_celery() -> None:
    global _app
    with _lock:
        _app = None


def send(task_name: str, row_id: str, *, queue: str, priority: int = 6) -> None:
    """Enqueue a task by name with a row id (job or delivery) as its only argument, after that row is committed.

    On Redis, lower priorities are consumed first (STAT 0, routine 6).
    """
    get_celery().send_task(task_name, args=[row_id], queue=queue, priority=priority)


def broker_ping(timeout: float = 2.0) -> None:
    """Raise if the broker cannot be reached."""
    app = get_celery()
    with app.connection_for_write() as connection:
        connection.ensure_connection(max_retries=1, timeout=timeout)


_NOT_FOUND = "404"  # the reply code of the ChannelError a passive declare of a missing queue raises


def queue_depths() -> dict[str, int | None]:
    """Messages waiting per queue, every priority counted (Redis keeps one list per priority step).

    On Redis a queue that drains is deleted (kombu removes its empty lists), and one never sent to does not exist:
    both have depth 0. Read as unknown, they would leave clinfer_queue_depth at its last value, and the alert on
    work waiting with no job finishing would fire in every quiet period.

    Returns:
        Each stage queue's depth; None for every queue whose depth could not be read (the broker unreachable).
    """
    app = get_celery()
    depths: dict[str, int | None] = dict.fromkeys((PREPROCESS_QUEUE, INFER_QUEUE, RESULTS_QUEUE))
    try:
        with app.connection_for_read() as connection:
            channel: Any = connection.default_channel
            for queue in depths:
                try:
                    # kombu's Redis channel sums the lengths of the queue's lists, one per priority step
                    depths[queue] = channel.queue_declare(queue=queue, passive=True).message_count
                except ChannelError as e:
                    if str(e.reply_code) != _NOT_FOUND:
                        raise
                    depths[queue] = 0  # no list holds a message of this queue
    except Exception as e:  # the broker cannot be read: the caller is told (None), not given a stale or a 0
        log.warning("cannot read queue depths: %s", e)
        depths = dict.fromkeys(depths)
    return depths


REPORTS_CHANNEL = "clinfer:reports"


def publish_report_event(study_instance_uid: str) -> None:
    """Tell API processes that a report of this study was stored (Redis pub/sub, the study's UID as the message),
    so that the requests waiting for it look at once."""
    settings = get_settings()
    if not settings.broker_url or not settings.broker_url.startswith(("redis://", "rediss://")):
        return
    try:
        client = _redis_client(settings.broker_url)
        client.publish(REPORTS_CHANNEL, study_instance_uid.encode())
    except Exception as e:  # waiting requests then find the report by polling, a little later
        log.warning("cannot publish the report event: %s", e)


_redis_clients: dict[str, Any] = {}


def _redis_client(url: str) -> Any:
    import redis

    with _lock:
        if url not in _redis_clients:
            _redis_clients[url] = redis.Redis.from_url(url)
        return _redis_clients[url]


def subscribe_report_events(on_event: Any, stop: threading.Event) -> threading.Thread | None:
    """A daemon thread calling ``on_event(study_instance_uid)`` for each report stored by any worker (``None`` for
    an event that names no study); None without Redis."""
    settings = get_settings()
    if not settings.broker_url or not settings.broker_url.startswith(("redis://", "rediss://")):
        return None

    def listen() -> None:
        while not stop.is_set():
            try:
                pubsub = _redis_client(settings.broker_url or "").pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(REPORTS_CHANNEL)
                # reports announced while no subscription was open are lost: every waiter looks again
                on_event(None)
                while not stop.is_set():
                    message = pubsub.get_message(timeout=1.0)
                    if message is not None:
                        uid = message.get("data")
                        on_event(uid.decode("ascii", "replace") if isinstance(uid, bytes) and uid else None)
            except Exception as e:  # Redis restarted: subscribe again after a pause
                log.warning("report events: %s; subscribing again", e)
                stop.wait(1.0)

    thread = threading.Thread(target=listen, name="clinfer-report-events", daemon=True)
    thread.start()
    return thread
