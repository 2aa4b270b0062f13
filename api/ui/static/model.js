/* A model's page: facts, lineage (the jobs that made it), the prunability report, the arch. */
"use strict";

(() => {
  const { api, el, clear, fmt } = SL;
  const modelId = document.body.dataset.modelId;

  function table(headers, rows) {
    return el("table", { class: "grid" }, el("thead", {}, el("tr", {}, ...headers.map((h) => el("th", { text: h })))),
      el("tbody", {}, ...rows.map((r) => el("tr", {}, ...r.map((c) => (c instanceof Node ? el("td", {}, c) : el("td", { text: c ?? "" })))))));
  }

  const list = (v) => (Array.isArray(v) ? v.join(", ") : (v && typeof v === "object" ? Object.entries(v).map(([k, x]) => `${k}: ${x}`).join("; ") : v ?? ""));

  function renderReport(report) {
    const root = clear(document.getElementById("report"));
    if (!report) {
      root.append(el("p", { class: "muted", text: "No prunability report for this model (reports are made for uploads)." }));
      return;
    }
    const totals = report.totals || {};
    root.append(el("p", {}, `${fmt.int(totals.layers)} layers, ${fmt.int(totals.params)} params, ${fmt.int(totals.macs)} MACs, `
      + `${fmt.int(totals.groups)} unit groups (${fmt.int(totals.units)} units), ${fmt.int(totals.untouched_groups)} groups left untouched.`));
    root.append(el("h3", { text: "Layers" }), table(["layer", "kind", "shape", "params", "MACs", "group", "methods", "untouched"],
      (report.layers || []).map((l) => [l.name, l.kind, list(l.shape), fmt.int(l.params), fmt.int(l.macs), l.group || "", list(l.methods), list(l.untouched)])));
    if ((report.groups || []).length) {
      root.append(el("h3", { text: "Unit groups" }), table(["group", "units", "producers", "readers", "methods", "untouched"],
        report.groups.map((g) => [g.name, fmt.int(g.units), list(g.producers), list((g.readers || []).map((r) => (Array.isArray(r) ? r.join(" ") : r))), list(g.methods), list(g.untouched)])));
    }
    if ((report.untouched_groups || []).length) {
      root.append(el("h3", { text: "Left untouched" }), table(["group", "producers", "why"],
        report.untouched_groups.map((g) => [g.name, list(g.producers), g.reason])));
    }
  }

  (async () => {
    let model;
    try { model = await api(`/v1/models/${encodeURIComponent(modelId)}`); } catch (err) {
      SL.flash(`${err.error || "Error"}: ${err.detail || err}`);
      return;
    }
    const facts = clear(document.getElementById("model-facts"));
    const add = (term, ...value) => facts.append(el("dt", { text: term }), el("dd", {}, ...value));
    add("name", model.name);
    add("arch", (model.arch || {}).name || "—");
    add("format", model.format);
    add("params", `${fmt.int((model.params || {}).total)} total, ${fmt.int((model.params || {}).trainable)} trainable, ${fmt.int((model.params || {}).nonzero)} nonzero`);
    add("size", fmt.bytes(model.size_bytes));
    add("sha256", el("code", { class: "small", text: model.sha256 || "" }));
    add("made by", model.source_job_id ? SL.jobLink(model.source_job_id) : "upload");
    add("created", fmt.time(model.created_at));
    document.getElementById("arch").textContent = JSON.stringify(model.arch, null, 2);
    renderReport(model.report);
    SL.renderLineage(document.getElementById("lineage"), await SL.lineageOf(modelId), modelId);
  })();
})();
