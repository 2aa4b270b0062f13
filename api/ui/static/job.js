/* The job page: live progress from the SSE stream (GET /v1/jobs/{id}/events), ETA, the step
 * table, the curves drawn as charts, artifacts, lineage, trials of an auto job, cancel. */
"use strict";

(() => {
  const { api, el, clear, fmt, isNum } = SL;
  const jobId = document.body.dataset.jobId;
  const enc = encodeURIComponent(jobId);
  const progressNode = document.getElementById("job-progress");
  let job = null;
  let source = null;
  let refreshTimer = null;
  let curvesTimer = null;
  let pollTimer = null;
  let finalLoaded = false;

  /* ---- the job document ---- */
  function showProgress(progress, stage, eta) {
    SL.progressBar(progressNode, progress);
    document.getElementById("job-percent").textContent = `${Math.round((progress || 0) * 100)} %`;
    if (stage !== undefined) document.getElementById("job-stage").textContent = stage || "";
    document.getElementById("job-eta").textContent = isNum(eta) && eta > 0 ? `about ${fmt.secs(eta)} left` : "";
  }

  function renderJob() {
    const status = document.getElementById("job-status");
    status.replaceWith(Object.assign(SL.badge(job.status), { id: "job-status" }));
    const progress = job.status === "succeeded" ? 1 : job.progress;
    showProgress(progress, job.status === "running" || job.status === "queued" ? job.stage : job.status,
      SL.TERMINAL.includes(job.status) ? null : job.eta_s);
    const errorNode = document.getElementById("job-error");
    errorNode.hidden = !job.error;
    if (job.error) {
      clear(errorNode).append(el("strong", { text: job.error.code }), ": ", job.error.message);
    }
    document.getElementById("cancel").hidden = SL.TERMINAL.includes(job.status);
    const facts = clear(document.getElementById("job-facts"));
    const model = SL.modelOf(job);
    const add = (term, ...value) => facts.append(el("dt", { text: term }), el("dd", {}, ...value));
    add("steps", SL.opsOf(job));
    add("model", model.id ? SL.modelLink(model.id) : el("code", { text: JSON.stringify(model.arch || {}) }));
    add("dataset", (job.spec && job.spec.dataset) || "—");
    if (job.result && job.result.model_id) add("result model", SL.modelLink(job.result.model_id));
    if (job.parent_id) add("search", SL.jobLink(job.parent_id), ` (${job.kind} trial)`);
    const after = job.result && job.result.after;
    if (after) {
      add("accuracy", fmt.pct(after.accuracy));
      add("params", `${fmt.int((after.params || {}).total)} total, ${fmt.int((after.params || {}).nonzero)} nonzero`);
      add("MACs", fmt.int(after.macs));
    }
    add("created", fmt.time(job.created_at));
    if (job.finished_at) add("finished", fmt.time(job.finished_at));
    document.getElementById("rerun").href = `/ui/new?from=${enc}`;
    renderSteps();
  }

  const COMMON = new Set(["op", "wall_s", "params", "macs", "accuracy"]);

  function metricsOf(step) {
    const flat = [];
    for (const [k, v] of Object.entries(step)) {
      if (COMMON.has(k)) continue;
      if (isNum(v)) flat.push(`${k} ${fmt.num(v)}`);
      else if (typeof v === "string" && v.length < 40) flat.push(`${k} ${v}`);
    }
    return flat;
  }

  function renderSteps() {
    const tbody = clear(document.querySelector("#steps-table tbody"));
    const steps = (job.result && job.result.steps) || [];
    const specSteps = (job.spec && job.spec.steps) || [];
    specSteps.forEach((spec, i) => {
      const step = steps[i];
      if (!step) {
        tbody.append(el("tr", { class: "pending" }, el("td", { text: i }), el("td", { text: spec.op }),
          el("td", { colspan: 7, class: "muted", text: job.status === "running" ? "pending" : "—" })));
        return;
      }
      const params = step.params || {};
      const details = el("details", {}, el("summary", { text: metricsOf(step).slice(0, 6).join(" · ") || "details" }),
        el("pre", { class: "json", text: JSON.stringify(step, null, 1) }));
      tbody.append(el("tr", { "data-op": step.op },
        el("td", { text: i }), el("td", { text: step.op }),
        el("td", { class: "num", text: fmt.num(step.wall_s, 3) }),
        el("td", { class: "num", text: fmt.int(params.total) }),
        el("td", { class: "num", text: fmt.int(params.nonzero) }),
        el("td", { class: "num", text: fmt.int(params.trainable) }),
        el("td", { class: "num", text: fmt.int(step.macs) }),
        el("td", { class: "num", text: fmt.pct(step.accuracy) }),
        el("td", { class: "metrics" }, details)));
    });
  }

  async function loadJob() {
    try {
      job = await api(`/v1/jobs/${enc}`);
    } catch (err) {
      SL.flash(`${err.error || "Error"}: ${err.detail || err}`);
      return;
    }
    renderJob();
    if (SL.TERMINAL.includes(job.status) && !finalLoaded) {
      finalLoaded = true;
      loadCurves();
      loadArtifacts();
      loadLineage();
      if (source) source.close();
    }
    if (job.kind === "auto") loadTrials();
  }

  function refreshSoon(ms = 400) {
    clearTimeout(refreshTimer);
    refreshTimer = setTimeout(loadJob, ms);
  }

  function curvesSoon(ms = 1500) {
    clearTimeout(curvesTimer);
    curvesTimer = setTimeout(loadCurves, ms);
  }

  /* ---- live events: SSE, with polling as the fallback ---- */
  function follow() {
    if (!window.EventSource) { poll(); return; }
    source = new EventSource(`/v1/jobs/${enc}/events`);
    source.addEventListener("progress", (e) => {
      const data = JSON.parse(e.data).data || {};
      showProgress(data.progress, data.stage, data.eta_s);
    });
    source.addEventListener("status", () => refreshSoon(100));
    for (const kind of ["epoch", "effective_dim", "pcn", "pruning", "lowrank", "dctps",
      "channel_prune", "analysis", "spectrum", "auto_trial", "auto_budget", "auto_result"]) {
      source.addEventListener(kind, () => { refreshSoon(); curvesSoon(); });
    }
    source.addEventListener("end", () => { source.close(); refreshSoon(50); });
    source.onerror = () => {
      if (source.readyState === EventSource.CLOSED) { source = null; poll(); }
    };
  }

  function poll() {
    clearTimeout(pollTimer);
    pollTimer = setTimeout(async () => {
      await loadJob();
      if (job && !SL.TERMINAL.includes(job.status)) { curvesSoon(0); poll(); }
    }, 2000);
  }

  /* ---- curves ---- */
  const last = (arr, n) => arr.slice(Math.max(0, arr.length - n));

  function drawCurves(curves, root) {
    const C = SLChart;
    const training = curves.training || [];
    if (training.length) {
      const pts = (k) => training.map((r) => [r.global_epoch, r[k]]);
      C.line(root, "training-loss", "Training: loss", [{ name: "loss", points: pts("loss") },
        { name: "val_loss", points: pts("val_loss"), dashed: true }], { xLabel: "epoch", yLabel: "loss" });
      C.line(root, "training-accuracy", "Training: accuracy", [{ name: "accuracy", points: pts("accuracy") },
        { name: "val_accuracy", points: pts("val_accuracy"), dashed: true }], { xLabel: "epoch", yLabel: "accuracy" });
    }
    const effective = curves.effective_dim || {};
    const effSeries = [];
    for (const [layer, records] of Object.entries(effective)) {
      const taus = new Set(records.flatMap((r) => Object.keys(r.effective_dim || {})));
      for (const tau of taus) {
        effSeries.push({ name: `${layer} τ=${tau}`, points: records.map((r) => [r.global_epoch, (r.effective_dim || {})[tau]]) });
      }
    }
    if (effSeries.length) C.line(root, "effective-dim", "Effective dimensionality", effSeries, { xLabel: "epoch", yLabel: "dims" });
    for (const [layer, records] of Object.entries(curves.spectra || {})) {
      const series = last(records, 6).map((r) => ({
        name: `${r.source || ""} epoch ${r.global_epoch ?? r.epoch ?? ""}`,
        points: (r.eigvals || []).map((v, i) => [i + 1, v]), dashed: r.source === "pcn" }));
      C.line(root, `spectrum-${layer}`, `Input spectrum: ${layer}`, series, { xLabel: "component", yLabel: "eigenvalue", logY: true });
    }
    const transforms = curves.transforms || [];
    if (transforms.length) {
      const layers = [...new Set(transforms.flatMap((r) => Object.keys(r.layers || {})))];
      C.bars(root, "pcn", "PCN: dims kept per layer", layers, transforms.map((r) => ({
        name: `pcn step ${r.step}`, values: layers.map((l) => { const v = (r.layers || {})[l]; return isNum(v) ? v : v && v.dims; }) })),
      { yLabel: "dims" });
    }
    const pruning = curves.pruning || [];
    if (pruning.length) {
      const layers = [...new Set(pruning.flatMap((r) => Object.keys(r.layers || {})))];
      C.bars(root, "pruning", "Pruning: weights kept per layer", layers, pruning.map((r) => ({
        name: `${r.op} step ${r.step}`, values: layers.map((l) => ((r.layers || {})[l] || {}).fraction) })),
      { yLabel: "fraction kept" });
    }
    const lowrank = curves.lowrank || [];
    if (lowrank.length) {
      const rec = lowrank[lowrank.length - 1];
      const layers = Object.keys(rec.layers || {});
      const sum = (a) => (Array.isArray(a) ? a.reduce((x, y) => x + y, 0) : a);
      C.bars(root, "lowrank", `Low-rank: ranks (step ${rec.step})`, layers, [
        { name: "full rank", values: layers.map((l) => sum(rec.layers[l].full_ranks)) },
        { name: "kept rank", values: layers.map((l) => sum(rec.layers[l].ranks)) }], { yLabel: "rank" });
    }
    const channel = curves.channel_pruning || [];
    if (channel.length) {
      const rec = channel[channel.length - 1];
      const groups = Object.keys(rec.groups || {});
      C.bars(root, "channel-prune", `Channel pruning: units (step ${rec.step})`, groups, [
        { name: "total", values: groups.map((g) => rec.groups[g].total) },
        { name: "kept", values: groups.map((g) => rec.groups[g].kept) }], { yLabel: "units" });
    }
    const dctps = curves.dctps || [];
    if (dctps.length) {
      const rec = dctps[dctps.length - 1];
      const layers = Object.keys(rec.layers || {});
      C.bars(root, "dctps", `DCTpS allocation (step ${rec.step})`, layers, [
        { name: "weights", values: layers.map((l) => rec.layers[l].weights) },
        { name: "nnz in S", values: layers.map((l) => rec.layers[l].nnz) }], { yLabel: "values" });
    }
    drawAnalysis(curves.analysis || {}, root);
    drawAuto(curves.auto || {}, root);
  }

  function drawAnalysis(analysis, root) {
    const C = SLChart;
    for (const [kind, layers] of Object.entries(analysis)) {
      for (const [layer, records] of Object.entries(layers)) {
        const r = records[records.length - 1];
        if (!r) continue;
        const name = `analysis-${kind}-${layer}`;
        if (kind === "unit_pruning") {
          const series = [];
          for (const order of ["magnitude", "frame_potential", "random"]) {
            const pts = (r[order] || []).map((p) => [p.removed, p.accuracy ?? p.accuracy_mean]);
            if (pts.length) series.push({ name: order, points: pts, dashed: order === "random" });
          }
          C.line(root, name, `Unit pruning: ${layer}`, series, { xLabel: "units removed", yLabel: r.metric || "accuracy" });
        } else if (kind === "spectrum") {
          C.line(root, name, `Weight spectrum vs init: ${layer}`, [
            { name: "trained", points: (r.eigenvalues || []).map((v, i) => [i + 1, v]) },
            { name: "fresh init", points: (r.init_eigenvalues || []).map((v, i) => [i + 1, v]), dashed: true }],
          { xLabel: "index", yLabel: "eigenvalue of W Wᵀ", logY: true,
            hlines: [{ y: r.lambda_plus, name: "Marchenko–Pastur edge λ+" }] });
        } else if (kind === "elbow") {
          C.line(root, name, `Elbow: ${layer} (knee ${r.knee})`, [
            { name: "residual energy", points: (r.residual || []).map((v, i) => [i, v]) },
            { name: r.metric || "accuracy", points: (r.ranks || []).map((p) => [p.rank, p.accuracy]) }],
          { xLabel: "rank k", yLabel: "fraction", vlines: [{ x: r.knee, name: "knee" }] });
        } else {
          const series = Object.entries(r).filter(([, v]) => Array.isArray(v) && v.length && v.every(isNum))
            .map(([k, v]) => ({ name: k, points: v.map((y, i) => [i + 1, y]) }));
          C.line(root, name, `${kind}: ${layer}`, series, { xLabel: "index" });
        }
      }
    }
  }

  function budgetValue(budget) {
    if (!budget || typeof budget !== "object") return [null, null];
    if (isNum(budget.value)) return [budget.kind, budget.value];
    const entry = Object.entries(budget).find(([k, v]) => isNum(v) && k !== "batch_size");
    return entry || [null, null];
  }

  function drawAuto(auto, root) {
    const trials = auto.trials || [];
    if (!trials.length) return;
    const pareto = new Set(auto.pareto || []);
    const [kind, value] = budgetValue(auto.budget);
    const chosen = (auto.winner && auto.winner.winner) || {};
    const points = trials.filter((t) => t.status === "succeeded").map((t) => {
      const onFront = t.phase === "finetune" && pareto.has(t.trial);
      const won = t.phase === "final";
      return { x: t.cost, y: t.val_accuracy, pareto: onFront,
        label: onFront || won ? `#${t.trial} ${t.phase}` : "",
        title: `#${t.trial} ${t.phase}: ${t.method || ""}`,
        href: t.job_id ? `/ui/jobs/${encodeURIComponent(t.job_id)}` : null,
        kind: won ? "winner" : t.phase };
    });
    const base = auto.baseline || {};
    if (isNum(base.cost) && isNum(base.val_accuracy)) {
      points.push({ x: base.cost, y: base.val_accuracy, kind: "baseline", label: "start", title: "the starting model" });
    }
    const figure = SLChart.scatter(root, "auto-frontier", "Auto-compress: trials and frontier", points,
      { xLabel: kind || "cost", yLabel: "val accuracy", vlines: isNum(value) ? [{ x: value, name: "budget" }] : [] });
    const reason = auto.winner && auto.winner.reason;
    if (figure && (reason || chosen.method)) {
      figure.append(el("figcaption", { class: "small", text: reason || `winner: ${chosen.method}` }));
    }
  }

  async function loadCurves() {
    let curves;
    try { curves = await api(`/v1/jobs/${enc}/curves`); } catch (err) { return; }
    const root = document.getElementById("charts");
    const fresh = el("div", { class: "charts", id: "charts" });
    drawCurves(curves, fresh);
    if (!fresh.children.length) fresh.append(el("p", { class: "muted", text: "No curves yet." }));
    root.replaceWith(fresh);
  }

  /* ---- artifacts, lineage, trials ---- */
  async function loadArtifacts() {
    let list;
    try { list = await api(`/v1/jobs/${enc}/artifacts`); } catch (err) { return; }
    const tbody = clear(document.querySelector("#artifacts-table tbody"));
    const plots = clear(document.getElementById("plots"));
    for (const a of list.items) {
      const url = a.url || `/v1/jobs/${enc}/artifacts/${encodeURIComponent(a.name)}`;
      tbody.append(el("tr", { "data-artifact": a.name },
        el("td", {}, el("a", { href: url, download: a.name, class: "artifact" }, a.name)),
        el("td", { text: a.kind }), el("td", { class: "num", text: fmt.bytes(a.size_bytes) }),
        el("td", { class: "mono small", text: (a.sha256 || "").slice(0, 16) })));
      if (/\.png$/i.test(a.name)) {
        plots.append(el("figure", { class: "plot" }, el("a", { href: url },
          el("img", { src: url, alt: a.name })), el("figcaption", { text: a.name })));
      }
    }
    if (!list.items.length) tbody.append(el("tr", {}, el("td", { colspan: 4, class: "muted", text: "none" })));
  }

  async function loadLineage() {
    const list = document.getElementById("lineage");
    const model = SL.modelOf(job);
    const chain = model.id ? await SL.lineageOf(model.id) : (model.arch ? [{ arch: model.arch }] : []);
    chain.push({ job, model: null });
    if (job.result && job.result.model_id) {
      try { chain[chain.length - 1].model = await api(`/v1/models/${encodeURIComponent(job.result.model_id)}`); } catch (e) { /* deleted */ }
    }
    SL.renderLineage(list, chain, null);
    list.lastElementChild && list.lastElementChild.classList.add("current");
    if (job.parent_id) list.prepend(el("li", {}, "trial of auto-compress search ", SL.jobLink(job.parent_id)));
  }

  async function loadTrials() {
    let trials;
    try { trials = await api(`/v1/jobs/${enc}/trials`); } catch (err) { return; }
    document.getElementById("trials-card").hidden = false;
    const table = document.getElementById("trials-table");
    clear(table.tHead).append(el("tr", {}, ...["trial", "phase", "method", "status", "progress", "cost",
      "val accuracy", "accuracy", "job"].map((h) => el("th", { text: h }))));
    const tbody = clear(table.tBodies[0]);
    for (const t of trials.items || []) {
      tbody.append(el("tr", {}, el("td", { text: t.trial ?? "" }), el("td", { text: t.phase || t.kind || "" }),
        el("td", { text: t.method || "" }), el("td", {}, SL.badge(t.status)),
        el("td", { class: "num", text: `${Math.round((t.progress || 0) * 100)} %` }),
        el("td", { class: "num", text: fmt.num(t.cost) }), el("td", { class: "num", text: fmt.pct(t.val_accuracy) }),
        el("td", { class: "num", text: fmt.pct(t.accuracy) }),
        el("td", {}, t.job_id || t.id ? SL.jobLink(t.job_id || t.id) : "")));
    }
  }

  document.getElementById("cancel").addEventListener("click", async () => {
    if (!window.confirm("Cancel this job?")) return;
    try {
      job = await api(`/v1/jobs/${enc}/cancel`, { method: "POST" });
      renderJob();
    } catch (err) {
      SL.flash(`${err.error || "Error"}: ${err.detail || err}`);
    }
  });

  (async () => {
    await loadJob();
    if (!job) return;
    if (!SL.TERMINAL.includes(job.status)) {
      follow();
      loadCurves();
      loadLineage();
      loadArtifacts();
    }
  })();
})();
