"""`clinfer bench` end to end on a few studies: the figures it writes are complete and consistent.

Nothing here asserts how fast anything is; it checks that the bench measured what it says it measured.
"""

from __future__ import annotations

import json
from pathlib import Path

from service import bench, metrics
from tests.conftest import make_settings


def test_bench_writes_consistent_figures(tmp_path: Path) -> None:
    # a provider no onnxruntime build has comes first: the bench must say the service fell back to CPU, and why
    settings = make_settings(tmp_path, execution_providers=["NoSuchExecutionProvider", "CPUExecutionProvider"])
    out = tmp_path / "bench.json"
    results = bench.run(
        studies_n=8,
        concurrency=2,
        size=1024,
        out=out,
        database_url=None,
        broker_url=None,
        compare_batching=False,
        model="cxr-fusion",
        settings=settings,
        repeat=2,
        api_threads=2,
    )
    written = json.loads(out.read_text())
    assert written["model_limit"] == results["model_limit"]
    assert len(written["end_to_end"]) == len(results["end_to_end"])
    model = results["model_limit"]
    assert [row["batch_size"] for row in model["by_batch_size"]] == [1, 2, 4, 8, 16, 32]
    assert model["studies_per_second"] == max(row["studies_per_second"] for row in model["by_batch_size"])
    assert results["pipeline_limit"]["studies_per_second"] > 0
    assert results["provider"] == "CPUExecutionProvider"
    assert "NoSuchExecutionProvider: not in this onnxruntime build" in results["provider_fallback_reason"]
    # two rounds, each with every configuration once
    assert [(row["round"], row["concurrency"], row["studies"], row["errors"]) for row in results["end_to_end"]] == [
        (1, 1, 8, 0),
        (1, 2, 8, 0),
        (2, 1, 8, 0),
        (2, 2, 8, 0),
    ]
    assert [(m["concurrency"], m["runs"]) for m in results["medians"]] == [(1, 2), (2, 2)]
    assert "batching" not in results  # not compared in this run
    assert results["api_threads"] == 2  # given to the service it started
    for row in results["end_to_end"]:
        # every study went through the model on the provider the service really used, in batches that add up
        assert row["providers"] == {"CPUExecutionProvider": 8}
        assert sum(size * count for size, count in row["batch_size_histogram"].items()) >= 8
        assert set(row["stage_ms_mean"]) == set(bench.STAGES)
        # the stages are parts of one latency: their sum cannot exceed it by much nor miss much of it
        assert 0.7 <= row["stages_sum_vs_latency"] <= 1.15, row
        assert row["pipeline_limit_before_run"] > 0  # the ratio is to the limit measured next to the run
        assert row["ratio_to_pipeline_limit"] == round(row["studies_per_second"] / row["pipeline_limit_before_run"], 3)
        # where the CPU went, by process: the service's, the client's, and the rest of the machine
        cpu = row["cpu_ms_per_study"]
        assert {"serve", "bench client", "other (database, broker, system)", "total"} <= set(cpu), cpu
        assert all(value >= 0 for value in cpu.values()) and cpu["serve"] > 0
        # the machine's busy time holds the processes' (within the clock ticks' resolution: 10 ms over 8 studies)
        assert cpu["total"] >= 0.9 * (cpu["serve"] + cpu["bench client"]), cpu
        if metrics.load_nvml() is None:
            assert "gpu" not in row  # no GPU: no made-up utilization
    bench.print_table(results)
