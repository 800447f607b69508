"""Running workers: `clinfer worker` on a real broker, or the embedded in-process worker, plus the sweeper."""

from __future__ import annotations

import logging
import threading

from celery.worker import WorkController

from service.flows import analysis, queue, results
from service.flows.runtime import Runtime

log = logging.getLogger(__name__)


class Sweeper:
    """A daemon thread that analyzes stable studies, re-enqueues lost jobs and lost DICOM results, and sends the
    result pushes that are due, every few seconds."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="clinfer-sweeper", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.wait(self.runtime.settings.completeness_scan_seconds):
            try:
                analysis.sweep(self.runtime)
                results.sweep_results(self.runtime)
                analysis.sample_job_gauges(self.runtime)
            except Exception:  # the sweeper must outlive a database blip; the next round retries
                log.exception("sweep failed")


class EmbeddedWorker:
    """A Celery worker in a thread of this process, on the in-memory broker: the same tasks as production."""

    def __init__(self, *, concurrency: int = 2) -> None:
        import service.worker.tasks  # noqa: F401  (registers the tasks with the app)

        self._controller = WorkController(
            app=queue.get_celery(),
            hostname="embedded@clinfer",
            concurrency=concurrency,
            pool_cls="threads",
            queues=[queue.PREPROCESS_QUEUE, queue.INFER_QUEUE, queue.RESULTS_QUEUE],
            without_heartbeat=True,
            without_mingle=True,
            without_gossip=True,
            loglevel="WARNING",
            logfile=None,
        )
        self._thread = threading.Thread(target=self._controller.start, name="clinfer-embedded-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._controller.stop(in_sighandler=False)
        self._thread.join(timeout=10)


def run_worker(*, queues: list[str], concurrency: int, pool: str = "prefork") -> None:
    """`clinfer worker`: a Celery worker on the configured broker (blocks until stopped)."""
    import service.worker.tasks  # noqa: F401

    app = queue.get_celery()
    argv = [
        "worker",
        f"--queues={','.join(queues)}",
        f"--concurrency={concurrency}",
        f"--pool={pool}",
        "--loglevel=INFO",
        "--without-gossip",
        "--without-mingle",
    ]
    app.worker_main(argv)
