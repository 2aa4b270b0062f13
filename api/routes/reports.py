"""/v1/reports: comparisons across jobs (`service.compare`)."""
from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from api.deps import SessionDep, TenantDep
from service.compare import (
    MAX_JOBS,
    compare,
    job_fields,
    load_jobs,
    parse_job_ids,
    to_markdown,
    to_png,
)

router = APIRouter(prefix="/v1/reports", tags=["reports"])

CostKind = Literal["total_params", "nonzero_params", "trainable_params", "macs", "bytes",
                   "latency_ms"]


class _Document(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ParamCounts(_Document):
    total: int | None
    trainable: int | None
    nonzero: int | None


class CompareRow(_Document):
    """One job. Numbers the job's stored result does not hold are null (a job that has not
    succeeded has null numbers)."""

    job_id: str
    status: str = Field(description="queued, running, succeeded, failed or canceled")
    name: str = Field(description='the job\'s step ops, e.g. "train → pcn → train"; an auto '
                                  'job "auto (<winning method>)"')
    model_id: str | None = Field(description="the model the job produced")
    params: ParamCounts
    macs: int | None = Field(description="multiply-accumulates of one sample")
    bytes: int | None = Field(description="the ONNX file a measure or export step measured")
    accuracy: float | None = Field(description="test accuracy in [0, 1]")
    latency_ms: float | None = Field(description="onnxruntime CPU latency a measure or export "
                                                 "step measured")
    latency_batch_size: int | None = Field(description="the batch latency_ms was measured at")
    cost: float | None = Field(description="the value of the chosen cost kind")
    pareto: bool
    sources: dict[str, str] = Field(description="where each number was read from in the "
                                                "job's result")


class CompareBaseline(_Document):
    """The model the first job started from (its `result.before`)."""

    job_id: str
    params: ParamCounts
    macs: int | None
    accuracy: float | None
    bytes: int | None
    latency_ms: float | None
    cost: float | None


class CompareReport(_Document):
    cost: CostKind
    rows: list[CompareRow] = Field(description="one per job, in the order asked")
    pareto: list[str] = Field(description="the job ids on the Pareto set (max accuracy, min "
                                          "cost), cheapest first")
    baseline: CompareBaseline | None
    notes: list[str] = Field(description="jobs left off the plot, latencies at different "
                                         "batch sizes")


COMPARE_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "The comparison: JSON (`format=json`), an accuracy-vs-cost scatter "
                         "(`format=png`) or a Markdown table (`format=md`)",
          "content": {"image/png": {"schema": {
              "type": "string", "format": "binary"}},
              "text/markdown": {"schema": {"type": "string"}}}},
    404: {"description": "A job id that is not one of yours (the detail names it)"}}


@router.get("/compare", response_model=CompareReport, responses=COMPARE_RESPONSES)
def compare_jobs(
        session: SessionDep, tenant_id: TenantDep,
        jobs: Annotated[str | None, Query(
            description=f"1 to {MAX_JOBS} distinct job ids of yours, separated by commas",
            examples=["01jd0c8p9x4k2m7q3r5s6t8v9w,01jd0c8qa1b2c3d4e5f6g7h8j9"])] = None,
        fmt: Annotated[Literal["json", "png", "md"], Query(
            alias="format", description="json, png (accuracy-vs-cost scatter) or md (a "
                                        "Markdown table)")] = "json",
        cost: Annotated[CostKind, Query(
            description="the x axis and the Pareto cost")] = "total_params") -> Response:
    """One comparison across jobs: a row per job, the Pareto set (max accuracy, min cost)."""
    ids = parse_job_ids(jobs)
    report = compare([job_fields(job) for job in load_jobs(session, tenant_id, ids)], cost)
    if fmt == "png":
        return Response(to_png(report), media_type="image/png")
    if fmt == "md":
        return Response(to_markdown(report), media_type="text/markdown; charset=utf-8")
    return JSONResponse(report)
