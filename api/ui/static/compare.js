/* The compare page: GET /v1/reports/compare?jobs=...&cost=... as one table and an
 * accuracy-vs-cost scatter with the Pareto set marked (and links to its PNG and Markdown). */
"use strict";

(() => {
  const { api, el, clear, fmt } = SL;
  const costSelect = document.getElementById("cost");
  const idsInput = document.getElementById("compare-ids");
  const errorNode = document.getElementById("compare-error");
  const query = new URLSearchParams(window.location.search);

  const ids = () => idsInput.value.split(/[\s,]+/).map((s) => s.trim()).filter(Boolean);
  idsInput.value = (query.get("jobs") || "").split(",").filter(Boolean).join(", ");
  if (query.get("cost")) costSelect.value = query.get("cost");

  function url(format) {
    const params = new URLSearchParams({ jobs: ids().join(","), cost: costSelect.value, format });
    return `/v1/reports/compare?${params}`;
  }

  async function load() {
    const tbody = clear(document.querySelector("#compare-table tbody"));
    const chart = clear(document.getElementById("compare-chart"));
    const notes = clear(document.getElementById("compare-notes"));
    errorNode.hidden = true;
    document.getElementById("compare-png").href = url("png");
    document.getElementById("compare-md").href = url("md");
    const page = new URL(window.location.href);
    page.searchParams.set("jobs", ids().join(","));
    page.searchParams.set("cost", costSelect.value);
    window.history.replaceState(null, "", page);
    if (!ids().length) return;
    let report;
    try { report = await api(url("json")); } catch (err) { SL.showError(errorNode, err); return; }
    const cost = report.cost;
    for (const row of report.rows) {
      const p = row.params || {};
      tbody.append(el("tr", { "data-job-id": row.job_id, class: row.pareto ? "pareto" : "" },
        el("td", {}, SL.jobLink(row.job_id)), el("td", {}, SL.badge(row.status)),
        el("td", { class: "small", text: row.name || "" }),
        el("td", {}, row.model_id ? SL.modelLink(row.model_id) : "—"),
        el("td", { class: "num", text: fmt.int(p.total) }), el("td", { class: "num", text: fmt.int(p.trainable) }),
        el("td", { class: "num", text: fmt.int(p.nonzero) }), el("td", { class: "num", text: fmt.int(row.macs) }),
        el("td", { class: "num", text: fmt.bytes(row.bytes) }), el("td", { class: "num", text: fmt.pct(row.accuracy) }),
        el("td", { class: "num", text: fmt.num(row.latency_ms) }), el("td", { class: "num", text: fmt.num(row.cost) }),
        el("td", { class: "pareto-mark", text: row.pareto ? "✓" : "" })));
    }
    for (const note of report.notes || []) notes.append(el("li", { text: note }));
    const points = report.rows.map((row) => ({ x: row.cost, y: row.accuracy, pareto: row.pareto,
      label: fmt.short(row.job_id), href: `/ui/jobs/${encodeURIComponent(row.job_id)}` }));
    const base = report.baseline;
    if (base && SL.isNum(base.cost) && SL.isNum(base.accuracy)) {
      points.push({ x: base.cost, y: base.accuracy, kind: "baseline", label: "start" });
    }
    const drawn = SLChart.scatter(chart, "compare", `Accuracy vs ${cost}`, points,
      { xLabel: cost, yLabel: "accuracy" });
    if (!drawn) chart.append(el("p", { class: "muted", text: `No job has both ${cost} and accuracy to plot.` }));
  }

  costSelect.addEventListener("change", load);
  document.getElementById("compare-go").addEventListener("click", load);
  idsInput.addEventListener("keydown", (e) => { if (e.key === "Enter") load(); });
  load();
})();
