"""`clinfer bench`: the service's throughput and latency against the hardware's limits, measured in one run.

Three measurements on the same studies (synthetic chest radiographs from the cohort generator, with their FHIR
Bundles), in this order:

1. **model limit**: the model alone in this process, at each batch size; the best studies/s.
2. **pipeline limit**: decode + pre-process + model, in this process, with one thread per core for the CPU work and
   the model at its best batch size; studies/s, and the single-study latency (decode + pre-process + model at
   batch 1).
3. **end to end**: the real path — FHIR Bundle, STOW-RS, analyze, wait for the report — against a service started
   for the run (the embedded default, or PostgreSQL + Redis with separate workers), at the chosen concurrency;
   studies/s, latency percentiles, per-stage seconds from the jobs' timings, batch sizes, CPU per study by process;
   and, when asked, the same with dynamic batching off. The pipeline limit is measured again just before each run,
   and the run's ratio is taken to that measurement.

Figures are printed and written as JSON, with the ratios of end-to-end throughput to both limits. Nothing here
asserts on time.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime as dt
import http.client
import io
import json
import os
import pickle
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from service import metrics
from service.config import Settings
from service.flows import analysis
from service.inference import pipeline
from service.inference.registry import ModelRegistry
from service.ingest import dicom
from service.schemas import ClinicalContext

STAGES = ("ingest", "queue_wait", "preprocess", "batch_wait", "inference", "postprocess", "report", "response")


@dataclass(frozen=True)
class Study:
    study_instance_uid: str
    part10: bytes
    bundle: dict[str, Any]


def make_studies(n: int, *, size: int, seed: int = 7) -> list[Study]:
    """``n`` synthetic patients (chest radiograph + clinical Bundle) from the cohort generator."""
    from service.training.cohort_files import make_patient_case

    cases = [make_patient_case(seed, index=i, size=size) for i in range(n)]
    return [Study(c.study_instance_uid, c.dicom, c.bundle) for c in cases]


class Progress:
    """A one-line progress bar on stderr; where stderr is not a terminal (a log, CI), only the final line."""

    def __init__(self, label: str, total: int) -> None:
        self.label, self.total, self.done = label, total, 0
        self._live = sys.stderr.isatty()
        self._lock = threading.Lock()
        self._started = time.perf_counter()
        self._draw()

    def step(self) -> None:
        with self._lock:
            self.done += 1
            self._draw()

    def _draw(self) -> None:
        if not self._live and self.done < self.total:
            return
        width = 30
        filled = int(width * self.done / max(self.total, 1))
        rate = self.done / max(time.perf_counter() - self._started, 1e-9)
        sys.stderr.write(
            f"\r{self.label:<14} [{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} {rate:6.1f}/s"
        )
        if self.done >= self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()


# --- 1 and 2: in-process limits ---------------------------------------------------------------------------


def _prepare(manifest: Any, study: Study, max_pixels: int) -> pipeline.PreparedInputs:
    decoded = dicom.decode_image(study.part10, max_pixels=max_pixels)
    return pipeline.pre_process(
        manifest,
        pixels=decoded.pixels,
        photometric_interpretation=decoded.photometric_interpretation,
        window=decoded.window,
        context=ClinicalContext(),
        study_at=dt.datetime(2026, 11, 20, tzinfo=dt.UTC),
        source_sop_instance_uid=study.study_instance_uid,
    )


def model_limit(manifest: Any, runner: Any, prepared: list[pipeline.PreparedInputs]) -> dict[str, Any]:
    rows = []
    for batch_size in (1, 2, 4, 8, 16, 32):
        if batch_size > manifest.batching.max_batch_size:
            break
        batch = (prepared * (batch_size // len(prepared) + 1))[:batch_size]
        pipeline.predict(manifest, runner, batch)
        calls = max(8, 256 // batch_size)
        started = time.perf_counter()
        for _ in range(calls):
            pipeline.predict(manifest, runner, batch)
        seconds = time.perf_counter() - started
        rows.append({"batch_size": batch_size, "studies_per_second": round(batch_size * calls / seconds, 1)})
    best = max(rows, key=lambda r: r["studies_per_second"])
    return {
        "by_batch_size": rows,
        "best_batch_size": best["batch_size"],
        "studies_per_second": best["studies_per_second"],
    }


def _npz(prepared: pipeline.PreparedInputs) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **prepared.arrays())  # type: ignore[arg-type]
    return buffer.getvalue()


def _from_npz(data: bytes) -> np.ndarray:
    with np.load(io.BytesIO(data)) as loaded:
        return {name: loaded[name] for name in loaded.files}["image"]


def _json(prepared: pipeline.PreparedInputs) -> bytes:
    return json.dumps({name: array.tolist() for name, array in prepared.arrays().items()}).encode()


def _from_json(data: bytes) -> np.ndarray:
    return {name: np.asarray(value, dtype=np.float32) for name, value in json.loads(data).items()}["image"]


def _pickle(prepared: pipeline.PreparedInputs) -> bytes:
    return pickle.dumps(prepared.arrays(), protocol=5)


def _from_pickle(data: bytes) -> np.ndarray:
    return pickle.loads(data)["image"]  # type: ignore[no-any-return]


def tensor_serialization(prepared: list[pipeline.PreparedInputs], rounds: int = 20) -> dict[str, Any]:
    """Encode + decode of one study's prepared inputs, per format: the preprocess -> infer hand-off's cost.

    ``clinfer`` is what the service writes (``pipeline.encode_prepared``: a JSON header and ``.npy`` arrays, typed
    and shaped, read without pickle), against ``.npz``, JSON lists (what a naive design sends through the broker)
    and pickle (fast, but unpickling a blob from shared storage runs whatever it names).
    """
    formats: dict[str, tuple[Callable[[pipeline.PreparedInputs], bytes], Callable[[bytes], np.ndarray]]] = {
        "clinfer": (pipeline.encode_prepared, lambda data: pipeline.decode_prepared(data).image),
        "npz": (_npz, _from_npz),
        "json": (_json, _from_json),
        "pickle": (_pickle, _from_pickle),
    }
    rows = {}
    for name, (encode, decode) in formats.items():
        size = 0
        started = time.perf_counter()
        for _ in range(rounds):
            for study in prepared:
                data = encode(study)
                image = decode(data)
                size = len(data)
        seconds = (time.perf_counter() - started) / (rounds * len(prepared))
        if not np.array_equal(image, prepared[-1].image):
            raise AssertionError(f"{name} did not give the image back")
        rows[name] = {"microseconds_per_study": round(seconds * 1e6, 1), "bytes_per_study": size}
    return rows


def pipeline_limit(
    manifest: Any, runner: Any, studies: list[Study], *, best_batch: int, max_pixels: int
) -> dict[str, Any]:
    """Decode + pre-process on one thread per core, the model at its best batch size: the work clinfer must do."""
    single = []
    for study in studies[:10]:
        started = time.perf_counter()
        prepared = _prepare(manifest, study, max_pixels)
        pipeline.predict(manifest, runner, [prepared])
        single.append(time.perf_counter() - started)
    workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        batch: list[pipeline.PreparedInputs] = []
        for prepared in pool.map(lambda s: _prepare(manifest, s, max_pixels), studies):
            batch.append(prepared)
            if len(batch) == best_batch:
                pipeline.predict(manifest, runner, batch)
                batch = []
        if batch:
            pipeline.predict(manifest, runner, batch)
    seconds = time.perf_counter() - started
    return {
        "threads": workers,
        "studies_per_second": round(len(studies) / seconds, 1),
        "single_study_latency_ms": round(statistics.median(single) * 1000, 1),
    }


# --- 3: end to end ---------------------------------------------------------------------------------------------


class GpuSampler:
    """GPU utilization and memory sampled from NVML every ``period`` seconds while a run lasts (none without a GPU)."""

    def __init__(self, period: float = 0.1) -> None:
        self.period = period
        self.samples: list[list[metrics.GpuReading]] = []
        self._nvml = metrics.load_nvml()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="bench-gpu-sampler", daemon=True)

    def __enter__(self) -> GpuSampler:
        if self._nvml is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _loop(self) -> None:
        while not self._stop.wait(self.period):
            self.samples.append(metrics.gpu_readings(self._nvml))

    def summary(self) -> list[dict[str, Any]]:
        """Per GPU: mean and peak utilization, peak memory in use (MiB), over the samples."""
        out = []
        for index in range(len(self.samples[0])):
            readings = [sample[index] for sample in self.samples if len(sample) > index]
            out.append(
                {
                    "gpu": readings[0].name,
                    "samples": len(readings),
                    "utilization_mean": round(statistics.mean(r.utilization for r in readings), 3),
                    "utilization_max": round(max(r.utilization for r in readings), 3),
                    "memory_used_max_mib": round(max(r.memory_used_bytes for r in readings) / 2**20, 1),
                }
            )
        return out


class CpuMeter:
    """CPU seconds spent during a run, by who spent them: each clinfer process (with its children, such as the
    API processes `clinfer serve` starts), the bench's own client, and the rest of the machine (PostgreSQL, Redis,
    the kernel). Read from /proc; on a system without it there is no breakdown (``summary`` is empty)."""

    _TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    def __init__(self, processes: dict[str, int]) -> None:
        self.processes = processes
        self._start = self._read()

    @staticmethod
    def _stat(pid: int) -> tuple[int, float] | None:
        """(parent pid, CPU seconds) of ``pid``; None once it is gone."""
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        return int(fields[1]), (int(fields[11]) + int(fields[12])) / CpuMeter._TICK

    def _read(self) -> dict[str, float] | None:
        if not Path("/proc/stat").exists():
            return None
        total = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        ticks = [int(v) for v in total]
        busy = (sum(ticks[:8]) - ticks[3] - ticks[4]) / self._TICK  # all but idle and iowait
        stats = {int(d.name): s for d in Path("/proc").iterdir() if d.name.isdigit() and (s := self._stat(int(d.name)))}
        children: dict[int, list[int]] = {}
        for pid, (parent, _) in stats.items():
            children.setdefault(parent, []).append(pid)

        def tree(pid: int) -> float:
            return stats.get(pid, (0, 0.0))[1] + sum(tree(child) for child in children.get(pid, []))

        self_cpu = os.times()
        out = {name: tree(pid) for name, pid in self.processes.items()}
        out["bench client"] = self_cpu.user + self_cpu.system
        out["machine"] = busy
        return out

    def summary(self, studies: int) -> dict[str, float]:
        """CPU milliseconds per study by who spent them, with "other" the rest of the machine's busy time."""
        end = self._read()
        if self._start is None or end is None or not studies:
            return {}
        spent = {name: end[name] - self._start.get(name, 0.0) for name in end}
        machine = spent.pop("machine")
        spent["other (database, broker, system)"] = max(machine - sum(spent.values()), 0.0)
        spent["total"] = machine
        return {name: round(seconds * 1000 / studies, 1) for name, seconds in spent.items()}


def _free_ports(n: int) -> list[int]:
    """``n`` distinct ports free now: held open together while chosen, so the OS cannot hand one out twice (a
    worker given the port of another would fail to serve its metrics and exit at start)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(n)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]


def _clinfer() -> list[str]:
    found = shutil.which("clinfer", path=str(Path(sys.executable).parent))
    return [found] if found else [sys.executable, "-m", "service.cli"]


@contextlib.contextmanager
def running_service(
    *,
    state_dir: Path,
    database_url: str | None,
    broker_url: str | None,
    batching: bool,
    workers: int,
    providers: list[str],
    api_workers: int = 1,
    preprocess_workers: int = 1,
    api_threads: int | None = None,
) -> Iterator[tuple[str, Settings, dict[str, int]]]:
    """`clinfer serve` (embedded worker) or `clinfer serve` + `clinfer worker` processes for the run."""
    port, *metrics_ports = _free_ports(2 + preprocess_workers)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("CLINFER_")},
        "CLINFER_STATE_DIR": str(state_dir),
        "CLINFER_PORT": str(port),
        "CLINFER_DIMSE_EMBEDDED": "false",
        "CLINFER_DICOM_RESULTS": "false",
        "CLINFER_STUDY_STABLE_SECONDS": "3600",
        "CLINFER_BATCHING": "true" if batching else "false",
        "CLINFER_WORKER_CONCURRENCY": str(workers),
        "CLINFER_EXECUTION_PROVIDERS": json.dumps(providers),
    }
    if api_threads is not None:
        env["CLINFER_API_THREADS"] = str(api_threads)
    if database_url:
        env["CLINFER_DATABASE_URL"] = database_url
    if broker_url:
        env["CLINFER_BROKER_URL"] = broker_url
        env["CLINFER_API_WORKERS"] = str(api_workers)
    logs = state_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    processes = [
        subprocess.Popen(
            [*_clinfer(), "serve"], env=env, stdout=(logs / "serve.log").open("w"), stderr=subprocess.STDOUT
        )
    ]
    try:
        base = f"http://127.0.0.1:{port}"
        # up (migrations done) before the workers start; ready (database, broker, models) before the run
        _wait_ok(f"{base}/healthz", "did not start", serve=processes[0], logs=logs)
        queues: list[tuple[str, int]] = []
        if broker_url:
            # CPU work (decode) scales by processes, not threads; one infer worker owns the model (the GPU)
            queues = [("preprocess", i) for i in range(preprocess_workers)] + [("infer", 0)]
            for (name, index), metrics_port in zip(queues, metrics_ports, strict=True):
                processes.append(
                    subprocess.Popen(
                        [*_clinfer(), "worker", "--queues", name, "--concurrency", str(workers), "--pool", "threads"],
                        env={**env, "CLINFER_WORKER_METRICS_PORT": str(metrics_port)},
                        stdout=(logs / f"worker-{name}-{index}.log").open("w"),
                        stderr=subprocess.STDOUT,
                    )
                )
            time.sleep(3)
            dead = [p.args for p in processes if p.poll() is not None]
            if dead:
                raise RuntimeError(f"a clinfer process exited at start ({dead})\n{_log_tails(logs)}")
        _wait_ok(f"{base}/readyz", "is not ready", serve=processes[0], logs=logs)
        settings = Settings(state_dir=state_dir, database_url=database_url, broker_url=broker_url)
        names = ["serve"] + [f"worker {name} {index}" for name, index in queues]
        yield base, settings, {name: process.pid for name, process in zip(names, processes, strict=True)}
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()


def _wait_ok(url: str, failure: str, *, serve: subprocess.Popen[bytes], logs: Path, seconds: float = 60) -> None:
    """Until ``url`` answers 200; else fail the run at once with its last answer and the logs' tails (an
    unreachable broker, say, would otherwise leave every study waiting for its report)."""
    deadline = time.monotonic() + seconds
    answer = ""
    while serve.poll() is None and time.monotonic() < deadline:
        try:
            response = httpx.get(url, timeout=5)
            if response.status_code == 200:
                return
            answer = response.text
        except httpx.HTTPError as e:
            answer = str(e)
        time.sleep(0.2)
    raise RuntimeError(f"clinfer serve {failure}: {answer}\n{_log_tails(logs)}")


def _log_tails(logs: Path, lines: int = 5) -> str:
    """The last lines of each process's log (the run's folder is removed when it ends)."""
    tails = []
    for log_file in sorted(logs.glob("*.log")):
        last = log_file.read_text(errors="replace").splitlines()[-lines:]
        tails.append(f"--- {log_file.name}\n" + "\n".join(last))
    return "\n".join(tails)


@dataclass
class StudyRun:
    latency: float
    stages: dict[str, float]
    batch_size: int
    provider: str


@dataclass
class EndToEnd:
    concurrency: int
    seconds: float = 0.0
    runs: list[StudyRun] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    cpu_ms_per_study: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class _Timed:
    """One study as the client saw it; the job's own timings are fetched once the run is over."""

    job_id: str
    started: float
    ingested: float
    finished: float


class RequestFailed(Exception):
    """An answer of 400 or more to a timed request."""


class _Client:
    """One client's keep-alive connection for the timed requests, on the standard library's http.client.

    The load generator shares the cores with the service it measures, so its CPU is taken from the service: a study's
    four requests cost this client 3.1 ms of CPU against 6.9 with httpx (medians of six alternating rounds against
    the same service).
    """

    def __init__(self, base: str, timeout: float) -> None:
        parsed = urllib.parse.urlsplit(base)
        self._host, self._port, self._timeout = parsed.hostname or "127.0.0.1", parsed.port, timeout
        self._connection: http.client.HTTPConnection | None = None

    def request(
        self, method: str, path: str, *, headers: dict[str, str], body: bytes | None = None
    ) -> tuple[int, bytes]:
        if self._connection is None:
            self._connection = http.client.HTTPConnection(self._host, self._port, timeout=self._timeout)
        try:
            self._connection.request(method, path, body=body, headers=headers)
            response = self._connection.getresponse()
            data = response.read()
        except BaseException:
            self.close()  # the next request opens a new connection
            raise
        if response.status >= 400:
            raise RequestFailed(f"{method} {path.split('?')[0]}: {response.status} {data[:200]!r}")
        return response.status, data

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None


_REQUEST_ERRORS = (OSError, http.client.HTTPException, RequestFailed, KeyError, ValueError)


def _one_study(http: _Client, study: Study, ingest: dict[str, str], clinician: dict[str, str]) -> _Timed:
    started = time.time()
    http.request(
        "POST", "/fhir", body=json.dumps(study.bundle).encode(), headers={**ingest, "Content-Type": "application/json"}
    )
    boundary = "clinferbench"
    body = (
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        + study.part10
        + f"\r\n--{boundary}--\r\n".encode()
    )
    http.request(
        "POST",
        "/dicomweb/studies",
        body=body,
        headers={**ingest, "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'},
    )
    uid = urllib.parse.quote(study.study_instance_uid)
    _, analyzed = http.request("POST", f"/v1/studies/{uid}/analyze", headers=clinician)
    ingested = time.time()
    http.request("GET", f"/v1/studies/{uid}/report?wait=120", headers=clinician)
    finished = time.time()
    return _Timed(json.loads(analyzed)["jobs"][0]["id"], started, ingested, finished)


def _study_run(http: httpx.Client, timed: _Timed, clinician: dict[str, str]) -> StudyRun:
    """The client's times with the job's stage timings (GET /v1/jobs/{id}, after the run: not measured)."""
    response = http.get(f"/v1/jobs/{timed.job_id}", headers=clinician)
    response.raise_for_status()
    timings = response.json()["timings"] or {}
    job_stages = analysis.job_stage_seconds(timings)  # a stage missing from the timings is a KeyError here
    stages = {
        "ingest": timed.ingested - timed.started,
        "queue_wait": job_stages["queue_wait_preprocess"] + job_stages["queue_wait_infer"],
        **{stage: job_stages[stage] for stage in ("preprocess", "batch_wait", "inference", "postprocess", "report")},
        "response": timed.finished - timings["report_stored"],
    }
    return StudyRun(
        timed.finished - timed.started, stages, int(timings.get("batch_size", 1)), str(timings.get("provider", ""))
    )


def _token(settings: Settings, role: str) -> str:
    """A token from the service's own dev key (`clinfer token`), as an operator would mint one."""
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("CLINFER_")},
        "CLINFER_STATE_DIR": str(settings.state_dir),
    }
    made = subprocess.run([*_clinfer(), "token", "--role", role], env=env, capture_output=True, text=True, check=True)
    return made.stdout.strip()


def end_to_end(
    base: str,
    settings: Settings,
    studies: list[Study],
    *,
    concurrency: int,
    label: str,
    processes: dict[str, int] | None = None,
) -> EndToEnd:
    ingest = {"Authorization": f"Bearer {_token(settings, 'ingest')}"}
    clinician = {"Authorization": f"Bearer {_token(settings, 'clinician')}"}
    result = EndToEnd(concurrency=concurrency)
    progress = Progress(label, len(studies))
    pending = list(reversed(studies))
    lock = threading.Lock()
    timed: list[_Timed] = []

    def client() -> None:
        http = _Client(base, timeout=180)
        try:
            while True:
                with lock:
                    if not pending:
                        return
                    study = pending.pop()
                try:
                    one = _one_study(http, study, ingest, clinician)
                    with lock:
                        timed.append(one)
                except _REQUEST_ERRORS as e:
                    with lock:
                        result.errors.append(f"{type(e).__name__}: {e}")
                progress.step()
        finally:
            http.close()

    meter = CpuMeter(processes or {})
    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    result.seconds = time.perf_counter() - started
    result.cpu_ms_per_study = meter.summary(len(timed))
    with httpx.Client(base_url=base, timeout=30) as http:
        for one in timed:
            try:
                result.runs.append(_study_run(http, one, clinician))
            except (httpx.HTTPError, KeyError) as e:
                result.errors.append(f"{type(e).__name__}: {e}")
    return result


def summarize(run: EndToEnd) -> dict[str, Any]:
    latencies = sorted(r.latency for r in run.runs)
    if not latencies:
        return {"concurrency": run.concurrency, "studies": 0, "errors": run.errors[:5]}

    def percentile(q: float) -> float:
        return round(float(np.percentile(latencies, q)) * 1000, 1)

    stages = {s: round(statistics.mean(r.stages[s] for r in run.runs) * 1000, 2) for s in STAGES}
    stage_sum = sum(stages.values())
    mean_latency = statistics.mean(latencies) * 1000
    return {
        "concurrency": run.concurrency,
        "studies": len(run.runs),
        "errors": len(run.errors),
        "error_examples": run.errors[:3],
        "studies_per_second": round(len(run.runs) / run.seconds, 2),
        "latency_ms": {
            "p50": percentile(50),
            "p95": percentile(95),
            "p99": percentile(99),
            "mean": round(mean_latency, 1),
        },
        "stage_ms_mean": stages,
        "stages_sum_vs_latency": round(stage_sum / mean_latency, 3),
        "batch_size_histogram": dict(sorted(Counter(r.batch_size for r in run.runs).items())),
        "providers": dict(Counter(r.provider for r in run.runs)),
        "cpu_ms_per_study": run.cpu_ms_per_study,
    }


def run(
    *,
    studies_n: int,
    concurrency: int,
    size: int,
    out: Path | None,
    database_url: str | None,
    broker_url: str | None,
    compare_batching: bool,
    model: str,
    settings: Settings,
    api_workers: int = 1,
    preprocess_workers: int = 1,
    repeat: int = 1,
    api_threads: int | None = None,
) -> dict[str, Any]:
    """The limits, then each end-to-end configuration ``repeat`` times, in rounds (every configuration once per
    round), so that a drift of the machine's speed reaches all configurations alike; figures are the medians."""
    studies = make_studies(studies_n, size=size)
    registry = ModelRegistry(**settings.model_registry_options())
    registry.load()
    registered = registry.get_or_raise(model)
    manifest = registered.manifest
    runner = registry.runner(model, manifest.latest().version)
    prepared = [_prepare(manifest, s, settings.max_decoded_pixels) for s in studies[:8]]
    model_figures = model_limit(manifest, runner, prepared)
    serialization = tensor_serialization(prepared)
    pipeline_figures = pipeline_limit(
        manifest, runner, studies, best_batch=model_figures["best_batch_size"], max_pixels=settings.max_decoded_pixels
    )
    results: dict[str, Any] = {
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {
            "python": platform.python_version(),
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
        },
        "model": f"{manifest.name}:{manifest.latest().version}",
        "provider": runner.provider,
        "provider_fallback_reason": getattr(runner, "fallback_reason", None),
        "gpus": [reading.name for reading in metrics.gpu_readings(nvml)] if (nvml := metrics.load_nvml()) else [],
        "studies": studies_n,
        "image_size": size,
        "deployment": (
            f"postgresql+redis, {api_workers} API process(es), {preprocess_workers} preprocess and 1 infer worker"
            if broker_url
            else "embedded (SQLite, in-process worker)"
        ),
        # the service's own environment leaves out the caller's CLINFER_ variables: its default unless given
        "api_threads": api_threads if api_threads is not None else Settings.model_fields["api_threads"].default,
        "model_limit": model_figures,
        "pipeline_limit": pipeline_figures,
        "tensor_serialization": serialization,
        "end_to_end": [],
    }
    runs = [(concurrency, True)]
    if concurrency != 1:
        runs.insert(0, (1, True))
    if compare_batching:
        runs += [(16, True), (16, False)]
    for index, (round_index, (clients, batching)) in enumerate(
        rounds(runs, repeat=repeat, batching_pair=compare_batching)
    ):
        # measured again just before each run (the first run's is the measurement just made), and the run's ratio
        # taken to it: a shared virtual machine's speed drifts (this one's pipeline limit moved between 96 and 127
        # studies/s within minutes), which a single measurement at the start would carry into every ratio
        best = model_figures["best_batch_size"]
        adjacent = (
            pipeline_figures
            if index == 0
            else pipeline_limit(manifest, runner, studies, best_batch=best, max_pixels=settings.max_decoded_pixels)
        )
        with tempfile.TemporaryDirectory(prefix="clinfer-bench-") as state:
            url = database_url
            if database_url and database_url.startswith("postgresql"):
                url = _fresh_postgres(database_url)
            with (
                running_service(
                    state_dir=Path(state),
                    database_url=url,
                    broker_url=broker_url,
                    batching=batching,
                    workers=max(2, clients),
                    providers=list(settings.execution_providers),
                    api_workers=api_workers,
                    preprocess_workers=preprocess_workers,
                    api_threads=api_threads,
                ) as (base, service_settings, processes),
                GpuSampler() as gpu,
            ):
                subset = studies if clients > 1 else studies[: max(10, len(studies) // 4)]
                measured = end_to_end(
                    base,
                    service_settings,
                    subset,
                    concurrency=clients,
                    label=f"c={clients} batch={'on' if batching else 'off'}",
                    processes=processes,
                )
            if url and url != database_url:
                _drop_postgres(database_url or "", url)
            summary = summarize(measured) | {"batching": batching, "round": round_index + 1}
            if gpu.samples:
                summary["gpu"] = gpu.summary()
            summary["pipeline_limit_before_run"] = adjacent["studies_per_second"]
            summary["ratio_to_pipeline_limit"] = round(
                summary.get("studies_per_second", 0) / adjacent["studies_per_second"], 3
            )
            summary["ratio_to_model_limit"] = round(
                summary.get("studies_per_second", 0) / model_figures["studies_per_second"], 3
            )
            results["end_to_end"].append(summary)
    results["medians"] = medians(results["end_to_end"])
    if compare_batching:
        results["batching"] = batching_comparison(results["end_to_end"], model_figures)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2))
    return results


def rounds(
    runs: list[tuple[int, bool]], *, repeat: int, batching_pair: bool
) -> list[tuple[int, tuple[int, bool]]]:
    """(round index, run) in the order to run them: each run once per round; with ``batching_pair`` (the last two
    runs, batching on and off), every other round runs that pair the other way round, since a run can be slowed by
    what the one before it left (a checkpoint, the page cache) and a fixed order would hand that to one side."""
    swapped = [*runs[:-2], runs[-1], runs[-2]] if batching_pair else runs
    return [(r, run) for r in range(max(1, repeat)) for run in (runs if r % 2 == 0 else swapped)]


def medians(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per configuration (clients, batching), the median of its runs' figures."""
    grouped: dict[tuple[int, bool], list[dict[str, Any]]] = {}
    for row in rows:
        if row.get("studies"):
            grouped.setdefault((row["concurrency"], row["batching"]), []).append(row)
    return [
        {
            "concurrency": clients,
            "batching": batching,
            "runs": len(group),
            "studies_per_second": round(statistics.median(r["studies_per_second"] for r in group), 2),
            "p50_ms": round(statistics.median(r["latency_ms"]["p50"] for r in group), 1),
            "ratio_to_pipeline_limit": round(statistics.median(r["ratio_to_pipeline_limit"] for r in group), 3),
            "cpu_ms_per_study": round(statistics.median(r["cpu_ms_per_study"].get("total", 0.0) for r in group), 1),
        }
        for (clients, batching), group in grouped.items()
    ]


def batching_comparison(rows: list[dict[str, Any]], model_figures: dict[str, Any]) -> dict[str, Any]:
    """Dynamic batching on against off at 16 clients: the throughput gain of each round's pair (run one after the
    other, so the machine's drift between rounds cancels), their median, and the share of the model's own gain
    from batch 1 to its best batch that the service keeps."""
    by_round: dict[int, dict[bool, float]] = {}
    for row in rows:
        if row["concurrency"] == 16 and row.get("studies"):
            by_round.setdefault(row.get("round", 1), {})[row["batching"]] = row["studies_per_second"]
    gains = [pair[True] / pair[False] - 1 for _, pair in sorted(by_round.items()) if len(pair) == 2 and pair[False]]
    batch_1 = next(r["studies_per_second"] for r in model_figures["by_batch_size"] if r["batch_size"] == 1)
    model_gain = model_figures["studies_per_second"] / batch_1 - 1
    comparison: dict[str, Any] = {
        "model_gain": round(model_gain, 3),
        "paired_gains": [round(g, 3) for g in gains],
        "end_to_end_gain": round(statistics.median(gains), 3) if gains else None,
    }
    comparison["kept_of_model_gain"] = (
        round(comparison["end_to_end_gain"] / model_gain, 2) if gains and model_gain > 0 else None
    )
    return comparison


def _fresh_postgres(url: str) -> str:
    """A new, empty database beside ``url``'s, so each run starts alike."""
    import uuid

    import sqlalchemy

    name = f"clinfer_bench_{uuid.uuid4().hex[:10]}"
    admin = sqlalchemy.create_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.exec_driver_sql(f'CREATE DATABASE "{name}"')
    admin.dispose()
    return url.rsplit("/", 1)[0] + f"/{name}"


def _drop_postgres(admin_url: str, url: str) -> None:
    import sqlalchemy

    admin = sqlalchemy.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)')
    admin.dispose()


def print_table(results: dict[str, Any]) -> None:
    model, pipe = results["model_limit"], results["pipeline_limit"]
    print(
        f"model {results['model']} on {results['provider']}, {results['studies']} studies of {results['image_size']}²,"
        f" {results['machine']['cpus']} CPUs; {results['deployment']}, {results['api_threads']} API threads"
    )
    if results.get("gpus"):
        print(f"GPU(s): {', '.join(results['gpus'])}")
    if results.get("provider_fallback_reason"):
        print(f"provider fallback: {results['provider_fallback_reason']}")
    by_batch = ", ".join(f"b{r['batch_size']} {r['studies_per_second']}" for r in model["by_batch_size"])
    best = model["best_batch_size"]
    print(f"model limit     {model['studies_per_second']:>8} studies/s (best batch {best}; {by_batch})")
    print(
        f"pipeline limit  {pipe['studies_per_second']:>8} studies/s ({pipe['threads']} threads);"
        f" one study {pipe['single_study_latency_ms']} ms"
    )
    serialization = ", ".join(
        f"{name} {row['microseconds_per_study']} µs / {row['bytes_per_study'] // 1024} KiB"
        for name, row in results["tensor_serialization"].items()
    )
    print(f"tensors preprocess -> infer, encode + decode per study: {serialization}")
    print(
        f"{'clients':>7} {'batching':>8} {'studies/s':>9} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8}"
        f" {'vs pipeline':>11} {'vs model':>8} {'stages/latency':>14}"
    )
    for row in results["end_to_end"]:
        if not row.get("studies"):
            print(f"{row['concurrency']:>7} no study finished: {row.get('errors')}")
            continue
        latency = row["latency_ms"]
        print(
            f"{row['concurrency']:>7} {'on' if row['batching'] else 'off':>8} {row['studies_per_second']:>9}"
            f" {latency['p50']:>8} {latency['p95']:>8} {latency['p99']:>8} {row['ratio_to_pipeline_limit']:>11}"
            f" {row['ratio_to_model_limit']:>8} {row['stages_sum_vs_latency']:>14}"
        )
        print(f"{'':>7} pipeline limit measured just before this run: {row['pipeline_limit_before_run']} studies/s")
        stages = ", ".join(f"{k} {v}" for k, v in row["stage_ms_mean"].items())
        print(f"{'':>7} stages (mean ms): {stages}; batch sizes {row['batch_size_histogram']}")
        print(f"{'':>7} provider(s) used by the service: {row['providers']}")
        if row.get("cpu_ms_per_study"):
            cpu = ", ".join(f"{k} {v}" for k, v in row["cpu_ms_per_study"].items())
            print(f"{'':>7} CPU ms per study: {cpu}")
        for gpu in row.get("gpu", []):
            print(
                f"{'':>7} {gpu['gpu']}: utilization mean {gpu['utilization_mean']:.0%},"
                f" peak {gpu['utilization_max']:.0%}; memory in use at most {gpu['memory_used_max_mib']} MiB"
            )
    if any(row["runs"] > 1 for row in results.get("medians", [])):
        print("medians over the rounds:")
        for row in results["medians"]:
            print(
                f"{row['concurrency']:>7} {'on' if row['batching'] else 'off':>8} {row['studies_per_second']:>9}"
                f" p50 {row['p50_ms']} ms, vs pipeline {row['ratio_to_pipeline_limit']},"
                f" CPU {row['cpu_ms_per_study']} ms/study ({row['runs']} runs)"
            )
    if comparison := results.get("batching"):
        gain = comparison["end_to_end_gain"]
        print(
            f"batching at 16 clients: {'n/a' if gain is None else f'{gain:+.1%}'} studies/s on against off"
            f" (each round's pair: {', '.join(f'{g:+.1%}' for g in comparison['paired_gains'])});"
            f" the model alone {comparison['model_gain']:+.1%} from batch 1 to its best;"
            f" kept {comparison['kept_of_model_gain']}"
        )
