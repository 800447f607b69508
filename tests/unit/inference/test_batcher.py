from __future__ import annotations

import dataclasses
import gc
import threading
import time
import weakref
from collections.abc import Callable, Iterator

import numpy as np
import pytest
from prometheus_client import REGISTRY

from service.errors import ModelError, ServiceError, TransientError
from service.inference import pipeline
from service.inference.batcher import BatcherPool, BatchResult, DynamicBatcher, warm_up
from service.inference.manifest import Manifest
from service.inference.pipeline import PreparedInputs
from service.inference.registry import ModelRegistry
from service.inference.runner import Runner
from tests.conftest import REPO

STAT, ROUTINE = 0, 6
MakeBatcher = Callable[..., DynamicBatcher]


@pytest.fixture(scope="module")
def shipped() -> tuple[Manifest, Runner]:
    registry = ModelRegistry(root=REPO / "models", providers=["CPUExecutionProvider"])
    registry.load()
    manifest = registry.get_or_raise("cxr-fusion").manifest
    return manifest, registry.runner("cxr-fusion", manifest.latest().version)


@pytest.fixture
def make_batcher() -> Iterator[MakeBatcher]:
    made: list[DynamicBatcher] = []

    def make(manifest: Manifest, runner: Runner, **options: object) -> DynamicBatcher:
        batcher = DynamicBatcher(manifest, runner, version="1", **options)  # type: ignore[arg-type]
        made.append(batcher)
        return batcher

    yield make
    for batcher in made:
        batcher.close()


def _study(manifest: Manifest, seed: int) -> PreparedInputs:
    """Distinct inputs per seed, so that rows of a batch cannot be confused."""
    rng = np.random.default_rng(seed)
    assert manifest.clinical_input is not None
    features = len(manifest.clinical_input.features)
    return PreparedInputs(
        image=rng.standard_normal(manifest.image_input.shape).astype(np.float32),
        clinical=rng.standard_normal(features).astype(np.float32),
        clinical_mask=(rng.random(features) > 0.3).astype(np.float32),
        clinical_used=[],
        source_sop_instance_uid=f"2.25.{seed}",
    )


def _marked(manifest: Manifest, marker: float) -> PreparedInputs:
    """An input the fake runner answers with ``marker`` for every finding."""
    assert manifest.clinical_input is not None
    features = len(manifest.clinical_input.features)
    return PreparedInputs(
        image=np.full(manifest.image_input.shape, marker, dtype=np.float32),
        clinical=np.zeros(features, dtype=np.float32),
        clinical_mask=np.zeros(features, dtype=np.float32),
        clinical_used=[],
        source_sop_instance_uid="",
    )


class RecordingRunner:
    """Wraps the real runner and records the size of every batch it is given."""

    def __init__(self, runner: Runner) -> None:
        self._runner = runner
        self.provider = runner.provider
        self.batch_sizes: list[int] = []

    def run(self, feeds: dict[str, np.ndarray], output_names: list[str]) -> dict[str, np.ndarray]:
        self.batch_sizes.append(len(next(iter(feeds.values()))))
        return self._runner.run(feeds, output_names)


class FakeRunner:
    """Answers each row with its image's first pixel (the marker) for every finding, records the markers of each
    call, and can hold a call until released or raise on chosen calls."""

    provider = "FakeExecutionProvider"

    def __init__(self, manifest: Manifest, *, fail: dict[int, Exception] | None = None) -> None:
        self._image = manifest.image_input.name
        self._findings = len(manifest.outputs.findings)
        self._fail = fail or {}
        self.calls: list[list[float]] = []
        self.hold = threading.Event()
        self.hold.set()
        self.busy = threading.Event()

    def run(self, feeds: dict[str, np.ndarray], output_names: list[str]) -> dict[str, np.ndarray]:
        markers = feeds[self._image][:, 0, 0, 0]
        self.calls.append(markers.tolist())
        self.busy.set()
        if not self.hold.wait(timeout=5):
            raise AssertionError("the test never released the fake runner")
        if len(self.calls) in self._fail:
            raise self._fail[len(self.calls)]
        return {output_names[0]: np.repeat(markers[:, None], self._findings, axis=1)}

    def hold_next_call(self) -> None:
        self.hold.clear()
        self.busy.clear()


def _sample(name: str, model: str) -> float:
    return REGISTRY.get_sample_value(name, {"model": model}) or 0.0


def test_concurrent_callers_share_model_calls_and_each_gets_its_own_logits(
    shipped: tuple[Manifest, Runner], make_batcher: MakeBatcher
) -> None:
    manifest, runner = shipped
    studies = [_study(manifest, seed) for seed in range(16)]
    alone = [pipeline.predict(manifest, runner, [study])[0][0] for study in studies]  # type: ignore[arg-type]
    recording = RecordingRunner(runner)
    batcher = make_batcher(manifest, recording, max_batch=8, max_delay_ms=100, name="test-concurrent")
    start = threading.Barrier(16)
    results: list[BatchResult | None] = [None] * 16

    def caller(index: int) -> None:
        start.wait()
        results[index] = batcher.submit(studies[index], priority=ROUTINE, timeout=10)

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)

    assert sum(recording.batch_sizes) == 16
    assert max(recording.batch_sizes) > 1 and max(recording.batch_sizes) <= 8
    assert len(recording.batch_sizes) < 16
    for result, expected in zip(results, alone, strict=True):
        assert result is not None
        assert result.logits.shape == (len(manifest.outputs.findings),)
        np.testing.assert_allclose(result.logits, expected, atol=1e-5, rtol=0)
        assert result.batch_size in recording.batch_sizes
        assert result.provider == "CPUExecutionProvider"
        assert result.inference_seconds > 0 and result.batch_wait_seconds >= 0
    assert _sample("clinfer_batch_size_count", "test-concurrent") == len(recording.batch_sizes)
    assert _sample("clinfer_batch_size_sum", "test-concurrent") == 16
    assert _sample("clinfer_batch_wait_seconds_count", "test-concurrent") == 16


def test_a_lone_request_is_answered_after_max_delay_in_a_batch_of_one(
    shipped: tuple[Manifest, Runner], make_batcher: MakeBatcher
) -> None:
    manifest, runner = shipped
    batcher = make_batcher(manifest, runner, max_batch=8, max_delay_ms=20)
    started = time.monotonic()
    result = batcher.submit(_study(manifest, 1))
    assert time.monotonic() - started < 2.0
    assert result.batch_size == 1
    assert result.batch_wait_seconds >= 0.020  # it did wait for others to join
    expected = pipeline.predict(manifest, runner, [_study(manifest, 1)])[0][0]  # type: ignore[arg-type]
    np.testing.assert_allclose(result.logits, expected, atol=1e-5, rtol=0)


def test_with_nobody_announced_a_lone_request_goes_at_once(
    shipped: tuple[Manifest, Runner], make_batcher: MakeBatcher
) -> None:
    manifest, runner = shipped
    # a minute of max delay: waiting for it would time the test out
    batcher = make_batcher(manifest, runner, max_batch=8, max_delay_ms=60_000, wait_only_for_announced=True)
    with batcher.arriving() as arrival:
        result = batcher.submit(_study(manifest, 1), arrival=arrival, timeout=120)
    assert result.batch_size == 1
    assert result.batch_wait_seconds < 30  # not the minute of max delay


def test_a_queued_request_waits_for_announced_ones_and_they_share_a_call(
    shipped: tuple[Manifest, Runner], make_batcher: MakeBatcher
) -> None:
    manifest, _ = shipped
    fake = FakeRunner(manifest)
    batcher = make_batcher(manifest, fake, max_batch=8, max_delay_ms=60_000, wait_only_for_announced=True)
    second = batcher.arriving()  # its task is still loading its inputs
    with batcher.arriving() as first:
        early = batcher.submit_async(_marked(manifest, 1.0), arrival=first)
    time.sleep(0.2)
    assert not early.done()  # held for the announced study, not sent alone
    with second:
        late = batcher.submit_async(_marked(manifest, 2.0), arrival=second)
    assert early.result(timeout=10).batch_size == late.result(timeout=10).batch_size == 2
    assert fake.calls == [[1.0, 2.0]]


def test_a_withdrawn_announcement_releases_the_queued_request(
    shipped: tuple[Manifest, Runner], make_batcher: MakeBatcher
) -> None:
    manifest, _ = shipped
    fake = FakeRunner(manifest)
    batcher = make_batcher(manifest, fake, max_batch=8, max_delay_ms=60_000, wait_only_for_announced=True)
    with batcher.arriving():  # this task fails before submitting (its inputs were gone, say)
        queued = batcher.submit_async(_marked(manifest, 3.0))
        time.sleep(0.1)
        assert not queued.done()
    result = queued.result(timeout=10)
    assert result.batch_size == 1 and fake.calls == [[3.0]]


def test_queued_stat_requests_go_into_the_next_batch_before_earlier_routine_ones(
    shipped: tuple[Manifest, Runner], make_batcher: MakeBatcher
) -> None:
    manifest, _ = shipped
    fake = FakeRunner(manifest)
    batcher = make_batcher(manifest, fake, max_batch=2, max_delay_ms=0)
    fake.hold_next_call()
    busy = batcher.submit_async(_marked(manifest, 100))
    assert fake.busy.wait(timeout=5)
    routine = [batcher.submit_async(_marked(manifest, m), priority=ROUTINE) for m in (1, 2, 3)]
    stat = [batcher.submit_async(_marked(manifest, m), priority=STAT) for m in (11, 12)]
    fake.hold.set()

    for future, marker in zip([busy, *routine, *stat], [100, 1, 2, 3, 11, 12], strict=True):
        assert future.result(timeout=5).logits.tolist() == [marker] * len(manifest.outputs.findings)
    assert fake.calls == [[100], [11, 12], [1, 2], [3]]
    assert [f.result().batch_size for f in stat] == [2, 2]


def test_a_request_whose_timeout_passes_while_queued_is_refused_and_others_go_on(
    shipped: tuple[Manifest, Runner], make_batcher: MakeBatcher
) -> None:
    manifest, _ = shipped
    fake = FakeRunner(manifest)
    batcher = make_batcher(manifest, fake, max_batch=4, max_delay_ms=0)
    fake.hold_next_call()
    busy = batcher.submit_async(_marked(manifest, 100))
    assert fake.busy.wait(timeout=5)
    queued_async = batcher.submit_async(_marked(manifest, 2), timeout=0.05)
    with pytest.raises(TransientError, match=r"batch wait exceeded 0\.05 s"):
        batcher.submit(_marked(manifest, 1), timeout=0.05)  # told while the model call is still under way
    assert fake.calls == [[100]]
    fake.hold.set()

    assert busy.result(timeout=5).logits[0] == 100
    with pytest.raises(TransientError, match=r"batch wait exceeded 0\.05 s"):
        queued_async.result(timeout=5)
    assert batcher.submit(_marked(manifest, 7), timeout=5).logits[0] == 7
    assert fake.calls == [[100], [7]]  # neither expired request reached the model


def test_a_transient_failure_of_a_model_call_fails_every_request_of_its_batch_and_the_next_batch_works(
    shipped: tuple[Manifest, Runner], make_batcher: MakeBatcher
) -> None:
    """A device lost says nothing of the inputs: the batch's requests are not run again one by one (each would
    meet the same device), they fail with TransientError and their tasks are tried again later."""
    manifest, _ = shipped
    raised = TransientError("device lost")
    fake = FakeRunner(manifest, fail={2: raised})
    batcher = make_batcher(manifest, fake, max_batch=3, max_delay_ms=0)
    fake.hold_next_call()
    busy = batcher.submit_async(_marked(manifest, 100))
    assert fake.busy.wait(timeout=5)
    doomed = [batcher.submit_async(_marked(manifest, m)) for m in (1, 2, 3)]
    fake.hold.set()

    assert busy.result(timeout=5).logits[0] == 100
    for future in doomed:
        assert future.exception(timeout=5) is raised
    assert batcher.submit(_marked(manifest, 4), timeout=5).logits[0] == 4
    assert fake.calls == [[100], [1, 2, 3], [4]]


def test_a_failed_batch_runs_its_requests_alone_in_priority_order_and_only_the_failing_one_fails(
    shipped: tuple[Manifest, Runner], make_batcher: MakeBatcher
) -> None:
    """Before, one failed model call failed every request of its batch, for good: one bad study took three
    others with it. Now each is run alone (STAT first), and only the one whose own call fails gets the error,
    as a batch of one always did: the untyped runtime error wrapped, code "inference"."""
    manifest, _ = shipped
    batch_error, own_error = RuntimeError("all input arrays must have the same shape"), RuntimeError("bad input 2")
    fake = FakeRunner(manifest, fail={2: batch_error, 5: own_error})
    batcher = make_batcher(manifest, fake, max_batch=3, max_delay_ms=0, name="test-split")
    fake.hold_next_call()
    busy = batcher.submit_async(_marked(manifest, 100))
    assert fake.busy.wait(timeout=5)
    routine = [batcher.submit_async(_marked(manifest, m), priority=ROUTINE) for m in (1, 2)]
    stat = batcher.submit_async(_marked(manifest, 3), priority=STAT)
    calls_before = _sample("clinfer_batch_size_count", "test-split")
    fake.hold.set()

    assert busy.result(timeout=5).logits[0] == 100
    for future, marker in [(stat, 3), (routine[0], 1)]:
        result = future.result(timeout=5)
        assert result.logits.tolist() == [marker] * len(manifest.outputs.findings)
        assert result.batch_size == 1
    error = routine[1].exception(timeout=5)
    assert isinstance(error, ServiceError) and error.code == "inference"
    assert error.__cause__ is own_error and "bad input 2" in str(error)
    assert fake.calls == [[100], [3, 1, 2], [3], [1], [2]]
    # the calls that returned: the one under way when sampled, and the two alone that did (not the failed batch,
    # nor the bad input's own call)
    assert _sample("clinfer_batch_size_count", "test-split") == calls_before + 3
    assert batcher.submit(_marked(manifest, 4), timeout=5).logits[0] == 4  # the next batch works


def test_a_wrongly_shaped_input_in_a_batch_fails_alone_and_the_others_get_their_own_logits(
    shipped: tuple[Manifest, Runner], make_batcher: MakeBatcher
) -> None:
    """Seen in review: a 128x128 image in a batch of 4 failed all 4 ("all input arrays must have the same
    shape"). On the real model: the three others get the logits they get alone; the wrong one fails alone."""
    manifest, runner = shipped
    good = [_study(manifest, seed) for seed in (1, 2, 3)]
    alone = [pipeline.predict(manifest, runner, [study])[0][0] for study in good]  # type: ignore[arg-type]
    wrong = dataclasses.replace(good[0], image=np.zeros((1, 128, 128), dtype=np.float32))
    recording = RecordingRunner(runner)
    batcher = make_batcher(manifest, recording, max_batch=4, max_delay_ms=60_000)  # goes when 4 are queued
    futures = [batcher.submit_async(study) for study in (good[0], wrong, good[1], good[2])]

    results = [futures[i].result(timeout=30) for i in (0, 2, 3)]
    for result, expected in zip(results, alone, strict=True):
        np.testing.assert_allclose(result.logits, expected, atol=1e-5, rtol=0)
        assert result.batch_size == 1
    error = futures[1].exception(timeout=30)
    assert isinstance(error, ServiceError) and error.code == "inference"
    assert "128" in str(error)  # the runtime's own complaint about the image's size
    assert recording.batch_sizes == [1, 1, 1, 1]  # the batch of 4 failed before the runtime (np.stack)


def test_close_answers_pending_requests_and_stops_the_thread(
    shipped: tuple[Manifest, Runner], make_batcher: MakeBatcher
) -> None:
    manifest, _ = shipped
    fake = FakeRunner(manifest)
    batcher = make_batcher(manifest, fake, max_batch=2, max_delay_ms=0, name="test-close")
    fake.hold_next_call()
    busy = batcher.submit_async(_marked(manifest, 100))
    assert fake.busy.wait(timeout=5)
    pending = [batcher.submit_async(_marked(manifest, m)) for m in (1, 2)]
    closer = threading.Thread(target=batcher.close)
    closer.start()
    fake.hold.set()
    closer.join(timeout=5)

    assert not closer.is_alive()
    assert busy.result(timeout=5).logits[0] == 100  # the call under way finishes
    for future in pending:
        with pytest.raises(TransientError, match="closed"):
            future.result(timeout=5)
    assert "batcher-test-close-1" not in [thread.name for thread in threading.enumerate()]
    with pytest.raises(TransientError, match="closed"):
        batcher.submit(_marked(manifest, 3))
    with pytest.raises(TransientError, match="unloaded"):
        _ = batcher.runner
    batcher.close()  # idempotent
    assert fake.calls == [[100]]


def test_arguments_are_checked_early(shipped: tuple[Manifest, Runner], make_batcher: MakeBatcher) -> None:
    manifest, _ = shipped
    fake = FakeRunner(manifest)
    with pytest.raises(ValueError, match="'max_batch' must be a positive int"):
        make_batcher(manifest, fake, max_batch=0)
    with pytest.raises(ValueError, match="exceeds the manifest's batching.max_batch_size 32"):
        make_batcher(manifest, fake, max_batch=33)
    with pytest.raises(ValueError, match="'max_delay_ms' must be >= 0"):
        make_batcher(manifest, fake, max_delay_ms=-1)
    batcher = make_batcher(manifest, fake)
    assert (batcher.max_batch, batcher.max_delay_seconds) == (32, 0.005)  # the manifest's defaults
    with pytest.raises(ValueError, match="'priority' must be between 0 and 9"):
        batcher.submit(_marked(manifest, 1), priority=10)
    with pytest.raises(ValueError, match="'timeout' must be positive"):
        batcher.submit(_marked(manifest, 1), timeout=0)
    assert fake.calls == []


def test_warm_up_runs_the_real_model_on_zeros_of_the_manifest_shapes(
    shipped: tuple[Manifest, Runner], make_batcher: MakeBatcher
) -> None:
    manifest, runner = shipped
    recording = RecordingRunner(runner)
    batcher = make_batcher(manifest, recording, max_batch=8)
    assert warm_up(batcher) > 0
    assert recording.batch_sizes == [8, 7, 6, 5, 4, 3, 2, 1]  # every size a batch can have, largest first
    assert batcher.submit(_study(manifest, 3), timeout=5).batch_size == 1


def test_pool_creates_one_warmed_up_batcher_per_model_version_and_unload_frees_it(
    shipped: tuple[Manifest, Runner],
) -> None:
    manifest, _ = shipped
    pool = BatcherPool()
    runners: list[FakeRunner] = []

    def factory() -> DynamicBatcher:
        runners.append(FakeRunner(manifest))
        return DynamicBatcher(manifest, runners[-1], version="1", max_batch=4, max_delay_ms=1)

    got: list[DynamicBatcher] = []
    start = threading.Barrier(8)

    def getter() -> None:
        start.wait()
        got.append(pool.get("cxr-fusion", "1", factory))

    threads = [threading.Thread(target=getter) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=5)
    try:
        assert len(runners) == 1 and len(got) == 8 and all(b is got[0] for b in got)
        assert runners[0].calls == [[0.0] * n for n in (4, 3, 2, 1)]  # warmed up: every batch size, largest first
        batcher = got[0]
        assert batcher.submit(_marked(manifest, 5), timeout=5).logits[0] == 5
        assert pool.loaded() == [("cxr-fusion", "1")]

        freed = weakref.ref(runners.pop())
        assert pool.unload("cxr-fusion", "1") is True
        assert batcher.closed
        with pytest.raises(TransientError):
            batcher.submit(_marked(manifest, 6))
        got.clear()
        gc.collect()
        assert freed() is None, "the unloaded runner is still referenced"
        assert pool.unload("cxr-fusion", "1") is False and pool.loaded() == []

        again = pool.get("cxr-fusion", "1", factory)
        assert again is not batcher and again.submit(_marked(manifest, 8), timeout=5).logits[0] == 8
    finally:
        pool.close_all()
    assert again.closed and pool.loaded() == []


def test_pool_closes_a_batcher_whose_warm_up_fails_and_tries_again_next_time(
    shipped: tuple[Manifest, Runner],
) -> None:
    manifest, _ = shipped
    pool = BatcherPool()
    made: list[DynamicBatcher] = []

    def failing() -> DynamicBatcher:
        made.append(DynamicBatcher(manifest, FakeRunner(manifest, fail={1: RuntimeError("bad graph")}), version="2"))
        return made[-1]

    with pytest.raises(ModelError, match="fails on a warm-up batch of 32: bad graph"):
        pool.get("cxr-fusion", "2", failing)
    assert made[0].closed and pool.loaded() == []
    try:
        working = pool.get("cxr-fusion", "2", lambda: DynamicBatcher(manifest, FakeRunner(manifest), version="2"))
        assert not working.closed and pool.loaded() == [("cxr-fusion", "2")]
    finally:
        pool.close_all()


def test_a_stat_request_arriving_while_a_failed_batch_runs_one_by_one_goes_before_the_rest(
    shipped: tuple[Manifest, Runner], make_batcher: MakeBatcher
) -> None:
    """Found in review: the requests of a failed batch ran one by one in the batcher's thread without looking at the
    queue, so a STAT study arriving meanwhile waited behind all of them (and timed out behind 16). They go back to
    the queue instead, where a STAT request comes first."""
    manifest, _ = shipped
    in_failing_call, stat_queued = threading.Event(), threading.Event()

    class FailsItsSecondCall(FakeRunner):
        def run(self, feeds: dict[str, np.ndarray], output_names: list[str]) -> dict[str, np.ndarray]:
            if len(self.calls) == 1:  # the batch of four: fails once the STAT request is queued
                self.calls.append(feeds[self._image][:, 0, 0, 0].tolist())
                in_failing_call.set()
                assert stat_queued.wait(timeout=5)
                raise RuntimeError("all input arrays must have the same shape")
            return super().run(feeds, output_names)

    fake = FailsItsSecondCall(manifest)
    batcher = make_batcher(manifest, fake, max_batch=4, max_delay_ms=0, name="test-stat-rerun")
    fake.hold_next_call()
    busy = batcher.submit_async(_marked(manifest, 100))
    assert fake.busy.wait(timeout=5)
    routine = [batcher.submit_async(_marked(manifest, m), priority=ROUTINE) for m in (1, 2, 3, 4)]
    fake.hold.set()
    assert in_failing_call.wait(timeout=5)
    stat = batcher.submit_async(_marked(manifest, 9), priority=STAT)
    stat_queued.set()

    assert busy.result(timeout=5).logits[0] == 100
    assert stat.result(timeout=5).logits[0] == 9
    assert [future.result(timeout=5).logits[0] for future in routine] == [1, 2, 3, 4]
    assert fake.calls == [[100], [1, 2, 3, 4], [9], [1], [2], [3], [4]]
