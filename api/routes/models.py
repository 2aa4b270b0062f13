"""/v1/models: upload a checkpoint, read its metadata, download it (safetensors, or exported
to ONNX / torch.export: api/exports.py)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from api.deps import SessionDep, SettingsDep, StoreDep, TenantDep
from api.exports import exporter_for
from api.inspect_client import inspector_for
from api.openapi import MODEL_UPLOAD
from api.schemas import model_document
from api.uploads import check_upload_admitted, receive_upload, temp_root
from service.artifacts import media_type
from service.db import session_scope
from service.deletion import delete_model
from service.errors import Unprocessable
from service.model_files import ModelFile, locate_model_file
from service.model_registry import (
    GRAPH_FORMATS,
    checkpoint_format,
    get_model,
    list_models,
    parse_arch,
    parse_import_options,
    register_model,
)
from service.settings import Settings
from service.store import ObjectStore
from service.tmpfiles import temp_dir

router = APIRouter(prefix="/v1/models", tags=["models"])


UPLOAD_DESCRIPTION = """Upload a model as multipart/form-data; 201 with the Model (and its
prunability report).

* `file`: `.safetensors` (a slimline checkpoint carries its architecture; a re-uploaded imported
  model carries its graph too), `.pt`/`.pth` (a state_dict, read with `weights_only=True`),
  `.pt2` (written by `torch.export.save`) or `.onnx` (opset 13 or newer, weights inside the
  file).
* `arch`: JSON, e.g. `{"name": "lenet300"}`, for a state dict without one (not for .pt2/.onnx).
* `name`: a label (default: the file name).
* preprocessing, stored in the arch and applied by train, evaluate and every calibration pass:
  `input_shape` (without the batch dimension, e.g. `3,32,32`; must match the model), `layout`
  (`NCHW` | `NHWC` | `flat`), `mean` and `std` (one value per channel, e.g. `0.5,0.5,0.5`),
  `num_classes` (must match the model's output).

Validation runs out of the API process under memory, CPU-time and wall-clock limits: a `.pt2`
archive is checked entry by entry before any loader runs (only what `torch.export.save` writes;
no pickles, custom objects, AOTInductor or ExecuTorch payloads; size, entry count and
compression-ratio caps), an ONNX file is loaded without external data and checked; then the
graph is converted (every op on slimline's allow-list). A refusal is a 4xx whose detail names
what was found and what to do: 413 over a size cap, 415 not a known format, 422 anything else."""


@router.post("", status_code=201, description=UPLOAD_DESCRIPTION, openapi_extra=MODEL_UPLOAD)
async def upload_model(request: Request, settings: SettingsDep, session: SessionDep,
                       store: StoreDep, tenant_id: TenantDep) -> JSONResponse:
    """Upload a checkpoint, torch.export archive or ONNX model; validated out of process."""
    await run_in_threadpool(check_upload_admitted, settings, tenant_id)
    with temp_dir(temp_root(settings), "upload") as tmp:
        upload = await receive_upload(request, tmp / "upload", settings.max_upload_bytes,
                                      max_parts=settings.max_form_fields)
        fmt = checkpoint_format(upload.path, upload.filename,
                                settings.max_safetensors_header_bytes)
        arch = parse_arch(upload.fields.get("arch"))
        if arch is not None and fmt in GRAPH_FORMATS:
            raise Unprocessable(f"form field 'arch' is for .safetensors/.pt uploads; a .{fmt} "
                                "file carries its graph (give input_shape, num_classes, layout, "
                                "mean and std instead)")
        options = parse_import_options(upload.fields)
        normalized = tmp / "normalized.safetensors"
        result = await inspector_for(request.app).checkpoint(upload.path, fmt, arch, normalized,
                                                             options)
        name = upload.fields.get("name") or Path(upload.filename).stem or result.arch["name"]
        model = await run_in_threadpool(
            register_model, session, store, tenant_id=tenant_id, name=name[:200],
            arch=result.arch, fmt=fmt, params=result.params, path=normalized,
            report=result.report, graph=result.graph)
        return JSONResponse(model_document(model), status_code=201,
                            headers={"Location": f"/v1/models/{model.id}"})


@router.get("")
def list_all(session: SessionDep, tenant_id: TenantDep) -> dict:
    """This tenant's models, newest first (without their prunability reports: GET one)."""
    return {"items": [model_document(m, report=False) for m in list_models(session, tenant_id)]}


@router.get("/{model_id}")
def read(model_id: str, session: SessionDep, tenant_id: TenantDep) -> dict:
    """A model's metadata, with its prunability report (`report`: per layer its kind, shape,
    MACs and the methods that apply; the coupled groups; what is left untouched and why)."""
    return model_document(get_model(session, tenant_id, model_id))


FormatQuery = Annotated[Literal["safetensors", "onnx", "pt2"], Query(
    alias="format", description="safetensors (the checkpoint, default), onnx or pt2.")]

DOWNLOAD_DESCRIPTION = """The model as one file, `<model id>.<format>`:

* `safetensors` (default): the checkpoint, with the architecture in its metadata (loads with
  slimline's `core.models.load`).
* `onnx`: an ONNX model (opset 18, input `input` with a dynamic batch dimension, output
  `logits`); runs with onnxruntime alone.
* `pt2`: a `torch.export` program; loads with plain `torch.export.load`.

ONNX and pt2 come from the export step of the job that produced the model when it has one;
otherwise the model is exported on first download (out of the API process, under the same
memory, CPU-time and wall-clock limits and concurrency slots as upload validation) and kept, so
later downloads stream at once. A model that cannot be exported is a 422 `ExportFailed` naming
the layer or op; 503 `Overloaded` with `Retry-After` when every slot is busy."""


@router.get("/{model_id}/file", description=DOWNLOAD_DESCRIPTION, response_class=Response,
            responses={200: {"content": {"application/octet-stream": {}},
                             "description": "The file, as an attachment."},
                       422: {"description": "Unknown format, or the model cannot be exported "
                                            "(ExportFailed)."},
                       503: {"description": "Every export slot is busy (Overloaded, with "
                                            "Retry-After)."}})
async def download(model_id: str, request: Request, settings: SettingsDep, store: StoreDep,
                   tenant_id: TenantDep, fmt: FormatQuery = "safetensors") -> StreamingResponse:
    """Download the model as safetensors, ONNX or a torch.export program."""
    file = await run_in_threadpool(_locate, settings, store, tenant_id, model_id, fmt)
    if not file.stored:
        file = await exporter_for(request.app).ensure_stored(file, store, temp_root(settings))
    chunks = await run_in_threadpool(store.open_stream, file.key)
    headers = {"Content-Disposition": f'attachment; filename="{file.filename}"'}
    if file.size_bytes is not None:
        headers["Content-Length"] = str(file.size_bytes)
    return StreamingResponse(chunks, media_type=media_type(file.filename), headers=headers)


def _locate(settings: Settings, store: ObjectStore, tenant_id: str, model_id: str,
            fmt: str) -> ModelFile:
    # a short transaction of its own: no connection is held while a missing export is made
    with session_scope(settings) as session:
        return locate_model_file(session, store, tenant_id, model_id, fmt)


DELETE_DESCRIPTION = """Delete the model: its row, its checkpoint, its exports kept from earlier
downloads, and its imported graph when no other model of yours is built on it. Jobs stay: a
job whose `result.model_id` named the model gets `result.model_id: null` and
`result.deleted_model_id`. 409 `InUse` naming the jobs while a queued or running job reads the
model (cancel them or wait); 404 for another tenant's model."""


@router.delete("/{model_id}", status_code=204, response_class=Response,
               description=DELETE_DESCRIPTION,
               responses={204: {"description": "Deleted, with its stored objects."},
                          409: {"description": "A queued or running job uses it (InUse)."}})
def delete(model_id: str, session: SessionDep, store: StoreDep, tenant_id: TenantDep
           ) -> Response:
    """Delete a model with its stored files (409 while a queued or running job uses it)."""
    delete_model(session, store, tenant_id, model_id)
    return Response(status_code=204)
