"""`clinfer bench`: figures for the inference path, as ratios against a baseline measured in the same run.

Baseline: batch size 1. Measured: pre-processing per study (2048x2048 12-bit image), and model throughput at the
manifest's preferred and maximum batch sizes. Prints a table and writes JSON; asserts nothing about time.
"""

from __future__ import annotations

import datetime as dt
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from service.config import Settings
from service.inference import pipeline
from service.inference.registry import ModelRegistry
from service.schemas import ClinicalContext
from service.training.synthetic import render_chest_radiograph, sample_findings


def _timed(fn: Any, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return times


def run(settings: Settings, *, out_dir: Path, model: str, repeats: int = 20, size: int = 2048) -> dict[str, Any]:
    registry = ModelRegistry(root=settings.model_repository, providers=list(settings.execution_providers))
    registry.load()
    registered = registry.get_or_raise(model)
    manifest, version = registered.manifest, registered.manifest.latest()
    runner = registry.runner(model, version.version)
    rng = np.random.default_rng(0)
    pixels = render_chest_radiograph(rng, sample_findings(rng), size=size).astype(np.float32)
    study_at = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)

    def prepare() -> pipeline.PreparedInputs:
        return pipeline.pre_process(
            manifest,
            pixels=pixels,
            photometric_interpretation="MONOCHROME2",
            window=None,
            context=ClinicalContext(),
            study_at=study_at,
            source_sop_instance_uid="1.2.3",
        )

    prepared = prepare()
    preprocess_s = _timed(prepare, max(3, repeats // 4))
    results: dict[str, Any] = {
        "model": f"{manifest.name}:{version.version}",
        "provider": runner.provider,
        "machine": {"python": platform.python_version(), "processor": platform.processor() or platform.machine()},
        "preprocess_ms_median": round(statistics.median(preprocess_s) * 1000, 2),
        "image_size": size,
        "batches": [],
    }
    sizes = sorted({1, manifest.batching.preferred_batch_size, manifest.batching.max_batch_size})
    baseline = None
    for batch_size in sizes:
        batch = [prepared] * batch_size
        pipeline.predict(manifest, runner, batch)  # warm-up
        seconds = [pipeline.predict(manifest, runner, batch)[1] for _ in range(repeats)]
        median = statistics.median(seconds)
        throughput = batch_size / median
        baseline = baseline or throughput
        results["batches"].append(
            {
                "batch_size": batch_size,
                "latency_ms_median": round(median * 1000, 3),
                "studies_per_second": round(throughput, 1),
                "throughput_vs_batch_1": round(throughput / baseline, 2),
            }
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench.json").write_text(json.dumps(results, indent=2))
    return results


def print_table(results: dict[str, Any]) -> None:
    print(f"model {results['model']} on {results['provider']}")
    print(f"pre-processing ({results['image_size']}x{results['image_size']}): {results['preprocess_ms_median']} ms")
    print(f"{'batch':>6} {'latency ms':>11} {'studies/s':>10} {'vs batch 1':>11}")
    for row in results["batches"]:
        print(
            f"{row['batch_size']:>6} {row['latency_ms_median']:>11} {row['studies_per_second']:>10} "
            f"{row['throughput_vs_batch_1']:>10}x"
        )
