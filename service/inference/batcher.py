"""The GPU worker's dynamic batcher: concurrent requests for one model version become one model call.

Each infer task running in a worker's thread pool hands its prepared study to the batcher of its model version and
waits. The batcher's thread waits for a first request, then gathers more until ``max_batch`` are queued or
``max_delay_ms`` has passed since the oldest queued one arrived, and makes one ``pipeline.predict`` call for the
most urgent ``max_batch`` of them (lower priority number first, as in our Celery priorities; FIFO among equals).
A batch whose call fails is run again one request at a time, so that one bad input fails only its own study.
A lone request therefore waits at most ``max_delay_ms``; under load, requests queued during a model call go into
the next call at once. With ``wait_only_for_announced`` (as the worker runs it), queued requests wait only while
other requests are announced as on their way (their tasks are loading inputs): a lone study goes at once.

``BatcherPool`` keeps one batcher, so one loaded and warmed-up session, per model version in the process (a worker
process owns one device).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np

from service import metrics
from service.errors import ModelError, ServiceError, TransientError
from service.inference import pipeline
from service.inference.manifest import Manifest
from service.inference.pipeline import PreparedInputs
from service.inference.runner import Runner

log = logging.getLogger(__name__)

HIGHEST_PRIORITY = 0
LOWEST_PRIORITY = 9


@dataclass(frozen=True)
class BatchResult:
    """One request's share of a batched model call."""

    logits: np.ndarray
    """1-D: this request's row of the batch's logits, one per finding."""
    batch_size: int
    """How many requests shared the model call."""
    batch_wait_seconds: float
    """From submission to the start of the model call."""
    inference_seconds: float
    """The model call (the whole batch's)."""
    provider: str


@dataclass(eq=False)
class _Request:
    prepared: PreparedInputs
    priority: int
    sequence: int
    submitted: float
    deadline: float | None
    future: Future[BatchResult]
    alone: bool = False
    """Back from a batch whose model call failed: to run in a call of its own (its future already running)."""

    def order(self) -> tuple[int, int]:
        return (self.priority, self.sequence)

    def start(self) -> bool:
        """Take the request for a model call: False when its caller withdrew it (cancelled) meanwhile."""
        return self.alone or self.future.set_running_or_notify_cancel()


class DynamicBatcher:
    """One model version's batcher, with its own daemon thread.

    Args:
        manifest: the model's manifest (input names, shapes, outputs).
        runner: the loaded model; the batcher's thread calls it, and so may ``warm_up`` and heatmap code.
        version: the model version served, for the inference duration metric.
        max_batch: most requests in one model call; default the manifest's ``batching.max_batch_size``.
        max_delay_ms: longest the oldest queued request waits for others; default the manifest's
            ``batching.max_delay_ms``.
        name: the model label of the batcher's metrics; default the manifest's name.
        wait_only_for_announced: queued requests wait for companions (up to ``max_delay_ms``) only while other
            requests are announced (``arriving``) and not yet submitted; with none on the way, a batch goes at once.
            The worker's infer tasks announce themselves when they start reading their inputs, so a lone study
            does not pay ``max_delay_ms`` for companions no one is bringing, while under load batches still form.

    Raises:
        ValueError: ``max_batch`` is not a positive int or exceeds the manifest's ``max_batch_size``, or
            ``max_delay_ms`` is negative.
    """

    def __init__(
        self,
        manifest: Manifest,
        runner: Runner,
        *,
        version: str,
        max_batch: int | None = None,
        max_delay_ms: float | None = None,
        name: str | None = None,
        wait_only_for_announced: bool = False,
    ) -> None:
        max_batch = manifest.batching.max_batch_size if max_batch is None else max_batch
        max_delay_ms = manifest.batching.max_delay_ms if max_delay_ms is None else max_delay_ms
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"'max_batch' must be a positive int, got {max_batch!r}")
        if max_batch > manifest.batching.max_batch_size:
            raise ValueError(
                f"'max_batch' {max_batch} exceeds the manifest's batching.max_batch_size"
                f" {manifest.batching.max_batch_size} for {manifest.name}"
            )
        if not max_delay_ms >= 0:
            raise ValueError(f"'max_delay_ms' must be >= 0, got {max_delay_ms!r}")
        self.manifest = manifest
        self.version = version
        self.max_batch = max_batch
        self.max_delay_seconds = max_delay_ms / 1000.0
        self.name = name or manifest.name
        self._runner: Runner | None = runner
        self.provider = runner.provider
        self._condition = threading.Condition()
        self._pending: list[_Request] = []
        self._sequence = 0
        self._closed = False
        self.wait_only_for_announced = wait_only_for_announced
        self._arriving = 0
        self._thread = threading.Thread(target=self._serve, name=f"batcher-{self.name}-{version}", daemon=True)
        self._thread.start()

    @property
    def runner(self) -> Runner:
        """The loaded model, for work that is not batched (occlusion heatmaps) so it shares the one session.

        Raises:
            TransientError: the batcher was closed (its model unloaded).
        """
        runner = self._runner
        if runner is None:
            raise TransientError(f"model {self.name} {self.version} was unloaded")
        return runner

    @property
    def closed(self) -> bool:
        return self._closed

    def arriving(self) -> Arrival:
        """Announce a request that will be submitted soon (its task is loading its inputs): a context manager.

        Submit inside the block with ``arrival=``; leaving the block without submitting (an error) withdraws the
        announcement. See ``wait_only_for_announced``.
        """
        with self._condition:
            self._arriving += 1
        return Arrival(self)

    def _arrived(self, arrival: Arrival) -> None:
        """Count ``arrival`` off (once); the caller holds the condition."""
        if not arrival.done:
            arrival.done = True
            self._arriving -= 1
            self._condition.notify()

    def submit_async(
        self,
        prepared: PreparedInputs,
        *,
        priority: int = 6,
        timeout: float | None = None,
        arrival: Arrival | None = None,
    ) -> Future[BatchResult]:
        """Queue one study for the next batch.

        Args:
            prepared: the study's inputs, without the batch axis.
            priority: 0 (STAT) to 9; lower goes first, equal priorities in submission order.
            timeout: seconds the request may wait to be put in a batch; None: no limit. An expired request is never
                put in a batch: its future fails with TransientError when the batcher next forms a batch. Use
                ``submit`` (or cancel the future) to be told as soon as the timeout passes.
            arrival: this request's announcement (``arriving``), if it made one.

        Returns:
            A future of this request's ``BatchResult``. When a batch's model call raises, each of its requests is
            run alone (a TransientError excepted, which fails them all), so the future fails with a ServiceError
            only when this request fails on its own; and with TransientError when the request expired or the
            batcher closed.

        Raises:
            ValueError: a bad priority or timeout.
            TransientError: the batcher is closed.
        """
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise ValueError(f"'priority' must be an int, got {priority!r}")
        if not HIGHEST_PRIORITY <= priority <= LOWEST_PRIORITY:
            raise ValueError(f"'priority' must be between {HIGHEST_PRIORITY} and {LOWEST_PRIORITY}, got {priority}")
        if timeout is not None and not timeout > 0:
            raise ValueError(f"'timeout' must be positive or None, got {timeout!r}")
        future: Future[BatchResult] = Future()
        now = time.monotonic()
        with self._condition:
            if arrival is not None:
                self._arrived(arrival)
            if self._closed:
                raise TransientError(f"the batcher of {self.name} {self.version} is closed")
            self._sequence += 1
            self._pending.append(
                _Request(
                    prepared=prepared,
                    priority=priority,
                    sequence=self._sequence,
                    submitted=now,
                    deadline=None if timeout is None else now + timeout,
                    future=future,
                )
            )
            self._condition.notify()
        return future

    def submit(
        self,
        prepared: PreparedInputs,
        *,
        priority: int = 6,
        timeout: float | None = None,
        arrival: Arrival | None = None,
    ) -> BatchResult:
        """Queue one study and wait for its row of the batch's logits (for worker threads).

        Args:
            prepared: the study's inputs, without the batch axis.
            priority: 0 (STAT) to 9; lower goes first, equal priorities in submission order.
            timeout: seconds the request may wait to be put in a batch; None: no limit. Once in a batch, the call
                waits for the model call to end.
            arrival: this request's announcement (``arriving``), if it made one.

        Returns:
            This request's logits and timings.

        Raises:
            TransientError: the timeout passed before the request was put in a batch, or the batcher closed.
            ServiceError: this request's model call failed, alone (see ``submit_async``): the original
                ServiceError, else one with code "inference".
            ValueError: a bad priority or timeout.
        """
        future = self.submit_async(prepared, priority=priority, timeout=timeout, arrival=arrival)
        try:
            return future.result(timeout=timeout)
        except TimeoutError:
            # Still queued: withdraw it. Already in a batch (cancel() refuses): the model call is under way.
            if future.cancel():
                raise TransientError(_wait_exceeded(timeout)) from None
            return future.result()

    def close(self) -> None:
        """Stop the thread after the model call under way, fail queued requests with TransientError, and drop the
        runner so that its memory can be freed once no one else holds it. Idempotent."""
        with self._condition:
            self._closed = True
            self._condition.notify_all()
        if threading.current_thread() is not self._thread:
            self._thread.join()
        self._fail_pending(TransientError(f"the batcher of {self.name} {self.version} was closed"))
        self._runner = None

    def _fail_pending(self, error: ServiceError) -> None:
        with self._condition:
            pending, self._pending = self._pending, []
        for request in pending:
            if request.start():
                request.future.set_exception(error)

    def _serve(self) -> None:
        try:
            while (batch := self._next_batch()) is not None:
                self._run_batch(batch)
        finally:
            with self._condition:
                how = "was closed" if self._closed else "stopped unexpectedly"
                self._closed = True
            self._fail_pending(TransientError(f"the batcher of {self.name} {self.version} {how}"))

    def _next_batch(self) -> list[_Request] | None:
        """Wait for a batch to be due and take it from the queue; None once closed."""
        with self._condition:
            while not self._closed:
                now = time.monotonic()
                self._drop_withdrawn(now)
                if not self._pending:
                    self._condition.wait()
                    continue
                due = min(request.submitted for request in self._pending) + self.max_delay_seconds
                nobody_coming = self.wait_only_for_announced and self._arriving == 0
                back = any(request.alone for request in self._pending)  # already waited: due at once
                if len(self._pending) >= self.max_batch or now >= due or nobody_coming or back:
                    self._pending.sort(key=_Request.order)
                    if self._pending[0].alone:  # the most urgent is back from a failed batch: a call of its own
                        return [self._pending.pop(0)]
                    batchable = [request for request in self._pending if not request.alone]
                    taken = batchable[: self.max_batch]
                    self._pending = [request for request in self._pending if request not in taken]
                    # start(): from here on the caller can no longer withdraw the request.
                    batch = [request for request in taken if request.start()]
                    if batch:
                        return batch
                    continue
                deadlines = [request.deadline for request in self._pending if request.deadline is not None]
                self._condition.wait(min([due, *deadlines]) - now)
            return None

    def _drop_withdrawn(self, now: float) -> None:
        """Forget requests their callers cancelled and fail those whose timeout passed while queued."""
        kept = []
        for request in self._pending:
            if request.future.cancelled():
                continue
            if request.deadline is not None and now >= request.deadline:
                if request.start():
                    request.future.set_exception(TransientError(_wait_exceeded(request.deadline - request.submitted)))
                continue
            kept.append(request)
        self._pending = kept

    def _run_batch(self, batch: list[_Request]) -> None:
        runner = self._runner
        assert runner is not None  # only close() clears it, after this thread has stopped
        started = time.monotonic()
        for request in batch:
            if not request.alone:  # a request back from a failed batch had its wait counted then
                metrics.BATCH_WAIT.labels(self.name).observe(started - request.submitted)
        try:
            results = self._call(runner, batch)
        except ServiceError as error:
            # A transient error (a device lost) says nothing of the inputs: each request is tried again later.
            if len(batch) == 1 or isinstance(error, TransientError):
                log.error("%s %s: a batch of %d failed: %s", self.name, self.version, len(batch), error)
                for request in batch:
                    request.future.set_exception(error)
                return
            # One bad input (a wrong shape, a value the runtime refuses) fails the whole call: each request goes
            # back to the queue to run in a call of its own, so that only the requests that fail on their own
            # fail; queued in their order, a STAT request arriving meanwhile still goes first.
            log.warning(
                "%s %s: a batch of %d failed (%s); its requests run one by one",
                self.name,
                self.version,
                len(batch),
                error,
            )
            with self._condition:
                self._pending.extend(dataclasses.replace(request, alone=True) for request in batch)
                self._condition.notify_all()
            return
        for request, result in zip(batch, results, strict=True):
            request.future.set_result(result)

    def _call(self, runner: Runner, batch: list[_Request]) -> list[BatchResult]:
        """One model call for ``batch``: each request's share of it, in the batch's order.

        Raises:
            ServiceError: the call failed (the runtime's own, untyped, errors become one with code "inference",
                chained), or returned a number of rows other than the batch's size (ModelError).
        """
        started = time.monotonic()
        try:
            # pipeline.predict only calls runner.run, which every Runner has.
            logits, seconds = pipeline.predict(self.manifest, runner, [r.prepared for r in batch])
            if logits.shape[0] != len(batch):
                raise ModelError(f"{self.name} returned {logits.shape[0]} rows of logits for a batch of {len(batch)}")
            results = [
                BatchResult(
                    logits=logits[row].copy(),
                    batch_size=len(batch),
                    batch_wait_seconds=started - request.submitted,
                    inference_seconds=seconds,
                    provider=runner.provider,
                )
                for row, request in enumerate(batch)
            ]
        except ServiceError:
            raise
        except Exception as e:  # the runtime's own errors are untyped; every waiting caller must hear of them
            raise ServiceError(f"model call failed: {e}", code="inference") from e
        metrics.BATCH_SIZE.labels(self.name).observe(len(batch))  # the calls that ran: not a failed batch
        metrics.INFERENCE_DURATION.labels(self.name, self.version, runner.provider).observe(seconds)
        return results


class Arrival:
    """A request announced to a batcher (``DynamicBatcher.arriving``) and not yet submitted."""

    def __init__(self, batcher: DynamicBatcher) -> None:
        self.batcher = batcher
        self.done = False

    def __enter__(self) -> Arrival:
        return self

    def __exit__(self, *exc: object) -> None:
        with self.batcher._condition:
            self.batcher._arrived(self)


def _wait_exceeded(timeout: float | None) -> str:
    return f"batch wait exceeded {timeout:g} s"


def warm_up(batcher: DynamicBatcher) -> float:
    """Run a batch of zeros of every size the batcher can form, largest first, straight through its runner, so that
    no study pays a first-run cost: ONNX Runtime plans memory per input shape, and on CUDA cuDNN benchmarks its
    convolution algorithms for each new shape (``cudnn_conv_algo_search=EXHAUSTIVE``), a search the first batch of
    each size would otherwise pay while serving. The largest batch's memory is claimed at load.

    Returns:
        Seconds spent.

    Raises:
        ModelError: the model cannot run on inputs of the manifest's shapes.
    """
    return warm_up_runner(batcher.manifest, batcher.runner, version=batcher.version, max_batch=batcher.max_batch)


def warm_up_runner(manifest: Manifest, runner: Runner, *, version: str, max_batch: int) -> float:
    """:func:`warm_up` for a runner without a batcher (batching off: every study a batch of 1)."""
    name = manifest.name
    clinical = manifest.clinical_input
    features = len(clinical.features) if clinical is not None else 0
    zeros = PreparedInputs(
        image=np.zeros(manifest.image_input.shape, dtype=np.float32),
        clinical=np.zeros(features, dtype=np.float32) if clinical is not None else None,
        clinical_mask=np.zeros(features, dtype=np.float32) if clinical is not None else None,
        clinical_used=[],
        source_sop_instance_uid="",
    )
    started = time.perf_counter()
    for size in range(max_batch, 0, -1):
        try:
            logits, _ = pipeline.predict(manifest, runner, [zeros] * size)
        except ServiceError:
            raise
        except Exception as e:  # the runtime's own errors are untyped
            raise ModelError(f"{name} {version} fails on a warm-up batch of {size}: {e}") from e
        if logits.shape != (size, len(manifest.outputs.findings)):
            raise ModelError(
                f"{name} {version} returned logits of shape {logits.shape} for a warm-up batch of"
                f" {size}; expected {(size, len(manifest.outputs.findings))}"
            )
    seconds = time.perf_counter() - started
    log.info("%s %s warmed up on %s in %.3f s", name, version, runner.provider, seconds)
    return seconds


class BatcherPool:
    """One warmed-up batcher per (model name, version) in this process, created on first use."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._batchers: dict[tuple[str, str], DynamicBatcher] = {}
        # One creation lock per key, so that loading one model never holds up requests for another.
        self._creating: dict[tuple[str, str], threading.Lock] = {}

    def get(self, name: str, version: str, factory: Callable[[], DynamicBatcher]) -> DynamicBatcher:
        """The batcher of a model version; the first call creates it with ``factory`` and warms it up.

        Raises:
            ModelError: the warm-up failed (the new batcher is closed, and the next call tries again).
        """
        key = (name, version)
        with self._lock:
            batcher = self._batchers.get(key)
            if batcher is not None and not batcher.closed:
                return batcher
            creating = self._creating.setdefault(key, threading.Lock())
        with creating:
            with self._lock:
                batcher = self._batchers.get(key)
                if batcher is not None and not batcher.closed:
                    return batcher
            batcher = factory()
            try:
                warm_up(batcher)
            except BaseException:
                batcher.close()
                raise
            with self._lock:
                self._batchers[key] = batcher
            return batcher

    def loaded(self) -> list[tuple[str, str]]:
        with self._lock:
            return sorted(self._batchers)

    def unload(self, name: str, version: str) -> bool:
        """Close a model version's batcher (its queued requests fail with TransientError) and forget it, so that its
        session's memory can be freed. Returns whether it was loaded."""
        with self._lock:
            batcher = self._batchers.pop((name, version), None)
        if batcher is None:
            return False
        batcher.close()
        log.info("%s %s unloaded", name, version)
        return True

    def close_all(self) -> None:
        with self._lock:
            batchers, self._batchers = list(self._batchers.values()), {}
        for batcher in batchers:
            batcher.close()
