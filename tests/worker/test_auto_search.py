"""worker.auto_search: an auto-compress search driven in-process — its coordinator ticked by hand
and its trials run by the runner as plain Python against SQLite (no broker, no Celery; the
service tests run the same search on real workers)."""
from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import select

from core import models as zoo
from core.budget import model_cost
from service.db import session_scope
from service.methods.auto import pareto
from service.orm import Artifact, Job, JobEvent, Model
from service.states import TERMINAL
from service.submission import cancel_job
from tests.worker.conftest import PNG_MAGIC, TINY_MLP, get_job, run_ok, spec, stored_model_path
from worker import runner
from worker.auto_search import tick
from worker.auto_space import calibrate

TRAIN = [{"op": "train", "epochs": 4, "batch_size": 32, "lr": 0.003}]


def children(settings, job_id: str) -> list[Job]:
    with session_scope(settings) as session:
        rows = list(session.scalars(select(Job).where(Job.parent_id == job_id)
                                    .order_by(Job.created_at, Job.id)))
        for row in rows:
            session.expunge(row)
        return rows


def drive(settings, job_id: str, max_rounds: int = 200) -> str:
    """Tick the search, run every queued trial, repeat until the search is terminal."""
    for _ in range(max_rounds):
        tick(job_id, settings)
        job = get_job(settings, job_id)
        if job.status in TERMINAL:
            return job.status
        for child in children(settings, job_id):
            if child.status == "queued":
                runner.run_job(child.id, settings)
    raise AssertionError(f"search {job_id} did not end in {max_rounds} rounds")


@pytest.fixture
def trained(settings, submit) -> str:
    _, result = run_ok(settings, submit, spec(TINY_MLP, TRAIN))
    return result["model_id"]


def auto_spec(model_id: str, **auto: Any) -> dict[str, Any]:
    step = {"op": "auto", "budget": {"total_params": 2400}, "trials": 6, "finetune_trials": 3,
            "finetune_epochs": 1, "final_epochs": 1} | auto
    return spec(model_id, [step])


def test_search_lands_within_budget_and_records_every_trial(settings, store, submit, trained,
                                                            tmp_path):
    job_id = submit(auto_spec(trained))
    assert drive(settings, job_id) == "succeeded", get_job(settings, job_id).error_message
    job = get_job(settings, job_id)
    result, auto = job.result, job.result["auto"]

    # the chosen model is a Model of the tenant within the budget, counted exactly
    model = zoo.load(stored_model_path(settings, store, tmp_path, result["model_id"]))
    assert model_cost(model, "total_params") <= 2400
    assert auto["winner"]["cost"] == model_cost(model, "total_params")
    assert auto["budget"]["kind"] == "total_params" and "masks do not" in \
        auto["budget"]["meaning"]
    assert result["before"]["params"]["total"] > 2400 >= result["after"]["params"]["total"]
    assert auto["winner"]["method"] in auto["reason"] and "budget" in auto["reason"]

    # every trial is a child job, recorded once in the curves
    kids = children(settings, job_id)
    phases = [c.kind for c in kids]
    assert phases.count("baseline") == 1 and phases.count("screen") == 6
    assert phases.count("finetune") == 3 and phases.count("final") == 1
    assert all(c.status in TERMINAL and c.search["recorded"] for c in kids)
    with session_scope(settings) as session:
        events = [e.data for e in session.scalars(select(JobEvent).where(
            JobEvent.job_id == job_id, JobEvent.kind == "auto_trial"))]
        artifacts = {a.name: a for a in session.scalars(
            select(Artifact).where(Artifact.job_id == job_id))}
        assert session.get(Model, result["model_id"]) is not None
    assert sorted(e["job_id"] for e in events) == sorted(c.id for c in kids
                                                        if c.kind != "baseline")
    # screening trials keep no model; fine-tuned ones do (the final one starts from one)
    assert all(c.result is None or c.result.get("model_id") is None
               for c in kids if c.kind == "screen")
    assert all(c.result["model_id"] for c in kids if c.kind == "finetune"
               and c.status == "succeeded")

    # the Pareto set is every fine-tuned trial no other beats on both cost and accuracy
    tuned = [e for e in events if e["phase"] == "finetune" and e["status"] == "succeeded"]
    on_front = {tuned[i]["trial"] for i in pareto(tuned)}
    for t in tuned:
        dominated = any(o["cost"] <= t["cost"] and o["val_accuracy"] >= t["val_accuracy"]
                        and (o["cost"], o["val_accuracy"]) != (t["cost"], t["val_accuracy"])
                        for o in tuned)
        assert (t["trial"] in on_front) == (not dominated), (t, tuned)
    assert {p["trial"] for p in auto["pareto"]} == on_front

    # the winner is the most accurate fine-tuned trial within the budget
    within = [t for t in tuned if t["within_budget"]]
    assert auto["winner"]["trial"] == max(within, key=lambda t: t["val_accuracy"])["trial"]

    assert {"report.json", "curves.json", "frontier.png", "model.safetensors"} <= set(artifacts)
    png = (store.root / artifacts["frontier.png"].storage_key).read_bytes()
    assert png.startswith(PNG_MAGIC)


def test_a_budget_the_model_already_meets_fails_with_the_reason(settings, submit, trained):
    job_id = submit(auto_spec(trained, budget={"total_params": 10**6}))
    assert drive(settings, job_id) == "failed"
    job = get_job(settings, job_id)
    assert job.error_code == "BudgetAlreadyMet" and "lower the budget" in job.error_message


def test_an_unreachable_budget_names_the_closest_trials(settings, submit, trained):
    job_id = submit(auto_spec(trained, budget={"total_params": 40}, trials=3))
    assert drive(settings, job_id) == "failed"
    job = get_job(settings, job_id)
    assert job.error_code in ("NoTrialSucceeded", "BudgetNotMet"), job.error_message
    assert len([c for c in children(settings, job_id) if c.kind == "screen"]) == 3
    assert job.result["auto"]["reason"]


def test_cancel_stops_the_trials_and_ticks_are_idempotent(settings, submit, trained,
                                                          tenant_id):
    job_id = submit(auto_spec(trained, trials=8))
    tick(job_id, settings)
    (baseline,) = children(settings, job_id)
    runner.run_job(baseline.id, settings)
    tick(job_id, settings)
    first = children(settings, job_id)
    tick(job_id, settings)  # nothing finished: no new trial
    assert [c.id for c in children(settings, job_id)] == [c.id for c in first]
    screens = [c for c in first if c.kind == "screen"]
    assert 2 <= len(screens) < 8 and all(c.status == "queued" for c in screens)
    runner.run_job(screens[0].id, settings)  # the trial's end advances the search in place
    at_cancel = children(settings, job_id)
    assert len(at_cancel) == len(first) + 1  # the finished trial's place was refilled

    with session_scope(settings) as session:
        cancel_job(session, tenant_id, job_id, settings)
    tick(job_id, settings)
    assert get_job(settings, job_id).status == "canceled"
    kids = children(settings, job_id)
    assert all(c.status in TERMINAL for c in kids)
    assert {c.status for c in kids if c.kind == "screen"} == {"succeeded", "canceled"}
    assert len(kids) == len(at_cancel)  # nothing was started after the cancel


def test_draws_below_a_methods_floor_are_told_without_running(settings, submit, trained):
    """pcn's smallest model (one component per layer) is known from shapes before the search:
    a budget below it is never handed to a pcn trial without output pruning, every such draw is
    told to the study as infeasible and listed as skipped; refusals of the other methods teach
    their floors to the draws after them."""
    job_id = submit(auto_spec(trained, budget={"total_params": 700}, trials=5,
                              methods=["pcn", "lowrank"]))
    assert drive(settings, job_id) in ("succeeded", "failed")
    job = get_job(settings, job_id)
    auto = job.result["auto"]
    key = "pcn(pcn_output_based=False)"
    assert auto["floors"][key][0][1] > 700  # measured on the starting model, in total_params
    screens = [c for c in children(settings, job_id) if c.kind == "screen"]
    ran = [c.search["params"] for c in screens]
    assert not [p for p in ran if p["method"] == "pcn" and not p["pcn_output_based"]]
    skipped = auto["skipped"]
    assert skipped and all("cannot build a model below" in s["reason"] for s in skipped)
    assert any(s["params"]["method"] == "pcn" and not s["params"]["pcn_output_based"]
               for s in skipped)
    # a chain starting with pcn had its first target raised above pcn's floor
    for child in screens:
        first = child.search["targets"][0]
        if child.search["params"]["method"] == "pcn+lowrank" and \
                not child.search["params"]["pcn_output_based"]:
            assert first["goal"] > auto["floors"][key][0][1]
            assert first.get("raised_from", 0) < auto["floors"][key][0][1]
    # every refusal the trials met was learned (its key is a floor now), at most once from the
    # starting model per key
    refused = [c for c in screens if c.status == "failed" and "out of reach" in
               (c.error_message or "")]
    assert len(refused) <= len(auto["floors"])
    with session_scope(settings) as session:
        kinds = [e.data.get("status") for e in session.scalars(select(JobEvent).where(
            JobEvent.job_id == job_id, JobEvent.kind == "auto_trial"))]
    assert kinds.count("skipped") == len(skipped)


def test_a_latency_budget_is_aimed_at_through_macs_fitted_to_the_measured_trials(
        settings, submit, trained):
    """Every float trial's measured (MACs, latency) joins the starting model's in the line the
    later candidates aim through; the result says which rule aimed them and where latency was
    measured. (Whether a tiny model's latency falls to 40 % depends on this machine: either
    outcome is checked.)"""
    _, measured = run_ok(settings, submit, spec(trained, [{"op": "measure",
                                                           "latency_batch_size": 16}]))
    dense_ms = measured["steps"][0]["cost"]["latency_ms"]
    job_id = submit(auto_spec(trained, budget={"latency_ms": 0.4 * dense_ms, "batch_size": 16},
                              trials=4, methods=["lowrank", "channel_prune"]))
    job = get_job(settings, job_id) if drive(settings, job_id) else None
    assert job.status == "succeeded" or job.error_code == "BudgetNotMet", job.error_message
    auto = job.result["auto"]
    with session_scope(settings) as session:
        events = [e.data for e in session.scalars(select(JobEvent).where(
            JobEvent.job_id == job_id, JobEvent.kind == "auto_trial"))]
    measured = [e for e in events if e["status"] == "succeeded"]
    assert measured and all(e["costs"]["latency_ms"] > 0 and e["machine"] for e in measured)
    baseline = next(c for c in children(settings, job_id) if c.kind == "baseline")
    start = next(s for s in baseline.result["steps"] if s["op"] == "measure")["cost"]
    points = [(start["macs"], start["latency_ms"])] + [
        (e["costs"]["macs"], e["costs"]["latency_ms"]) for e in measured]
    calibration = auto["calibration"]
    assert calibration["proxy"] == "macs" and calibration["points"] == len(points)
    fit = calibrate(points)
    if fit is None:
        assert calibration["fit"] is None
    else:
        assert (calibration["fit"]["a"], calibration["fit"]["b"]) == pytest.approx(fit)
