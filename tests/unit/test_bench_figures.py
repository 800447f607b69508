"""How `clinfer bench` turns repeated runs into figures: medians per configuration, and the batching comparison
taken round by round (each round's on and off runs are neighbours, so the machine's drift between rounds cancels)."""

from __future__ import annotations

from typing import Any

from service import bench


def row(clients: int, batching: bool, round_: int, rate: float, *, p50: float = 100.0) -> dict[str, Any]:
    return {
        "concurrency": clients,
        "batching": batching,
        "round": round_,
        "studies": 10,
        "studies_per_second": rate,
        "latency_ms": {"p50": p50},
        "ratio_to_pipeline_limit": round(rate / 100, 3),
        "cpu_ms_per_study": {"total": 200.0 / round_},
    }


MODEL = {"by_batch_size": [{"batch_size": 1, "studies_per_second": 100.0}], "studies_per_second": 150.0}


def test_medians_per_configuration_leave_out_runs_without_studies() -> None:
    rows = [row(8, True, 1, 9.0, p50=700), row(8, True, 2, 11.0, p50=500), row(8, True, 3, 10.0, p50=900)]
    rows.append({"concurrency": 8, "batching": True, "round": 4, "studies": 0, "errors": ["down"]})
    rows.append(row(1, True, 1, 5.0))
    assert bench.medians(rows) == [
        {
            "concurrency": 8,
            "batching": True,
            "runs": 3,
            "studies_per_second": 10.0,
            "p50_ms": 700.0,
            "ratio_to_pipeline_limit": 0.1,
            "cpu_ms_per_study": 100.0,
        },
        {
            "concurrency": 1,
            "batching": True,
            "runs": 1,
            "studies_per_second": 5.0,
            "p50_ms": 100.0,
            "ratio_to_pipeline_limit": 0.05,
            "cpu_ms_per_study": 200.0,
        },
    ]


def test_batching_gain_is_the_median_of_each_rounds_pair() -> None:
    # the machine slows down by half between rounds: a comparison of all "on" runs with all "off" runs would mix
    # that drift in, each round's pair does not
    rows = [
        row(16, True, 1, 11.0),
        row(16, False, 1, 10.0),
        row(16, True, 2, 5.0),
        row(16, False, 2, 5.0),
        row(16, True, 3, 6.6),
        row(16, False, 3, 6.0),
        row(8, True, 1, 50.0),
    ]
    comparison = bench.batching_comparison(rows, MODEL)
    assert comparison["paired_gains"] == [0.1, 0.0, 0.1]
    assert comparison["end_to_end_gain"] == 0.1
    assert comparison["model_gain"] == 0.5
    assert comparison["kept_of_model_gain"] == 0.2


def test_batching_comparison_without_a_complete_pair_says_so() -> None:
    comparison = bench.batching_comparison([row(16, True, 1, 11.0)], MODEL)
    assert comparison["paired_gains"] == [] and comparison["end_to_end_gain"] is None
    assert comparison["kept_of_model_gain"] is None


def test_every_other_round_runs_the_batching_pair_the_other_way_round() -> None:
    runs = [(1, True), (8, True), (16, True), (16, False)]
    assert bench.rounds(runs, repeat=3, batching_pair=True) == [
        *[(0, run) for run in runs],
        (1, (1, True)),
        (1, (8, True)),
        (1, (16, False)),
        (1, (16, True)),
        *[(2, run) for run in runs],
    ]
    assert bench.rounds([(1, True), (2, True)], repeat=2, batching_pair=False) == [
        (0, (1, True)),
        (0, (2, True)),
        (1, (1, True)),
        (1, (2, True)),
    ]
