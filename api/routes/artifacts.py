"""/v1/jobs/{id}/artifacts: files a job produced."""
from __future__ import annotations

from urllib.parse import quote

from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from api.deps import SessionDep, StoreDep, TenantDep
from api.schemas import artifact_document
from service.artifacts import get_artifact, list_artifacts, media_type
from service.submission import get_job

router = APIRouter(prefix="/v1/jobs/{job_id}/artifacts", tags=["artifacts"])


def artifact_url(job_id: str, name: str) -> str:
    """Where the artifact downloads (relative to the API's root)."""
    return f"/v1/jobs/{quote(job_id, safe='')}/artifacts/{quote(name, safe='')}"


@router.get("")
def list_all(job_id: str, session: SessionDep, tenant_id: TenantDep) -> dict:
    """The job's artifacts: `{items: [{name, kind, size_bytes, sha256, url}]}`."""
    get_job(session, tenant_id, job_id)
    return {"items": [artifact_document(a) | {"url": artifact_url(job_id, a.name)}
                      for a in list_artifacts(session, job_id)]}


@router.get("/{name}")
def download(job_id: str, name: str, session: SessionDep, store: StoreDep,
             tenant_id: TenantDep) -> StreamingResponse:
    """Download one artifact."""
    get_job(session, tenant_id, job_id)
    artifact = get_artifact(session, job_id, name)
    return StreamingResponse(
        store.open_stream(artifact.storage_key), media_type=media_type(name),
        headers={"Content-Length": str(artifact.size_bytes),
                 "Content-Disposition": f'attachment; filename="{artifact.name}"'})
