"""The API's own documentation: `/docs` (Swagger UI) and `/redoc` from assets served by this
process (no CDN: they work air-gapped), and an OpenAPI document that says what the service
really does.

FastAPI's generated document is refined once (`refine`, cached on the app) so that routes added
anywhere are covered without declaring anything:

* the `Error` schema, `{error, detail}` as api/errors.py renders every error, on each 4xx/5xx
  response of every operation (it replaces FastAPI's `HTTPValidationError`, which the service
  never sends), with the answers an operation can give: 401 when auth is on and 422 for every
  /v1 route (they resolve a tenant, and `api.deps.check_request_values` checks every query
  value), 404 for paths with ids, 413/422 for JSON bodies, 400/413/415/422/429 for uploads,
  409 for deletions, 503 everywhere but `/healthz` (load shedding, an unreachable database),
  `Retry-After` on 429/503;
  a route declares any other answer in its decorator's `responses=` (a description is enough);
* the `bearerAuth` scheme (when auth is on) and `security` on every /v1 operation;
* request bodies the routes read by hand: `json_body` (a pydantic model's schema, placed in the
  components, with named examples) and `multipart_body` (form fields, `file` as binary) build a
  route decorator's `openapi_extra`; validation stays the route's own.
"""
from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from importlib.resources import files
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel

DOCS_URL = "/docs"
REDOC_URL = "/redoc"
ASSETS_URL = "/docs/assets"
# Swagger UI (swagger-ui-bundle.js, swagger-ui.css), ReDoc (redoc.standalone.js) and a favicon,
# as the `fastapi-offline` package ships them (a dependency in pyproject.toml)
ASSETS_DIR = Path(str(files("fastapi_offline") / "static"))
# The pages may load nothing from elsewhere: the browser refuses it (ReDoc's sidebar asks
# cdn.redoc.ly for its logo and shows nothing when that fails). Inline script and style: the
# pages' init script and both bundles' styles; blob: workers: ReDoc's search.
DOCS_CSP = ("default-src 'self'; script-src 'self' 'unsafe-inline'; "
            "style-src 'self' 'unsafe-inline'; img-src 'self' data:; font-src 'self' data:; "
            "connect-src 'self'; worker-src 'self' blob:; object-src 'none'; base-uri 'self'; "
            "frame-ancestors 'self'")
SWAGGER_PARAMETERS = {
    "persistAuthorization": True,  # the key entered with Authorize survives a reload
    "validatorUrl": None,  # no badge fetched from validator.swagger.io
    "displayRequestDuration": True,
    "tryItOutEnabled": True,
}

ERROR_REF = "#/components/schemas/Error"
ERROR_SCHEMA: dict[str, Any] = {
    "title": "Error",
    "type": "object",
    "description": "Every error the service answers: a code name and what went wrong and how "
                   "to fix it.",
    "required": ["error", "detail"],
    "properties": {
        "error": {"type": "string", "description": "The error's code name, e.g. "
                  "ValidationError, NotFound, Unauthorized, UploadTooLarge, QuotaExceeded, "
                  "Overloaded."},
        "detail": {"type": "string", "description": "What went wrong and how to fix it; a "
                   "validation error names the field."},
    },
}
# GET /readyz's 503 (api/routes/health.py) also says which dependency failed
NOT_READY_SCHEMA: dict[str, Any] = {
    "title": "NotReady",
    "allOf": [{"$ref": "#/components/schemas/Error"}, {
        "type": "object", "required": ["checks"],
        "properties": {"checks": {
            "type": "object", "additionalProperties": {"type": "string"},
            "description": "Each dependency (database, broker, store): ok, or its error (the "
                           "error's text for the operator token only)."}}}],
}
NOT_READY_REF = "#/components/schemas/NotReady"
BEARER_SCHEME = {
    "type": "http", "scheme": "bearer",
    "description": "An API key (`slimline keys create --name N` prints one): "
                   "`Authorization: Bearer <key>`. Click Authorize and paste the key.",
}
RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before retrying.",
                               "schema": {"type": "integer"}}}
# the description of each answer an operation gets by rule (a route's own description wins)
ERROR_DESCRIPTIONS = {
    400: "Malformed request (e.g. a broken multipart body or no `file` part).",
    401: "Missing or unknown API key: send `Authorization: Bearer <key>`.",
    404: "Not found (another tenant's resources are not found either).",
    409: "Conflict with the resource's state (e.g. a running job uses it).",
    413: "The body is over its limit (SLIMLINE_MAX_JSON_BYTES for JSON, "
         "SLIMLINE_MAX_UPLOAD_BYTES for uploads).",
    415: "Not multipart/form-data, or a file format the service does not read.",
    422: "Invalid input: `detail` names the field and says how to fix it.",
    429: "A quota is used up; retry after `Retry-After` seconds.",
    503: "Overloaded, or the database or broker is unreachable; retry after `Retry-After` "
         "seconds.",
}
# an example answer per status, shown next to the schema in /docs
ERROR_EXAMPLES = {
    400: ("BadRequest", "the form has no 'file' part; send the file as -F file=@path"),
    401: ("Unauthorized", "missing API key: send `Authorization: Bearer <key>` (create one "
                          "with `slimline keys create --name N`)"),
    404: ("NotFound", "job '01j...' not found"),
    409: ("JobNotCancelable", "job 01j... is already succeeded; only queued or running jobs "
                              "can be canceled"),
    413: ("UploadTooLarge", "the upload is larger than the limit of 209715200 bytes "
                            "(SLIMLINE_MAX_UPLOAD_BYTES)"),
    415: ("UnsupportedMediaType", "send multipart/form-data with a 'file' part, got "
                                  "application/json"),
    422: ("ValidationError", "steps[0].epochs: Input should be greater than or equal to 1"),
    429: ("QuotaExceeded", "you have 50 queued or running jobs, the limit is 50 "
                           "(SLIMLINE_MAX_ACTIVE_JOBS); wait for some to finish or cancel "
                           "some"),
    503: ("Overloaded", "the API is at capacity; retry after 1 s, or run more API processes"),
}
FASTAPI_422 = "#/components/schemas/HTTPValidationError"
NO_503 = {("get", "/healthz"), ("head", "/healthz")}  # no database, never shed (api/limits.py)
# every route under /v1/ resolves the caller's tenant (api.deps.TenantDep): with auth on it
# needs the bearer key (tests/api/test_openapi.py calls each one without a key)
TENANT_PREFIX = "/v1/"
# set by json_body in a route's openapi_extra, moved into place by refine: FastAPI merges
# openapi_extra into what it generated (for a `Body() dict`, an object of anything), so the
# declared request body travels under its own key and replaces the generated one
BODY_KEY = "x-slimline-request-body"
COMPONENTS_KEY = "x-slimline-components"


# ---- request bodies that routes read by hand ------------------------------------------------

def json_body(model: type[BaseModel], examples: Mapping[str, Mapping[str, Any]],
              description: str | None = None) -> dict[str, Any]:
    """`openapi_extra` for a route that reads a JSON body validated with `model` itself (so
    that validation and its error shape stay the route's): the model's schema as a component,
    and `examples` (name → `{summary, value}`) offered by Swagger's "Try it out"."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    components = schema.pop("$defs", {})
    components[model.__name__] = schema
    body: dict[str, Any] = {
        "required": True,
        "content": {"application/json": {
            "schema": {"$ref": f"#/components/schemas/{model.__name__}"},
            "examples": {name: dict(example) for name, example in examples.items()}}}}
    if description:
        body["description"] = description
    return {BODY_KEY: body, COMPONENTS_KEY: components}


def multipart_body(fields: Mapping[str, Mapping[str, Any]], required: tuple[str, ...],
                   description: str | None = None) -> dict[str, Any]:
    """`openapi_extra` for an upload route that streams multipart/form-data itself
    (api/uploads.py): its form fields (name → JSON schema; a file is
    `{"type": "string", "format": "binary"}`), so that "Try it out" can upload."""
    body: dict[str, Any] = {
        "required": True,
        "content": {"multipart/form-data": {"schema": {
            "type": "object", "required": list(required),
            "properties": {name: dict(schema) for name, schema in fields.items()}}}}}
    if description:
        body["description"] = description
    return {"requestBody": body}


def file_field(description: str) -> dict[str, Any]:
    """A multipart file part (Swagger UI shows a file picker)."""
    return {"type": "string", "format": "binary",
            "contentMediaType": "application/octet-stream", "description": description}


# Optional text fields default to "" (the upload code treats an empty field as not given), so
# that Swagger's "Try it out" leaves them empty instead of sending a placeholder such as "string"
NAME_FIELD = {"type": "string", "maxLength": 200, "default": "",
              "description": "A label (default: the file name without its extension)."}
# the form fields each upload route reads (tests/api/test_openapi.py checks them against the code)
MODEL_UPLOAD_FIELDS: dict[str, dict[str, Any]] = {
    "file": file_field(".safetensors (a slimline checkpoint, or weights with `arch`), "
                       ".pt/.pth (a state_dict), .pt2 (torch.export.save) or .onnx (opset 13+, "
                       "weights inside the file)."),
    "name": NAME_FIELD,
    "arch": {"type": "string", "default": "", "description": "JSON: the zoo architecture of a "
             'state dict without one, e.g. `{"name": "lenet300"}` (not for .pt2/.onnx).'},
    "input_shape": {"type": "string", "default": "", "pattern": r"^\s*(\d+(\s*,\s*\d+)*)?\s*$",
                    "description": "The input's shape without the batch dimension, "
                                   "comma-separated, e.g. `3,32,32` (must match the model)."},
    "num_classes": {"type": "string", "default": "", "pattern": r"^\s*([1-9][0-9]*)?\s*$",
                    "description": "The number of classes, a positive integer (must match the "
                                   "model's output)."},
    "layout": {"type": "string", "default": "", "enum": ["", "NCHW", "NHWC", "flat"],
               "description": "How the model takes its input: NCHW, NHWC or flat "
                              "(case-insensitive)."},
    "mean": {"type": "string", "default": "", "description": "Per-channel input mean, "
             "comma-separated, e.g. `0.5,0.5,0.5` (stored with the model, applied by every "
             "step)."},
    "std": {"type": "string", "default": "", "description": "Per-channel input std (> 0), "
            "comma-separated, e.g. `0.25,0.25,0.25`."},
}
DATASET_UPLOAD_FIELDS: dict[str, dict[str, Any]] = {
    "file": file_field(".npz or .safetensors with arrays x_train, y_train and optionally "
                       "x_test, y_test (images N×C×H×W or N×H×W, integer labels from 0)."),
    "name": NAME_FIELD,
    "allow_label_gaps": {"type": "boolean", "default": False,
                         "description": "Accept labels that leave a class index unused (e.g. "
                                        "1..10); the dataset then lists them as a warning."},
}
MODEL_UPLOAD = multipart_body(MODEL_UPLOAD_FIELDS, ("file",))
DATASET_UPLOAD = multipart_body(DATASET_UPLOAD_FIELDS, ("file",))


# ---- the docs pages ---------------------------------------------------------------------

def _local_only(page: HTMLResponse) -> HTMLResponse:
    page.headers["Content-Security-Policy"] = DOCS_CSP
    return page


def install_docs(app: FastAPI) -> None:
    """Serve /docs, /redoc and their assets locally, and refine the OpenAPI document (built on
    first use, after every route is in). Create the app with `docs_url=None, redoc_url=None`."""
    app.mount(ASSETS_URL, StaticFiles(directory=ASSETS_DIR), name="docs-assets")
    openapi_url = app.openapi_url or "/openapi.json"

    def root(request: Request) -> str:
        return str(request.scope.get("root_path", "")).rstrip("/")

    @app.get(DOCS_URL, include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        base = root(request)
        return _local_only(get_swagger_ui_html(
            openapi_url=base + openapi_url, title=f"{app.title} API",
            swagger_js_url=f"{base}{ASSETS_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{base}{ASSETS_URL}/swagger-ui.css",
            swagger_favicon_url=f"{base}{ASSETS_URL}/favicon.png",
            swagger_ui_parameters=SWAGGER_PARAMETERS))

    @app.get(REDOC_URL, include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        base = root(request)
        return _local_only(get_redoc_html(
            openapi_url=base + openapi_url, title=f"{app.title} API",
            redoc_js_url=f"{base}{ASSETS_URL}/redoc.standalone.js",
            redoc_favicon_url=f"{base}{ASSETS_URL}/favicon.png", with_google_fonts=False))

    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = refine(app, generate())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


# ---- the document -----------------------------------------------------------------------

def _operations(schema: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in schema.get("paths", {}).items():
        for method, operation in item.items():
            if method in ("get", "put", "post", "delete", "patch", "head", "options", "trace"):
                yield method, path, operation


def _answers(method: str, path: str, operation: dict[str, Any], tenant: bool,
             auth_on: bool) -> set[int]:
    """The error statuses an operation can answer, by rule."""
    codes: set[int] = set()
    if tenant:
        codes.add(422)  # a query value no row can match (api.deps.check_request_values)
        if auth_on:
            codes.add(401)
    if any(p.get("in") == "path" for p in operation.get("parameters", [])):
        codes.add(404)
    content = operation.get("requestBody", {}).get("content", {})
    if "application/json" in content:
        codes |= {413, 422}
    if "multipart/form-data" in content:
        codes |= {400, 413, 415, 422, 429}
    if method == "delete":
        codes.add(409)
    if (method, path) not in NO_503:
        codes.add(503)
    return codes


def _error_response(response: dict[str, Any], code: int) -> None:
    """Make `response` (possibly FastAPI's or a route's bare description) an Error answer."""
    schema = response.get("content", {}).get("application/json", {}).get("schema", {})
    if not response.get("content") or schema.get("$ref") == FASTAPI_422:
        media: dict[str, Any] = {"schema": {"$ref": ERROR_REF}}
        if code in ERROR_EXAMPLES:
            error, detail = ERROR_EXAMPLES[code]
            media["example"] = {"error": error, "detail": detail}
        response["content"] = {"application/json": media}
    if not response.get("description") or response["description"] == "Validation Error":
        response["description"] = ERROR_DESCRIPTIONS.get(code, "Error.")
    if code in (429, 503):
        response.setdefault("headers", {}).update(RETRY_AFTER)


def _add_components(components: dict[str, Any], new: Mapping[str, Any], where: str) -> None:
    for name, schema in new.items():
        if name in components and components[name] != schema:
            raise ValueError(f"OpenAPI component {name!r} of {where} differs from the one "
                             "already there; give one of the models another name")
        components[name] = schema


def _referenced(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str):
            yield ref
        for value in node.values():
            yield from _referenced(value)
    elif isinstance(node, list):
        for value in node:
            yield from _referenced(value)


def _drop_unreferenced(schema: dict[str, Any], names: tuple[str, ...]) -> None:
    components = schema.get("components", {}).get("schemas", {})
    for name in names:
        if name not in components:
            continue
        rest = {k: v for k, v in components.items() if k != name}
        if f"#/components/schemas/{name}" not in set(_referenced([schema["paths"], rest])):
            del components[name]


AUTH_ON_NOTE = """

**Authentication.** Every `/v1` operation needs an API key (`slimline keys create --name N`
prints one): click **Authorize**, paste the key, and "Try it out" sends
`Authorization: Bearer <key>`."""
AUTH_OFF_NOTE = """

**Authentication.** Auth is off on this server (`SLIMLINE_AUTH=off`, as in `slimline up`): no
key is needed."""
ERRORS_NOTE = """

**Errors.** Every error is JSON `{"error": "<code name>", "detail": "<what went wrong and how to
fix it>"}` (the `Error` schema) with a 4xx status, or 503 with `Retry-After` when the service is
overloaded or its database is unreachable."""


def refine(app: FastAPI, schema: dict[str, Any]) -> dict[str, Any]:
    """FastAPI's generated document → the service's (see the module doc); returns `schema`,
    changed in place."""
    settings = getattr(app.state, "settings", None)
    auth_on = getattr(settings, "auth", "on") == "on"
    info = schema.setdefault("info", {})
    info["description"] = (info.get("description", "")
                           + (AUTH_ON_NOTE if auth_on else AUTH_OFF_NOTE) + ERRORS_NOTE)
    components = schema.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    schemas["Error"] = copy.deepcopy(ERROR_SCHEMA)
    schemas["NotReady"] = copy.deepcopy(NOT_READY_SCHEMA)
    for method, path, operation in _operations(schema):
        _add_components(schemas, operation.pop(COMPONENTS_KEY, {}), f"{method.upper()} {path}")
        body = operation.pop(BODY_KEY, None)
        if body is not None:
            operation["requestBody"] = body
        tenant = path.startswith(TENANT_PREFIX)
        if not auth_on:
            operation.pop("security", None)
        elif tenant:
            operation.setdefault("security", [{"bearerAuth": []}])
        responses = operation.setdefault("responses", {})
        for code in _answers(method, path, operation, tenant, auth_on):
            responses.setdefault(str(code), {})
        if not auth_on:
            responses.pop("401", None)
        for code, response in responses.items():
            if code.isdigit() and int(code) >= 400:
                _error_response(response, int(code))
        operation["responses"] = dict(sorted(responses.items()))
    if auth_on:
        components.setdefault("securitySchemes", {})["bearerAuth"] = BEARER_SCHEME
    _drop_unreferenced(schema, ("HTTPValidationError", "ValidationError", "NotReady"))
    return schema
