"""The OpenAPI document and the docs pages (api/openapi.py): a valid document; the bearer scheme on
every /v1 operation (and each of them really answers 401 without a key); the `{error, detail}`
schema on every error answer (and the real answers fit it); upload operations with the form
fields the upload code really reads; an example per step op that validates and submits; /docs
and /redoc loading nothing from outside."""
from __future__ import annotations

import ast
import inspect
import io
import os
import re
import shutil
import socket
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest
import uvicorn
from fastapi.testclient import TestClient
from openapi_spec_validator import validate as validate_openapi

from api import openapi
from api.app import create_app
from api.routes import datasets as dataset_routes
from api.routes import models as model_routes
from api.uploads import receive_upload
from service.settings import Settings
from service.spec import AVAILABLE_OPS, JOB_SPEC_EXAMPLES, JobSpec
from tests.api.conftest import safetensors_bytes

METHODS = ("get", "put", "post", "delete", "patch", "head", "options", "trace")


@pytest.fixture
def doc(client: TestClient) -> dict[str, Any]:
    r = client.get("/openapi.json")
    assert r.status_code == 200
    return r.json()


def operations(doc: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in doc["paths"].items():
        for method, operation in item.items():
            if method in METHODS:
                yield method, path, operation


def test_the_document_is_valid_openapi(doc):
    validate_openapi(doc)
    assert doc["openapi"].startswith("3.1")
    assert len(list(operations(doc))) >= 15


def test_the_document_is_built_once(app):
    assert app.openapi() is app.openapi()


# ---- the bearer scheme --------------------------------------------------------------------

def test_every_v1_operation_declares_the_bearer_scheme(doc):
    assert doc["components"]["securitySchemes"]["bearerAuth"] == {
        **openapi.BEARER_SCHEME, "type": "http", "scheme": "bearer"}
    ops = list(operations(doc))
    v1 = [(m, p, op) for m, p, op in ops if p.startswith("/v1/")]
    assert len(v1) >= 12
    for method, path, operation in v1:
        assert operation.get("security") == [{"bearerAuth": []}], (method, path)
        assert "401" in operation["responses"], (method, path)
    for path in ("/healthz", "/readyz"):
        assert "security" not in doc["paths"][path]["get"], path
    # /metrics reads a bearer token when one is sent (an API key or the operator token) and
    # needs none with auth off: optional
    assert doc["paths"]["/metrics"]["get"]["security"] == [{"bearerAuth": []}, {}]


def fill_path(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "nosuchid", path)


def test_every_declared_secured_operation_answers_401_without_a_key(app, doc):
    """The declaration matches the code: every operation that declares bearerAuth as required
    refuses a request without a key (so a /v1 route that forgot the tenant would fail here)."""
    with TestClient(app) as anonymous:
        for method, path, operation in operations(doc):
            if operation.get("security") != [{"bearerAuth": []}]:
                continue
            r = anonymous.request(method.upper(), fill_path(path))
            assert r.status_code == 401, (method, path, r.status_code, r.text[:200])
            jsonschema.validate(r.json(), doc["components"]["schemas"]["Error"])
            assert r.json()["error"] == "Unauthorized"
        assert anonymous.get("/healthz").status_code == 200


def test_with_auth_off_there_is_no_scheme_and_no_401(tmp_path, enqueued):
    settings = Settings(home=tmp_path / "home-off", auth="off", broker_url="filesystem://",
                        inspect_module="tests.api.fake_inspect")
    doc = create_app(settings).openapi()
    assert "securitySchemes" not in doc["components"]
    assert "Auth is off" in doc["info"]["description"]
    for method, path, operation in operations(doc):
        assert "security" not in operation, (method, path)
        assert "401" not in operation["responses"], (method, path)
        assert "503" in operation["responses"] or path == "/healthz", (method, path)


# ---- the error schema ---------------------------------------------------------------------

def test_every_error_answer_is_the_error_schema(doc):
    error = doc["components"]["schemas"]["Error"]
    assert error["required"] == ["error", "detail"]
    assert error["properties"]["error"]["type"] == error["properties"]["detail"]["type"] \
        == "string"
    assert "HTTPValidationError" not in doc["components"]["schemas"]
    assert "HTTPValidationError" not in str(doc)
    for method, path, operation in operations(doc):
        responses = operation["responses"]
        errors = {code for code in responses if code.isdigit() and int(code) >= 400}
        for code in errors:
            media = responses[code]["content"]
            assert list(media) == ["application/json"], (method, path, code)
            ref = openapi.NOT_READY_REF if (path, code) == ("/readyz", "503") else \
                openapi.ERROR_REF
            assert media["application/json"]["schema"] == {"$ref": ref}, (method, path, code)
            if "example" in media["application/json"]:
                jsonschema.validate(media["application/json"]["example"], error)
            assert responses[code]["description"], (method, path, code)
        if path != "/healthz":
            assert "503" in errors, (method, path)
            assert "Retry-After" in responses["503"]["headers"]
        if "{" in path:
            assert "404" in errors, (method, path)
        if path.startswith("/v1/"):
            assert {"401", "422"} <= errors, (method, path)
        if method == "delete":
            assert "409" in errors, (method, path)
        body = operation.get("requestBody", {}).get("content", {})
        if "application/json" in body:
            assert {"413", "422"} <= errors, (method, path)
        if "multipart/form-data" in body:
            assert {"400", "413", "415", "422", "429"} <= errors, (method, path)
            assert "Retry-After" in responses["429"]["headers"]
    jobs = doc["paths"]["/v1/jobs"]["post"]["responses"]
    assert {"404", "409", "429"} <= set(jobs)
    assert "409" in doc["paths"]["/v1/jobs/{job_id}/cancel"]["post"]["responses"]
    assert "409" in doc["paths"]["/v1/jobs/{job_id}/trials"]["get"]["responses"]
    assert "429" in doc["paths"]["/v1/jobs/{job_id}/events"]["get"]["responses"]


def schema_of(doc: dict[str, Any], name: str) -> dict[str, Any]:
    """A component schema that resolves its `#/components/...` references."""
    return {"$ref": f"#/components/schemas/{name}", "components": doc["components"]}


def test_not_ready_fits_its_schema(app, doc, monkeypatch):
    def down() -> None:
        raise ConnectionError("store unreachable")

    monkeypatch.setattr(app.state.store, "ping", down)
    with TestClient(app) as anonymous:
        r = anonymous.get("/readyz")
    assert r.status_code == 503
    jsonschema.validate(r.json(), schema_of(doc, "NotReady"))
    assert r.json()["checks"]["store"] == "error"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"error": "NotReady", "detail": "x"}, schema_of(doc, "NotReady"))


def test_the_description_says_how_to_authorize(doc):
    assert "Authorize" in doc["info"]["description"]
    assert '{"error": "<code name>"' in doc["info"]["description"]


def test_real_errors_fit_the_error_schema(client, doc):
    error = doc["components"]["schemas"]["Error"]
    answers = [
        client.post("/v1/jobs", json={"model": "m", "dataset": "synthetic-tiny", "steps": []}),
        client.post("/v1/jobs", json={"model": "m", "dataset": "x", "steps": [{"op": "nope"}]}),
        client.get("/v1/jobs/nosuchjob"),
        client.get("/v1/jobs?limit=0"),
        client.post("/v1/models", json={"name": "x"}),
        client.post("/v1/models", data={"name": "x"}, files={"other": ("a", b"1")}),
        client.get("/v1/nothing-here"),
    ]
    assert [r.status_code for r in answers] == [422, 422, 404, 422, 415, 400, 404]
    for r in answers:
        jsonschema.validate(r.json(), error)


# ---- uploads ------------------------------------------------------------------------------

def _name_value(node: ast.expr, scope: dict[str, Any]) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.Name) and isinstance(scope.get(node.id), str):
        return scope[node.id]
    return None


def _is_fields(node: ast.expr, param: str | None) -> bool:
    return (isinstance(node, ast.Attribute) and node.attr == "fields") or \
        (param is not None and isinstance(node, ast.Name) and node.id == param)


def form_fields_read(func: Callable[..., Any], param: str | None = None) -> set[str]:
    """The form fields `func` reads from an upload's `fields` (`upload.fields.get("name")`,
    `fields[NAME]`, `k in ("a", "b")` over `fields`), following the functions it hands the
    fields to, and the file part `receive_upload` writes."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(func)))
    scope = func.__globals__
    read: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            target = node.func
            if isinstance(target, ast.Attribute) and target.attr == "get" \
                    and _is_fields(target.value, param) and node.args:
                name = _name_value(node.args[0], scope)
                assert name is not None, ast.unparse(node)
                read.add(name)
            if isinstance(target, ast.Name) and target.id == receive_upload.__name__:
                given = {k.arg: k.value for k in node.keywords}
                read.add(_name_value(given["file_field"], scope) if "file_field" in given
                         else inspect.signature(receive_upload).parameters["file_field"].default)
            for i, arg in enumerate(node.args):
                if _is_fields(arg, param) and isinstance(target, ast.Name) \
                        and target.id in scope:
                    callee = scope[target.id]
                    callee_param = list(inspect.signature(callee).parameters)[i]
                    read |= form_fields_read(callee, callee_param)
        if isinstance(node, ast.Subscript) and _is_fields(node.value, param):
            name = _name_value(node.slice, scope)
            assert name is not None, ast.unparse(node)
            read.add(name)
        if isinstance(node, ast.Compare) and param is not None and \
                any(isinstance(op, ast.In) for op in node.ops):
            for container in node.comparators:
                if isinstance(container, ast.Tuple | ast.List | ast.Set):
                    read |= {v for v in (_name_value(e, scope) for e in container.elts) if v}
    return read


@pytest.mark.parametrize(("path", "route", "declared"), [
    ("/v1/models", model_routes.upload_model, openapi.MODEL_UPLOAD_FIELDS),
    ("/v1/datasets", dataset_routes.upload_dataset, openapi.DATASET_UPLOAD_FIELDS),
])
def test_upload_operations_declare_the_fields_the_code_reads(doc, path, route, declared):
    read = form_fields_read(route)
    assert "file" in read and len(read) >= 2
    assert set(declared) == read, (sorted(declared), sorted(read))
    body = doc["paths"][path]["post"]["requestBody"]
    assert body["required"] is True
    schema = body["content"]["multipart/form-data"]["schema"]
    assert schema["required"] == ["file"]
    assert set(schema["properties"]) == read
    assert schema["properties"]["file"]["format"] == "binary"
    assert schema["properties"]["file"]["type"] == "string"
    for name, field in schema["properties"].items():
        assert field.get("type") and field.get("description"), name


def test_the_model_fields_include_the_preprocessing_fields(doc):
    """parse_import_options' fields are found through the call (the walk follows it)."""
    assert {"input_shape", "num_classes", "layout", "mean", "std", "arch", "name"} <= \
        form_fields_read(model_routes.upload_model)


def npz() -> bytes:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    np.savez(buf, x_train=rng.random((32, 1, 8, 8), dtype=np.float32),
             y_train=np.arange(32) % 4)
    return buf.getvalue()


def test_uploads_with_the_declared_fields_succeed(client, doc):
    """What Swagger's "Try it out" sends: the file and the declared text fields."""
    model = doc["paths"]["/v1/models"]["post"]["requestBody"]["content"]["multipart/form-data"]
    assert {"name", "arch"} <= set(model["schema"]["properties"])
    r = client.post("/v1/models",
                    files={"file": ("m.safetensors", io.BytesIO(safetensors_bytes()))},
                    data={"name": "swagger", "arch": '{"name": "lenet300"}'})
    assert r.status_code == 201, r.text
    assert r.json()["name"] == "swagger"
    r = client.post("/v1/datasets", files={"file": ("d.npz", io.BytesIO(npz()))},
                    data={"name": "swagger-data", "allow_label_gaps": "false"})
    assert r.status_code == 201, r.text
    assert r.json()["name"] == "swagger-data"


# ---- the JobSpec --------------------------------------------------------------------------

def test_every_step_op_has_an_example_and_each_validates(settings):
    assert set(JOB_SPEC_EXAMPLES) == set(AVAILABLE_OPS)
    for op, example in JOB_SPEC_EXAMPLES.items():
        assert example["summary"].startswith(f"{op}:"), op
        spec = JobSpec.model_validate(example["value"],
                                      context={"max_epochs": settings.max_epochs})
        assert op in [step.op for step in spec.steps], op


def test_the_job_body_is_the_job_spec_schema_with_the_examples(doc):
    body = doc["paths"]["/v1/jobs"]["post"]["requestBody"]
    media = body["content"]["application/json"]
    assert body["required"] is True
    assert media["schema"] == {"$ref": "#/components/schemas/JobSpec"}
    assert set(media["examples"]) == set(AVAILABLE_OPS)
    spec = doc["components"]["schemas"]["JobSpec"]
    assert {"model", "dataset", "steps", "seed", "device", "normalize"} <= set(spec["properties"])
    assert spec["additionalProperties"] is False
    mapping = spec["properties"]["steps"]["items"]["discriminator"]["mapping"]
    assert set(mapping) == set(AVAILABLE_OPS)
    for ref in mapping.values():
        assert ref.removeprefix("#/components/schemas/") in doc["components"]["schemas"]
    for field in ("model", "dataset", "device", "seed"):
        assert spec["properties"][field].get("description"), field
    # the examples validate against the published schema too (what a client generator or the
    # dashboard's form checks), and a wrong op does not
    validator = jsonschema.Draft202012Validator(schema_of(doc, "JobSpec"))
    for name, example in media["examples"].items():
        errors = list(validator.iter_errors(example["value"]))
        assert not errors, (name, [e.message for e in errors][:3])
    bad = {"model": "m", "dataset": "synthetic-tiny", "steps": [{"op": "nope"}]}
    assert list(validator.iter_errors(bad))


def test_every_example_submits(client, doc, enqueued):
    examples = doc["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["application/json"][
        "examples"]
    for name, example in examples.items():
        r = client.post("/v1/jobs", json=example["value"])
        assert r.status_code == 202, (name, r.text)
    assert len(enqueued) == len(examples)


def test_the_job_body_still_validates_as_before(client):
    """The schema is documentation: validation and its error shape stay the route's."""
    r = client.post("/v1/jobs", json={"model": "m", "dataset": "synthetic-tiny",
                                      "steps": [{"op": "train", "epochs": 0}]})
    assert r.status_code == 422
    assert r.json()["error"] == "ValidationError"
    assert r.json()["detail"].startswith("steps[0].epochs:")
    r = client.post("/v1/jobs", content=b"[1, 2]", headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and r.json()["error"] == "ValidationError"


# ---- the docs pages -----------------------------------------------------------------------

class _Loads(HTMLParser):
    """What a browser fetches while loading a page: script src and link href."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "script" and values.get("src"):
            self.urls.append(values["src"] or "")
        if tag == "link" and values.get("href"):
            self.urls.append(values["href"] or "")


EXTERNAL = re.compile(r"^(?:[a-z][a-z0-9+.-]*:)?//", re.IGNORECASE)


@pytest.mark.parametrize(("page", "assets"), [
    ("/docs", {"swagger-ui-bundle.js", "swagger-ui.css", "favicon.png"}),
    ("/redoc", {"redoc.standalone.js", "favicon.png"}),
])
def test_docs_pages_load_only_local_assets(app, page, assets):
    with TestClient(app) as anonymous:  # the pages need no key
        r = anonymous.get(page)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        html = r.text
        assert not re.search(r"https?://", html), re.findall(r"https?://\S+", html)
        # and the browser is told to fetch nothing from elsewhere
        assert r.headers["content-security-policy"] == openapi.DOCS_CSP
        assert "default-src 'self'" in openapi.DOCS_CSP and "http" not in openapi.DOCS_CSP
        assert "/openapi.json" in html
        parser = _Loads()
        parser.feed(html)
        assert {Path(url).name for url in parser.urls} == assets
        for url in parser.urls:
            assert not EXTERNAL.match(url) and url.startswith(openapi.ASSETS_URL + "/"), url
            asset = anonymous.get(url)
            assert asset.status_code == 200, url
            assert len(asset.content) > 1000, url
            if url.endswith(".css"):
                # a stylesheet's url(...) would be fetched too: only data: URIs are allowed
                for ref in re.findall(r"url\(\s*['\"]?([^'\")]+)", asset.text):
                    assert ref.startswith("data:"), ref
            if url.endswith(".js"):
                assert asset.headers["content-type"].startswith(("text/javascript",
                                                                 "application/javascript"))
    if page == "/docs":
        # no badge from validator.swagger.io; the key survives a reload
        assert '"validatorUrl": null' in html
        assert '"persistAuthorization": true' in html


def test_docs_pages_are_not_in_the_document(doc):
    assert not {"/docs", "/redoc", openapi.ASSETS_URL} & set(doc["paths"])


# ---- in a browser: Swagger UI and ReDoc, air-gapped -----------------------------------------

CHROMIUM = os.environ.get("SLIMLINE_TEST_CHROMIUM", "/usr/bin/chromium")


@pytest.fixture
def live(app, keys) -> Iterator[tuple[str, str]]:
    """The app served by uvicorn on a free local port (a browser needs a real socket), and an
    API key."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}", keys["a"]
    finally:
        server.should_exit = True
        thread.join(10)


def test_swagger_ui_and_redoc_work_air_gapped(live, enqueued, tmp_path):
    """Everything the pages fetch comes from the API (anything else is aborted and counted);
    Authorize takes the key; "Try it out" uploads a model and a dataset with the file alone and
    submits an example job."""
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    chromium = shutil.which(CHROMIUM) or (CHROMIUM if Path(CHROMIUM).exists() else None)
    if chromium is None:
        pytest.fail(f"{CHROMIUM} not found: install it with `bash scripts/ensure-browser.sh` "
                    "(apt-get install chromium, as root) or set SLIMLINE_TEST_CHROMIUM")
    url, key = live
    outside: list[str] = []

    def only_local(route) -> None:
        if route.request.url.startswith(url + "/"):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    def execute(operation) -> str:
        operation.locator("button.execute").click()
        status = operation.locator(".live-responses-table .response-col_status").nth(1)
        status.wait_for(timeout=30_000)
        return status.inner_text().strip()

    console: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            context = browser.new_context()
            context.route("**/*", only_local)
            page = context.new_page()
            page.on("console", lambda message: console.append(message.text))
            page.goto(url + "/docs")
            page.wait_for_selector(".opblock", timeout=30_000)
            assert page.locator(".opblock").count() >= 15
            page.click("button.authorize")
            dialog = page.locator(".modal-ux")
            assert "bearerAuth" in dialog.inner_text()
            dialog.locator("input").fill(key)
            dialog.locator("button.authorize").click()
            dialog.locator("button.btn-done").click()

            model = page.locator("#operations-models-upload_model_v1_models_post")
            model.locator(".opblock-summary").click()
            model.locator("input[type=file]").set_input_files(files=[{
                "name": "swagger.safetensors", "mimeType": "application/octet-stream",
                "buffer": safetensors_bytes()}])
            assert execute(model) == "201"
            dataset = page.locator("#operations-datasets-upload_dataset_v1_datasets_post")
            dataset.locator(".opblock-summary").click()
            dataset.locator("input[type=file]").set_input_files(files=[{
                "name": "swagger.npz", "mimeType": "application/octet-stream",
                "buffer": npz()}])
            assert execute(dataset) == "201"
            job = page.locator("#operations-jobs-submit_v1_jobs_post")
            job.locator(".opblock-summary").click()
            job.locator("select.examples-select-element").first.select_option(label=next(
                e["summary"] for op, e in JOB_SPEC_EXAMPLES.items() if op == "pcn"))
            assert '"op": "pcn"' in job.locator("textarea.body-param__text").input_value()
            assert execute(job) == "202"
            page.screenshot(path=str(tmp_path / "docs.png"), full_page=False)

            page.goto(url + "/redoc")
            page.locator("h2", has_text="Upload Model").wait_for(timeout=30_000)
            assert "bearerAuth" in page.inner_text("body")
            page.screenshot(path=str(tmp_path / "redoc.png"), full_page=False)
        finally:
            browser.close()
    assert not outside, outside
    # what the pages' policy refused: only ReDoc's logo (it then shows none)
    refused = [m for m in console if "Content Security Policy" in m]
    assert all("cdn.redoc.ly" in m for m in refused), refused
    assert len(enqueued) == 1
    print(f"screenshots: {tmp_path}")
