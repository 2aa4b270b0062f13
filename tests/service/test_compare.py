"""service.compare on job documents: rows from stored results, where bytes and latency come
from, the Pareto set, the baseline, the request's checks and the Markdown rendering."""
from __future__ import annotations

import pytest

from api.routes.reports import CompareReport
from service.compare import (
    MAX_JOBS,
    compare,
    file_measurements,
    job_label,
    pareto_front,
    parse_job_ids,
    to_markdown,
)
from service.errors import Unprocessable


def params(total: int, nonzero: int | None = None, trainable: int | None = None) -> dict:
    return {"total": total, "nonzero": total if nonzero is None else nonzero,
            "trainable": total if trainable is None else trainable}


def job(job_id: str, ops: list[str], after: dict | None, steps: list[dict] | None = None,
        status: str = "succeeded", before: dict | None = None) -> dict:
    result = None if after is None else {
        "model_id": f"m-{job_id}", "after": after, "before": before,
        "steps": steps if steps is not None else [{"op": op} for op in ops]}
    return {"id": job_id, "status": status, "spec": {"steps": [{"op": op} for op in ops]},
            "result": result}


def test_pareto_front_keeps_ties_and_drops_dominated_points():
    points = [(1000, 0.90), (500, 0.85), (1000, 0.80), (500, 0.85), (2000, 0.89),
              (None, 0.99), (10, None), (300, 0.70)]
    # (1000, .8) is dominated by (1000, .9), (2000, .89) by (1000, .9); the equal points 1 and 3
    # are both on it; unknown values take no part
    assert pareto_front(points) == [7, 1, 3, 0]
    assert pareto_front([]) == [] and pareto_front([(None, None)]) == []
    assert pareto_front([(5, 0.5)]) == [0]


def test_rows_take_the_stored_numbers_and_unknowns_stay_null():
    jobs = [job("a", ["train", "pcn", "train"], {"params": params(1000, 900, 800),
                                                  "macs": 5000, "accuracy": 0.9},
                before={"params": params(4000), "macs": 20000, "accuracy": 0.92}),
            job("b", ["train", "evaluate"], None, status="running")]
    report = compare(jobs, "nonzero_params")
    CompareReport.model_validate(report)  # the schema the API documents
    a, b = report["rows"]
    assert a == {"job_id": "a", "status": "succeeded", "name": "train → pcn → train",
                 "model_id": "m-a", "params": {"total": 1000, "trainable": 800, "nonzero": 900},
                 "macs": 5000, "bytes": None, "accuracy": 0.9, "latency_ms": None,
                 "latency_batch_size": None, "cost": 900, "pareto": True,
                 "sources": {"params": "result.after.params", "macs": "result.after.macs",
                             "accuracy": "result.after.accuracy"}}
    assert b["status"] == "running" and b["name"] == "train → evaluate"
    assert b["params"] == {"total": None, "trainable": None, "nonzero": None}
    assert all(b[k] is None for k in ("model_id", "macs", "bytes", "accuracy", "latency_ms",
                                      "cost"))
    assert b["pareto"] is False and report["pareto"] == ["a"]
    assert report["baseline"] == {"job_id": "a", "params": params(4000), "macs": 20000,
                                  "accuracy": 0.92, "bytes": None, "latency_ms": None,
                                  "cost": 4000}
    # a first job without a result has no baseline; junk numbers are never passed on
    odd = job("c", ["train"], {"params": {"total": "12"}, "macs": True,
                               "accuracy": float("nan")})
    report = compare([jobs[1], odd], "macs")
    assert report["baseline"] is None
    c = report["rows"][1]
    assert c["params"]["total"] is None and c["macs"] is None and c["accuracy"] is None
    assert report["pareto"] == [] and "c" in report["notes"][0]


def test_bytes_and_latency_come_from_the_last_measurement_of_the_final_model():
    export = {"op": "export", "onnx": {"bytes": 4000, "latency_ms": {"batch_1": 0.1,
                                                                      "batch_256": 2.5},
                                       "start_latency_ms": {"batch_256": 9.0}}}
    measure = {"op": "measure", "cost": {"bytes": 1000, "latency_ms": 1.5},
               "latency": {"batch_size": 64}}
    # measure after export: measure's numbers win, and a later train keeps them valid
    got = file_measurements({"steps": [{"op": "pcn"}, export, measure, {"op": "train"}]})
    assert (got["bytes"], got["latency_ms"], got["latency_batch_size"]) == (1000, 1.5, 64)
    assert got["sources"] == {"bytes": "result.steps[2].cost.bytes (measure)",
                              "latency_ms": "result.steps[2].cost.latency_ms (measure)"}
    # a measure without bytes/latency leaves the export's (batch 256, fp32)
    got = file_measurements({"steps": [export, {"op": "measure", "cost": {"macs": 3}}]})
    assert (got["bytes"], got["latency_ms"], got["latency_batch_size"]) == (4000, 2.5, 256)
    # measured before a step that changed the layers: says nothing about the final model
    got = file_measurements({"steps": [export, measure, {"op": "lowrank"}, {"op": "train"}]})
    assert got == {"bytes": None, "latency_ms": None, "latency_batch_size": None,
                   "sources": {}}
    # pruning masks export as dense zeros: the file is the same
    got = file_measurements({"steps": [export, {"op": "snip"}, {"op": "train"}]})
    assert got["bytes"] == 4000


def test_an_auto_job_reads_its_winner():
    auto = {"id": "s", "status": "succeeded", "spec": {"steps": [{"op": "auto"}]},
            "result": {"model_id": "m", "before": {"params": params(100), "macs": 10,
                                                   "accuracy": 0.8},
                       "after": {"params": params(40), "macs": 4, "accuracy": 0.78},
                       "steps": [{"op": "auto", "winner": {
                           "method": "lowrank", "costs": {"total_params": 40,
                                                          "latency_ms": 0.7}}}],
                       "auto": {"budget": {"kind": "latency_ms", "value": 1.0,
                                           "batch_size": 32},
                                "start": {"cost": 2.0}}}}
    assert job_label(auto) == "auto (lowrank)"
    report = compare([auto], "latency_ms")
    CompareReport.model_validate(report)
    [row] = report["rows"]
    assert (row["cost"], row["latency_batch_size"], row["bytes"]) == (0.7, 32, None)
    assert row["sources"]["latency_ms"] == "result.steps[0].winner.costs.latency_ms"
    assert report["baseline"]["cost"] == 2.0 and report["baseline"]["accuracy"] == 0.8


def test_mixed_latency_batches_are_noted():
    def with_latency(job_id: str, batch: int) -> dict:
        measure = {"op": "measure", "cost": {"latency_ms": 1.0}, "latency": {"batch_size": batch}}
        return job(job_id, ["train", "measure"], {"params": params(10), "macs": 1,
                                                  "accuracy": 0.5}, [{"op": "train"}, measure])
    report = compare([with_latency("a", 1), with_latency("b", 256)], "latency_ms")
    assert any("different batch sizes (1, 256)" in n for n in report["notes"])
    assert report["pareto"] == ["a", "b"]  # equal points


@pytest.mark.parametrize(("raw", "needle"), [
    (None, "give 1 to 50 job ids"), ("", "give 1 to 50"), ("  ", "give 1 to 50"),
    ("a,,b", "entry 2 of 3 is empty"), ("a,", "entry 2 of 2 is empty"),
    ("a,b,a", "'a' is listed more than once"),
    (",".join(f"j{i}" for i in range(MAX_JOBS + 1)), "at most 50 jobs"),
])
def test_bad_job_lists_are_422_saying_how_to_fix_them(raw, needle):
    with pytest.raises(Unprocessable) as err:
        parse_job_ids(raw)
    assert err.value.detail.startswith("jobs: ") and needle in err.value.detail


def test_job_lists_keep_their_order():
    assert parse_job_ids(" b , a") == ["b", "a"]
    assert len(parse_job_ids(",".join(f"j{i}" for i in range(MAX_JOBS)))) == MAX_JOBS
    with pytest.raises(Unprocessable, match="cost: must be one of"):
        compare([], "flops")


def test_markdown_has_one_line_per_job():
    jobs = [job("a", ["train", "pcn"], {"params": params(1234567, 1000), "macs": 5000,
                                        "accuracy": 0.9123}),
            job("b", ["snip"], None, status="failed")]
    text = to_markdown(compare(jobs))
    table = [line for line in text.splitlines() if line.startswith("| `")]
    assert table == ["| `a` | train → pcn | 1,234,567 | 1,000 | 5,000 | — | 91.23 % | — | ✓ |",
                     "| `b` | snip (failed) | — | — | — | — | — | — |  |"]
    assert text.splitlines()[0].startswith("| job | ops | params total | params nonzero | MACs")
