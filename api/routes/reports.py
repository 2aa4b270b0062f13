"""/v1/reports: comparisons across jobs (`service.compare`)."""
from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from fastapi.responses import JSONResponse, Response

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


COMPARE_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "The comparison: JSON (`format=json`), an accuracy-vs-cost scatter "
                         "(`format=png`) or a Markdown table (`format=md`)",
          "content": {"application/json": {}, "image/png": {"schema": {
              "type": "string", "format": "binary"}},
              "text/markdown": {"schema": {"type": "string"}}}},
    404: {"description": "A job id that is not one of yours (the detail names it)"}}


@router.get("/compare", responses=COMPARE_RESPONSES)
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
