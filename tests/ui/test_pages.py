"""The dashboard without a browser: every page is HTML (200), the sign-in cookie works for
GET/HEAD only and as strictly as a bearer key, sign-out clears it, the static files name no
other host, and the new-job form's schema and templates are the API's."""
from __future__ import annotations

import re

import pytest

from api.ui.router import STATIC_DIR, _safe_next
from service.spec import AVAILABLE_OPS, JobSpec

PAGES = ["/ui", "/ui/jobs/01abc", "/ui/models", "/ui/models/01abc", "/ui/new", "/ui/compare",
         "/ui/compare?jobs=a,b", "/ui/signin"]
SVG_NAMESPACE = "http://www.w3.org/2000/svg"  # an XML namespace name, never fetched


def assert_html(response) -> str:
    assert response.status_code == 200, (response.request.url, response.text[:300])
    assert response.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in response.headers["content-security-policy"]
    assert "<!doctype html>" in response.text.lower()
    return response.text


def test_every_page_is_html_with_auth_off(auth_off):
    for path in PAGES:
        html = assert_html(auth_off.get(path))
        assert 'data-auth="off"' in html
    body = auth_off.post("/ui/signin", json={}).json()
    assert body == {"auth": "off"}
    root = auth_off.get("/", follow_redirects=False)  # the service's address opens the dashboard
    assert root.status_code == 307 and root.headers["location"] == "/ui"


def test_pages_need_sign_in_and_the_cookie_works_for_reads_only(auth_on):
    client, key = auth_on
    # not signed in: every page but the sign-in redirects there, remembering where it was
    for path in PAGES[:-1]:
        r = client.get(path, follow_redirects=False)
        assert r.status_code == 303, path
        assert r.headers["location"].startswith("/ui/signin?next=%2Fui"), r.headers["location"]
    assert_html(client.get("/ui/signin?next=/ui/models"))
    assert client.get("/v1/jobs").status_code == 401

    # a wrong key is the API's 401 {error, detail}; no cookie is set
    r = client.post("/ui/signin", json={"key": "sl_not-a-key"})
    assert r.status_code == 401 and r.json()["error"] == "Unauthorized", r.text
    assert "set-cookie" not in r.headers
    assert client.post("/ui/signin", json={"key": ""}).status_code == 422
    # a form post (what another site could send) is not a sign-in
    assert client.post("/ui/signin", data={"key": key}).status_code == 422

    r = client.post("/ui/signin", json={"key": key})
    assert r.status_code == 204, r.text
    cookie = r.headers["set-cookie"]
    assert cookie.startswith("slimline_key=")
    for attribute in ("HttpOnly", "SameSite=strict", "Path=/", "Max-Age="):
        assert attribute.lower() in cookie.lower(), cookie
    assert "secure" not in cookie.lower()  # plain http here; https gets Secure

    for path in PAGES:
        assert_html(client.get(path))
    # GET and HEAD of the API accept the cookie as the key
    assert client.get("/v1/jobs").json() == {"items": [], "next_cursor": None}
    assert client.get("/v1/models").status_code == 200
    # ...but never a POST: that needs the bearer header (CSRF)
    spec = {"model": {"arch": {"name": "lenet300"}}, "dataset": "synthetic-blobs",
            "steps": [{"op": "evaluate"}]}
    r = client.post("/v1/jobs", json=spec)
    assert r.status_code == 401 and r.json()["error"] == "Unauthorized"
    r = client.post("/v1/jobs", json=spec, headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    assert client.get(f"/v1/jobs/{job_id}").status_code == 200
    assert client.post(f"/v1/jobs/{job_id}/cancel").status_code == 401
    r = client.delete(f"/v1/jobs/{job_id}")
    assert r.status_code == 401 and r.json()["error"] == "Unauthorized"
    assert client.get(f"/v1/jobs/{job_id}").status_code == 200  # still there
    # a header, when sent, is what counts (a wrong one is not rescued by the cookie)
    r = client.get("/v1/jobs", headers={"Authorization": "Bearer sl_wrong"})
    assert r.status_code == 401

    # sign out: the cookie is cleared and the pages want a sign-in again
    r = client.post("/ui/signout")
    assert r.status_code == 204
    assert "slimline_key=" in r.headers["set-cookie"]
    assert "max-age=0" in r.headers["set-cookie"].lower()
    assert "slimline_key" not in client.cookies
    assert client.get("/ui", follow_redirects=False).status_code == 303
    assert client.get("/v1/jobs").status_code == 401


def test_a_stale_cookie_is_refused(auth_on):
    client, _ = auth_on
    client.cookies.set("slimline_key", "sl_revoked")
    assert client.get("/ui", follow_redirects=False).status_code == 303
    r = client.get("/v1/jobs")
    assert r.status_code == 401 and r.json()["error"] == "Unauthorized"


@pytest.mark.parametrize("target", ["https://evil.example/ui", "//evil.example/ui", "/v1/jobs",
                                    "/\\evil.example", "javascript:alert(1)", ""])
def test_sign_in_goes_back_to_the_dashboard_only(target):
    assert _safe_next(target) == "/ui"


def test_sign_in_goes_back_where_it_was():
    assert _safe_next("/ui/jobs/01abc?x=1") == "/ui/jobs/01abc?x=1"


def test_static_files_are_served_and_name_no_other_host(auth_off):
    files = sorted(p for p in STATIC_DIR.rglob("*") if p.is_file())
    assert {p.name for p in files} >= {"app.js", "charts.js", "style.css", "job.js", "jobs.js",
                                       "models.js", "model.js", "new_job.js", "compare.js"}
    for path in files:
        r = auth_off.get(f"/ui/static/{path.relative_to(STATIC_DIR).as_posix()}")
        assert r.status_code == 200, path
        text = r.text.replace(SVG_NAMESPACE, "")
        assert not re.search(r"https?://", text), (path.name, re.findall(r"https?://\S+", text))
        assert "//cdn" not in text and "@import" not in text
    for path in PAGES:
        html = auth_off.get(path).text
        external = re.findall(r"""(?:src|href)=["']((?:https?:)?//[^"']+)""", html)
        assert external == [], (path, external)


def test_the_form_validates_with_the_api_schema_and_every_op_has_a_template(auth_off):
    body = auth_off.get("/ui/jobspec.json").json()
    assert body["schema"] == JobSpec.model_json_schema()
    assert set(body["templates"]) == set(AVAILABLE_OPS)
    for op, template in body["templates"].items():
        spec = JobSpec.model_validate(template["value"])
        assert op in [step.op for step in spec.steps], op
