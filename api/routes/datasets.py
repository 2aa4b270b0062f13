"""/v1/datasets: upload validated arrays; list uploaded and built-in datasets."""
from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from api.deps import SessionDep, SettingsDep, StoreDep, TenantDep
from api.inspect_client import inspector_for
from api.openapi import DATASET_UPLOAD
from api.schemas import builtin_documents, dataset_document
from api.uploads import check_upload_admitted, receive_upload, temp_root
from service.datasets import (
    ALLOW_LABEL_GAPS,
    check_label_gaps,
    dataset_format,
    get_dataset,
    list_datasets,
    register_dataset,
)
from service.deletion import delete_dataset
from service.tmpfiles import temp_dir

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])


@router.post("", status_code=201, openapi_extra=DATASET_UPLOAD)
async def upload_dataset(request: Request, settings: SettingsDep, session: SessionDep,
                         store: StoreDep, tenant_id: TenantDep) -> JSONResponse:
    """Upload `.npz`/`.safetensors` arrays x_train, y_train[, x_test, y_test]; validated out of
    process (the API never decodes the arrays). Labels are 0..num_classes-1: labels that leave
    a class index unused (1..10, or 0, 1, 3) are a 422 unless the form field
    `allow_label_gaps=true` accepts them (the document then lists them under `label_gaps` and
    `warnings`)."""
    await run_in_threadpool(check_upload_admitted, settings, tenant_id)
    with temp_dir(temp_root(settings), "upload") as tmp:
        upload = await receive_upload(request, tmp / "upload", settings.max_upload_bytes,
                                      max_parts=settings.max_form_fields)
        fmt = dataset_format(upload.path, upload.filename, settings.max_safetensors_header_bytes)
        meta = await inspector_for(request.app).dataset(upload.path, fmt)
        meta = check_label_gaps(meta, upload.fields.get(ALLOW_LABEL_GAPS))
        name = upload.fields.get("name") or Path(upload.filename).stem or "dataset"
        dataset = await run_in_threadpool(
            register_dataset, session, store, tenant_id=tenant_id, name=name[:200], fmt=fmt,
            meta=meta, path=upload.path)
        return JSONResponse(dataset_document(dataset), status_code=201,
                            headers={"Location": f"/v1/datasets/{dataset.id}"})


@router.get("")
def list_all(session: SessionDep, tenant_id: TenantDep) -> dict:
    """Built-in datasets, then this tenant's uploads (newest first)."""
    uploaded = [dataset_document(d) for d in list_datasets(session, tenant_id)]
    return {"items": builtin_documents() + uploaded}


@router.get("/{dataset_id}")
def read(dataset_id: str, session: SessionDep, tenant_id: TenantDep) -> dict:
    """An uploaded or built-in dataset's metadata."""
    for builtin in builtin_documents():
        if builtin["id"] == dataset_id:
            return builtin
    return dataset_document(get_dataset(session, tenant_id, dataset_id))


@router.delete("/{dataset_id}", status_code=204, response_class=Response,
               responses={204: {"description": "Deleted, with its stored file."},
                          409: {"description": "Built in (BuiltinDataset), or a queued or "
                                               "running job uses it (InUse)."}})
def delete(dataset_id: str, session: SessionDep, store: StoreDep, tenant_id: TenantDep
           ) -> Response:
    """Delete an uploaded dataset and its file; 409 for a built-in dataset or while a queued or
    running job uses it; jobs that used it keep their spec."""
    delete_dataset(session, store, tenant_id, dataset_id)
    return Response(status_code=204)
