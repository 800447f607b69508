"""Report events on the real Redis: an API process learns of each report a worker stores, and after its
subscription is cut (Redis restarted) it subscribes again and wakes every waiter, whose report may have been
announced meanwhile."""

from __future__ import annotations

import queue as queues
import threading
import time

import pytest
import redis

from service.config import get_settings
from service.flows import queue

pytestmark = pytest.mark.redis


def _announced(events: queues.Queue[str | None], uid: str) -> bool:
    """Publish until the subscriber hears it: SUBSCRIBE reaches the server asynchronously."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        queue.publish_report_event(uid)
        try:
            while True:
                if events.get(timeout=0.2) == uid:
                    return True
        except queues.Empty:
            continue
    return False


def test_a_new_subscription_wakes_every_waiter(monkeypatch: pytest.MonkeyPatch, redis_url: str) -> None:
    monkeypatch.setenv("CLINFER_BROKER_URL", redis_url)
    get_settings.cache_clear()
    events: queues.Queue[str | None] = queues.Queue()
    stop = threading.Event()
    thread = queue.subscribe_report_events(events.put, stop)
    assert thread is not None
    try:
        assert events.get(timeout=10) is None  # subscribed: every waiter looks again
        assert _announced(events, "1.2.826.0.1.3680043.10.1")
        # the subscription is cut, as by a restart of Redis: reports announced meanwhile are lost to it
        db = redis.Redis.from_url(redis_url)
        number = str(db.connection_pool.connection_kwargs.get("db", 0))
        ours = [c["id"] for c in db.client_list() if c.get("sub") == "1" and c.get("db") == number]
        assert ours
        for client_id in ours:
            db.client_kill_filter(_id=client_id)
        assert events.get(timeout=10) is None  # subscribed again: everyone looks
        assert _announced(events, "1.2.826.0.1.3680043.10.2")
    finally:
        stop.set()
        thread.join(5)
        get_settings.cache_clear()
