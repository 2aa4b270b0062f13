/* The jobs page: the tenant's jobs with live status (polled while any is not finished), a status
 * filter, checkboxes to compare. */
"use strict";

(() => {
  const { api, el, clear, fmt } = SL;
  const tbody = document.querySelector("#jobs-table tbody");
  const filter = document.getElementById("status-filter");
  const more = document.getElementById("jobs-more");
  const compareButton = document.getElementById("compare-selected");
  const selected = new Set();
  let nextCursor = null;
  let timer = null;

  filter.value = new URLSearchParams(window.location.search).get("status") || "";

  function accuracyOf(job) {
    const after = job.result && job.result.after;
    return after ? after.accuracy : null;
  }

  function row(job) {
    const box = el("input", { type: "checkbox", value: job.id, "aria-label": `select ${job.id}`,
      class: "pick" });
    box.checked = selected.has(job.id);
    box.addEventListener("change", () => {
      if (box.checked) selected.add(job.id); else selected.delete(job.id);
      compareButton.disabled = selected.size < 1;
      compareButton.textContent = `Compare selected (${selected.size})`;
    });
    const bar = el("div", { class: "progress small" }, el("div", { class: "bar" }));
    SL.progressBar(bar, job.status === "succeeded" ? 1 : job.progress);
    const model = SL.modelOf(job);
    const resultModel = job.result && job.result.model_id;
    return el("tr", { "data-job-id": job.id, "data-status": job.status },
      el("td", {}, box),
      el("td", {}, SL.jobLink(job.id)),
      el("td", {}, SL.badge(job.status)),
      el("td", { class: "nowrap" }, bar, el("span", { class: "mono small", text: ` ${Math.round((job.status === "succeeded" ? 1 : job.progress || 0) * 100)} %` })),
      el("td", { class: "stage", text: job.status === "running"
        ? `${job.stage || ""}${SL.isNum(job.eta_s) && job.eta_s > 0 ? ` · ${fmt.secs(job.eta_s)} left` : ""}`
        : (job.error ? job.error.code : "") }),
      el("td", { class: "small", text: SL.opsOf(job) }),
      el("td", {}, model.id ? SL.modelLink(model.id) : el("span", { class: "muted", text: model.arch ? model.arch.name : "—" }),
        resultModel ? el("span", {}, " → ", SL.modelLink(resultModel)) : null),
      el("td", { class: "num", text: fmt.pct(accuracyOf(job)) }),
      el("td", { class: "small", text: fmt.time(job.created_at) }));
  }

  async function load(append = false) {
    const params = new URLSearchParams({ limit: "50" });
    if (filter.value) params.set("status", filter.value);
    if (append && nextCursor) params.set("cursor", nextCursor);
    let page;
    try {
      page = await api(`/v1/jobs?${params}`);
    } catch (err) {
      SL.flash(`Could not list jobs: ${err.detail || err}`);
      schedule(5000);
      return;
    }
    SL.flash("");
    if (!append) clear(tbody);
    for (const job of page.items) tbody.append(row(job));
    nextCursor = page.next_cursor;
    more.hidden = !nextCursor;
    document.getElementById("jobs-empty").hidden = tbody.children.length > 0;
    const live = page.items.some((j) => !SL.TERMINAL.includes(j.status));
    schedule(live ? 2000 : 10000);
  }

  function schedule(ms) {
    clearTimeout(timer);
    timer = setTimeout(() => { if (!nextCursor || tbody.children.length <= 50) load(false); }, ms);
  }

  filter.addEventListener("change", () => {
    const url = new URL(window.location.href);
    if (filter.value) url.searchParams.set("status", filter.value); else url.searchParams.delete("status");
    window.history.replaceState(null, "", url);
    load(false);
  });
  more.addEventListener("click", () => load(true));
  compareButton.addEventListener("click", () => {
    window.location.assign(`/ui/compare?jobs=${encodeURIComponent([...selected].join(","))}`);
  });
  load(false);
})();
