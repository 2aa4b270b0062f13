"""The dashboard in a real browser: headless Debian chromium driven by Playwright, against the
embedded stack (`slimline up`: a real API and a real worker process) with auth ON. Signs in,
submits jobs from the form (a refused one shows the API's 422), follows one to 100 %, checks its
charts, plots and artifact download, cancels one, compares two, uploads a model, signs out.
Screenshots go to tests/ui/screenshots/ (ignored by git) or $SLIMLINE_UI_SCREENSHOTS."""
from __future__ import annotations

import hashlib
import json
import time

import httpx
import pytest

from tests.stack.flows import checkpoint_bytes, run_job_ok, wait_job

pytestmark = [pytest.mark.service, pytest.mark.browser]

TINY_ARCH = {"name": "mlp", "widths": [32, 16], "input_shape": [1, 8, 8], "num_classes": 10}
# finishes in a few seconds on synthetic-tiny: training curves, tracked effective
# dimensionality and spectra, a pcn step, plots and the model as artifacts
FORM_SPEC = {"model": {"arch": TINY_ARCH}, "dataset": "synthetic-tiny", "seed": 0,
             "steps": [{"op": "train", "epochs": 3, "track": ["effective_dim"]},
                       {"op": "pcn", "layers": ["fc1"], "select": {"dims": 8}, "samples": 200},
                       {"op": "evaluate"}]}
# every method's curves: analyses, channel pruning, pcn, low-rank ranks, pruning, DCTpS
SECOND_SPEC = {"model": {"arch": TINY_ARCH}, "dataset": "synthetic-tiny", "seed": 1,
               "steps": [{"op": "train", "epochs": 1},
                         {"op": "analyze", "kinds": ["unit_pruning", "spectrum", "elbow"],
                          "layers": ["fc1"], "seeds": 2},
                         {"op": "channel_prune", "target": {"param_ratio": 0.8}},
                         {"op": "pcn", "layers": ["fc1"], "select": {"dims": 8}, "samples": 200},
                         {"op": "lowrank", "target": {"param_ratio": 0.7}, "samples": 64,
                          "layers": ["fc2"]},
                         {"op": "magnitude", "sparsity": 0.5},
                         {"op": "dctps", "density": 0.3, "layers": ["fc3"]},
                         {"op": "evaluate"}]}
SECOND_CHARTS = ("training-loss", "analysis-unit_pruning-fc1", "analysis-spectrum-fc1",
                 "analysis-elbow-fc1", "channel-prune", "pcn", "lowrank", "pruning", "dctps")
AUTO_SPEC = {"dataset": "synthetic-tiny",
             "steps": [{"op": "auto", "budget": {"total_params": 2000}, "trials": 4,
                        "finetune_trials": 2, "finetune_epochs": 1, "final_epochs": 1,
                        "methods": ["lowrank", "channel_prune", "magnitude"]}]}
LONG_SPEC = {"model": {"arch": {"name": "lenet300"}}, "dataset": "synthetic-blobs",
             "steps": [{"op": "train", "epochs": 200}]}


def assert_charts(page, names) -> None:
    """Each chart is on the page with at least one drawn series (a path with data)."""
    from playwright.sync_api import expect

    for chart in names:
        series = page.locator(f"figure.chart[data-chart='{chart}'] path.series")
        expect(series.first).to_be_attached(timeout=30_000)
        drawn = series.evaluate_all(
            "ps => ps.map(p => [p.getAttribute('d').length, +p.dataset.points])")
        assert drawn and all(length > 10 and points >= 1 for length, points in drawn), \
            (chart, drawn)
        box = series.first.bounding_box()
        assert box is not None and box["width"] > 5, (chart, box)  # drawn, not only in the DOM


def test_dashboard_in_chromium(ui_stack, chromium, screenshot_dir, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    stack, key = ui_stack
    url = stack.url
    print(f"\nscreenshots: {screenshot_dir}")
    api = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60)
    errors: list[str] = []

    def shot(page, name: str) -> None:
        page.screenshot(path=str(screenshot_dir / f"{name}.png"), full_page=True)

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, headless=True,
                                     args=["--no-sandbox", "--disable-dev-shm-usage"])
        context = browser.new_context(accept_downloads=True, viewport={"width": 1280,
                                                                       "height": 900})
        # every request the pages make stays on the service (no CDN, works air-gapped)
        outside: list[str] = []
        context.route("**/*", lambda route: (outside.append(route.request.url), route.abort())
                      if not route.request.url.startswith(url) else route.continue_())
        page = context.new_page()
        page.on("pageerror", lambda exc: errors.append(f"pageerror: {exc}"))
        page.on("console", lambda msg: errors.append(f"console: {msg.text}")
                if msg.type == "error" and "401" not in msg.text
                and "422" not in msg.text else None)
        page.on("dialog", lambda dialog: dialog.accept())
        page.set_default_timeout(30_000)

        # ---- sign in (a wrong key first) ----
        page.goto(f"{url}/ui")
        expect(page).to_have_url(f"{url}/ui/signin?next=%2Fui")
        page.fill("#key", "sl_wrong")
        page.click("#signin-form button[type=submit]")
        expect(page.locator("#signin-error")).to_contain_text("Unauthorized")
        page.fill("#key", key)
        page.click("#signin-form button[type=submit]")
        expect(page).to_have_url(f"{url}/ui")
        cookie = next(c for c in context.cookies() if c["name"] == "slimline_key")
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["value"] == key
        expect(page.locator("#jobs-empty")).to_be_visible()
        shot(page, "01-jobs-empty")

        # ---- the new-job form: the API's 422 shows next to it, then a valid job ----
        page.click("#nav-new")
        expect(page.locator("#template option")).to_have_count(14, timeout=15_000)
        page.select_option("#template", "train")
        assert json.loads(page.input_value("#spec"))["steps"][0]["op"] == "train"
        expect(page.locator("#spec-status")).to_contain_text("valid against the JobSpec schema")
        bad = dict(FORM_SPEC, steps=[{"op": "train", "epochs": 1, "lr": -1}])
        page.fill("#spec", json.dumps(bad))
        expect(page.locator("#spec-errors")).to_contain_text("steps[0].lr")  # the schema check
        page.click("#submit-job")
        expect(page.locator("#spec-errors .api-error")).to_contain_text("steps[0].lr")
        expect(page.locator("#spec-status")).to_contain_text("422")
        shot(page, "02-new-job-422")
        page.fill("#spec", json.dumps(FORM_SPEC, indent=2))
        expect(page.locator("#spec-status")).to_contain_text("valid against the JobSpec schema")
        page.click("#submit-job")
        page.wait_for_url(f"{url}/ui/jobs/*")
        job_id = page.url.rsplit("/", 1)[1]

        # ---- the job page: live progress to 100 %, steps, charts, artifacts ----
        seen: set[str] = set()
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            seen.add(page.inner_text("#job-percent"))
            if page.locator("#job-status").inner_text() in ("succeeded", "failed", "canceled"):
                break
            page.wait_for_timeout(100)
        expect(page.locator("#job-status")).to_have_text("succeeded", timeout=30_000)
        expect(page.locator("#job-percent")).to_have_text("100 %")
        assert page.locator("#job-progress").get_attribute("data-progress") == "1.0000"
        print(f"progress seen: {sorted(seen)}")
        expect(page.locator("#steps-table tbody tr[data-op]")).to_have_count(3)
        expect(page.locator("#steps-table tbody tr[data-op=pcn] td").nth(3)).not_to_have_text("—")
        assert_charts(page, ("training-loss", "training-accuracy", "effective-dim",
                             "spectrum-fc1", "pcn"))
        loss_points = page.locator("figure.chart[data-chart='training-loss'] circle.point")
        assert loss_points.count() == 6  # loss and val_loss for 3 epochs
        expect(page.locator("#lineage li")).not_to_have_count(0)
        expect(page.locator("#lineage")).to_contain_text("mlp")
        # plots load through the sign-in cookie (a plain <img>, no header)
        expect(page.locator("#plots img").first).to_be_visible()
        page.wait_for_function(
            "() => [...document.querySelectorAll('#plots img')].every(i => i.complete)")
        widths = page.locator("#plots img").evaluate_all("imgs => imgs.map(i => i.naturalWidth)")
        assert widths and all(w > 100 for w in widths), widths
        shot(page, "03-job-succeeded")

        # an artifact downloads through the cookie, byte for byte
        listed = {a["name"]: a for a in api.get(f"/v1/jobs/{job_id}/artifacts").json()["items"]}
        with page.expect_download() as info:
            page.click("a.artifact:text-is('model.safetensors')")
        path = tmp_path / "model.safetensors"
        info.value.save_as(path)
        data = path.read_bytes()
        assert len(data) == listed["model.safetensors"]["size_bytes"]
        assert hashlib.sha256(data).hexdigest() == listed["model.safetensors"]["sha256"]

        # ---- a second job (API), and a long one canceled from its page ----
        second = api.post("/v1/jobs", json=SECOND_SPEC)
        assert second.status_code == 202, second.text
        second_id = second.json()["id"]
        assert wait_job(api, second_id, timeout=180)["status"] == "succeeded"
        page.goto(f"{url}/ui/jobs/{second_id}")
        expect(page.locator("#job-status")).to_have_text("succeeded")
        assert_charts(page, SECOND_CHARTS)
        shot(page, "04-job-every-chart")
        long = api.post("/v1/jobs", json=LONG_SPEC)
        assert long.status_code == 202, long.text
        long_id = long.json()["id"]
        page.goto(f"{url}/ui/jobs/{long_id}")
        expect(page.locator("#cancel")).to_be_visible()
        page.click("#cancel")
        expect(page.locator("#job-status")).to_have_text("canceled", timeout=60_000)
        expect(page.locator("#cancel")).to_be_hidden()

        # ---- the jobs list: live status, filter, pick two and compare ----
        page.goto(f"{url}/ui")
        expect(page.locator("#jobs-table tbody tr")).to_have_count(3)
        page.select_option("#status-filter", "succeeded")
        expect(page.locator("#jobs-table tbody tr")).to_have_count(2)
        expect(page.locator(f"tr[data-job-id='{long_id}']")).to_have_count(0)
        page.check(f"tr[data-job-id='{job_id}'] input.pick")
        page.check(f"tr[data-job-id='{second_id}'] input.pick")
        shot(page, "05-jobs")
        page.click("#compare-selected")
        page.wait_for_url(f"{url}/ui/compare?jobs=*")
        expect(page.locator("#compare-table tbody tr")).to_have_count(2)
        expect(page.locator("#compare-table tbody tr.pareto")).not_to_have_count(0)
        report = api.get("/v1/reports/compare", params={"jobs": f"{job_id},{second_id}"}).json()
        for row in report["rows"]:
            cells = page.locator(f"#compare-table tr[data-job-id='{row['job_id']}'] td")
            expect(cells.nth(4)).to_have_text(f"{row['params']['total']:,}")
        points = page.locator("figure.chart[data-chart='compare'] circle.point")
        expect(points).to_have_count(2)
        for i in range(2):
            expect(points.nth(i)).to_be_visible()  # drawn, not only in the DOM
        assert page.locator("figure.chart[data-chart='compare'] circle.point.pareto").count() \
            == len(report["pareto"])
        png = page.locator("#compare-png").get_attribute("href")
        assert api.get(png).headers["content-type"] == "image/png"
        page.select_option("#cost", "macs")
        expect(page.locator("figure.chart[data-chart='compare'] .chart-title")).to_have_text(
            "Accuracy vs macs")
        shot(page, "06-compare")

        # ---- an auto-compress search: its trials and the frontier ----
        trained = run_job_ok(api, {"model": {"arch": TINY_ARCH}, "dataset": "synthetic-tiny",
                                    "steps": [{"op": "train", "epochs": 2}]})
        search = api.post("/v1/jobs", json=dict(AUTO_SPEC, model=trained["result"]["model_id"]))
        assert search.status_code == 202, search.text
        search_id = search.json()["id"]
        page.goto(f"{url}/ui/jobs/{search_id}")
        expect(page.locator("#job-status")).to_have_text("succeeded", timeout=240_000)
        frontier = page.locator("figure.chart[data-chart='auto-frontier']")
        expect(frontier.locator(".point.pareto").first).to_be_visible(timeout=30_000)
        curves = api.get(f"/v1/jobs/{search_id}/curves").json()["auto"]
        drawn = [t for t in curves["trials"] if t["status"] == "succeeded"
                 and t["cost"] is not None and t["val_accuracy"] is not None]
        expect(frontier.locator("circle.point")).to_have_count(len(drawn))
        expect(frontier.locator("circle.point.pareto")).to_have_count(len(curves["pareto"]))
        expect(frontier.locator("rect.point.baseline")).to_have_count(1)
        trial_rows = len(api.get(f"/v1/jobs/{search_id}/trials").json()["items"])
        expect(page.locator("#trials-table tbody tr")).to_have_count(trial_rows)
        shot(page, "07-auto")

        # ---- models: the job's model, lineage, downloads; an upload from the form ----
        result_model = api.get(f"/v1/jobs/{job_id}").json()["result"]["model_id"]
        page.goto(f"{url}/ui/models")
        expect(page.locator(f"tr[data-model-id='{result_model}']")).to_have_count(1)
        ckpt = tmp_path / "tiny.safetensors"
        ckpt.write_bytes(checkpoint_bytes(TINY_ARCH, tmp_path))
        page.set_input_files("#up-file", str(ckpt))
        page.fill("#up-name", "tiny-upload")
        page.click("#upload-submit")
        page.wait_for_url(f"{url}/ui/models/*")
        expect(page.locator("#model-facts")).to_contain_text("tiny-upload")
        expect(page.locator("#report table").first).to_be_visible()
        expect(page.locator("#report")).to_contain_text("fc1")
        shot(page, "08-model-upload")
        page.goto(f"{url}/ui/models/{result_model}")
        expect(page.locator("#lineage")).to_contain_text(job_id[-8:])
        with page.expect_download() as info:
            page.click("a.button:text-is('safetensors')")
        assert info.value.suggested_filename.endswith(".safetensors")

        # ---- sign out: the cookie is gone and the pages want a sign-in ----
        page.click("#signout")
        page.wait_for_url(f"{url}/ui/signin")
        assert not [c for c in context.cookies() if c["name"] == "slimline_key"]
        assert page.evaluate("() => localStorage.getItem('slimline.key')") is None
        page.goto(f"{url}/ui/models")
        expect(page).to_have_url(f"{url}/ui/signin?next=%2Fui%2Fmodels")
        browser.close()
    assert outside == [], outside
    assert errors == [], errors
