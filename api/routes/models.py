"""/v1/models: upload a checkpoint, read its metadata, download it."""
from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from api.deps import SessionDep, SettingsDep, StoreDep, TenantDep
from api.inspect_client import inspector_for
from api.schemas import model_document
from api.uploads import check_upload_admitted, receive_upload, temp_root
from service.model_registry import (
    checkpoint_format,
    get_model,
    list_models,
    parse_arch,
    register_model,
)
from service.tmpfiles import temp_dir

router = APIRouter(prefix="/v1/models", tags=["models"])


@router.post("", status_code=201)
async def upload_model(request: Request, settings: SettingsDep, session: SessionDep,
                       store: StoreDep, tenant_id: TenantDep) -> JSONResponse:
    """Upload a checkpoint (multipart `file`, `arch`, `name`); validated out of process."""
    await run_in_threadpool(check_upload_admitted, settings, tenant_id)
    with temp_dir(temp_root(settings), "upload") as tmp:
        upload = await receive_upload(request, tmp / "upload", settings.max_upload_bytes,
                                      max_parts=settings.max_form_fields)
        fmt = checkpoint_format(upload.path, upload.filename,
                                settings.max_safetensors_header_bytes)
        arch = parse_arch(upload.fields.get("arch"))
        normalized = tmp / "normalized.safetensors"
        result = await inspector_for(request.app).checkpoint(upload.path, fmt, arch, normalized)
        name = upload.fields.get("name") or Path(upload.filename).stem or result.arch["name"]
        model = await run_in_threadpool(
            register_model, session, store, tenant_id=tenant_id, name=name[:200],
            arch=result.arch, fmt=fmt, params=result.params, path=normalized)
        return JSONResponse(model_document(model), status_code=201,
                            headers={"Location": f"/v1/models/{model.id}"})


@router.get("")
def list_all(session: SessionDep, tenant_id: TenantDep) -> dict:
    """This tenant's models, newest first."""
    return {"items": [model_document(m) for m in list_models(session, tenant_id)]}


@router.get("/{model_id}")
def read(model_id: str, session: SessionDep, tenant_id: TenantDep) -> dict:
    """A model's metadata."""
    return model_document(get_model(session, tenant_id, model_id))


@router.get("/{model_id}/file")
def download(model_id: str, session: SessionDep, store: StoreDep,
             tenant_id: TenantDep) -> StreamingResponse:
    """The checkpoint: one safetensors file with the architecture in its metadata."""
    model = get_model(session, tenant_id, model_id)
    return StreamingResponse(
        store.open_stream(model.storage_key), media_type="application/octet-stream",
        headers={"Content-Length": str(model.size_bytes),
                 "Content-Disposition": f'attachment; filename="{model.id}.safetensors"'})
