/* slimline dashboard: shared helpers (API calls, DOM building, formatting, sign-in).
 * No dependencies, no build step. Text from the API is always inserted as text (never as HTML). */
"use strict";

const SL = (() => {
  const KEY = "slimline.key";
  const body = document.body;
  const authOn = () => body.dataset.auth === "on";

  function key() {
    try { return window.localStorage.getItem(KEY) || ""; } catch (e) { return ""; }
  }

  function setKey(value) {
    try {
      if (value) window.localStorage.setItem(KEY, value); else window.localStorage.removeItem(KEY);
    } catch (e) { /* storage disabled: GETs still work with the cookie */ }
  }

  class ApiError extends Error {
    constructor(status, error, detail) {
      super(`${status} ${error}: ${detail}`);
      this.status = status; this.error = error; this.detail = detail;
    }
  }

  function toSignIn() {
    const here = window.location.pathname + window.location.search;
    window.location.assign(`/ui/signin?next=${encodeURIComponent(here)}`);
  }

  /* Call the JSON API. GETs carry the key as a bearer header when the browser has it (the
   * sign-in cookie works for GET too); POST/DELETE need it. Throws ApiError with the API's
   * {error, detail}. */
  async function api(path, options = {}) {
    const headers = new Headers(options.headers || {});
    const k = key();
    if (k) headers.set("Authorization", `Bearer ${k}`);
    let bodyValue = options.body;
    if (options.json !== undefined) {
      headers.set("Content-Type", "application/json");
      bodyValue = JSON.stringify(options.json);
    }
    const response = await fetch(path, {
      method: options.method || "GET", headers, body: bodyValue, credentials: "same-origin",
    });
    const type = response.headers.get("content-type") || "";
    const data = type.includes("json") ? await response.json().catch(() => null) : null;
    if (!response.ok) {
      if (response.status === 401 && authOn() && !options.noRedirect) {
        toSignIn();
      }
      const err = data && data.error ? data : { error: `HTTP ${response.status}`,
        detail: response.statusText || "request failed" };
      throw new ApiError(response.status, err.error, err.detail);
    }
    return data === null && response.status !== 204 && !type.includes("json")
      ? response : data;
  }

  /* el("a", {href: "/x", class: "b"}, "text", child) */
  /* SVG elements by name; "svg:a" is SVG's own link element (an HTML <a> in an SVG is not drawn) */
  function el(tag, attrs, ...children) {
    const isSvg = tag.startsWith("svg:") || ["svg", "g", "path", "line", "circle", "rect", "text",
      "polyline", "title", "polygon"].includes(tag);
    const node = isSvg ? document.createElementNS("http://www.w3.org/2000/svg", tag.replace(/^svg:/, ""))
      : document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (name === "text") node.textContent = String(value);
      else if (name.startsWith("on") && typeof value === "function") {
        node.addEventListener(name.slice(2), value);
      } else node.setAttribute(name, value === true ? "" : String(value));
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function clear(node) { while (node.firstChild) node.removeChild(node.firstChild); return node; }

  const isNum = (v) => typeof v === "number" && Number.isFinite(v);
  const fmt = {
    int: (v) => (isNum(v) ? Math.round(v).toLocaleString("en-US") : "—"),
    num: (v, digits = 4) => (isNum(v) ? (Math.abs(v) >= 1e4 || (v !== 0 && Math.abs(v) < 1e-3)
      ? v.toExponential(2) : String(+v.toPrecision(digits))) : "—"),
    pct: (v) => (isNum(v) ? `${(v * 100).toFixed(2)} %` : "—"),
    bytes: (v) => {
      if (!isNum(v)) return "—";
      const units = ["B", "KiB", "MiB", "GiB"];
      let i = 0; let x = v;
      while (x >= 1024 && i < units.length - 1) { x /= 1024; i += 1; }
      return `${i ? x.toFixed(1) : x} ${units[i]}`;
    },
    secs: (v) => {
      if (!isNum(v)) return "";
      if (v < 60) return `${Math.round(v)} s`;
      if (v < 3600) return `${Math.floor(v / 60)} min ${Math.round(v % 60)} s`;
      return `${Math.floor(v / 3600)} h ${Math.round((v % 3600) / 60)} min`;
    },
    time: (iso) => (iso ? new Date(iso).toLocaleString() : "—"),
    short: (id) => (id ? String(id).slice(-8) : "—"),
  };

  const TERMINAL = ["succeeded", "failed", "canceled"];

  function badge(status) {
    return el("span", { class: `badge status-${status}`, text: status });
  }

  function progressBar(node, progress) {
    const p = isNum(progress) ? Math.max(0, Math.min(1, progress)) : 0;
    node.querySelector(".bar").style.width = `${(p * 100).toFixed(1)}%`;
    node.setAttribute("data-progress", p.toFixed(4));
  }

  function flash(message, kind = "error") {
    const node = document.getElementById("flash");
    if (!node) return;
    node.textContent = message;
    node.className = `flash ${kind}`;
    node.hidden = !message;
  }

  function showError(node, err) {
    node.hidden = false;
    clear(node);
    if (err instanceof ApiError) {
      node.append(el("strong", { text: err.error }), ": ", err.detail);
    } else node.append(String(err && err.message ? err.message : err));
  }

  function opsOf(job) {
    const steps = (job.spec && job.spec.steps) || [];
    return steps.map((s) => s.op).join(" → ");
  }

  function modelOf(job) {
    const m = job.spec && job.spec.model;
    if (typeof m === "string") return { id: m };
    if (m && m.arch) return { arch: m.arch };
    return {};
  }

  function modelLink(id) {
    return el("a", { href: `/ui/models/${encodeURIComponent(id)}`, class: "mono" }, fmt.short(id));
  }

  function jobLink(id, text) {
    return el("a", { href: `/ui/jobs/${encodeURIComponent(id)}`, class: "mono" },
      text || fmt.short(id));
  }

  /* The models a chain of jobs went through: model -> the job that produced it -> its model...
   * Returns [{model, job}] oldest first (job null for an uploaded model). */
  async function lineageOf(modelId, depth = 12) {
    const chain = [];
    let id = modelId;
    const seen = new Set();
    while (id && !seen.has(id) && chain.length < depth) {
      seen.add(id);
      let model;
      try { model = await api(`/v1/models/${encodeURIComponent(id)}`); } catch (e) { break; }
      let job = null;
      if (model.source_job_id) {
        try { job = await api(`/v1/jobs/${encodeURIComponent(model.source_job_id)}`); } catch (e) {
          job = { id: model.source_job_id };
        }
      }
      chain.unshift({ model, job });
      const parentModel = job && job.spec ? job.spec.model : null;
      id = typeof parentModel === "string" ? parentModel : null;
      if (job && job.spec && parentModel && typeof parentModel !== "string") {
        chain.unshift({ model: null, job: null, arch: parentModel.arch });
      }
    }
    return chain;
  }

  function renderLineage(list, chain, current) {
    clear(list);
    for (const item of chain) {
      const li = el("li");
      if (item.arch) li.append("fresh ", el("code", { text: JSON.stringify(item.arch) }));
      if (item.job) {
        li.append("job ", jobLink(item.job.id), " ", el("span", { class: "muted",
          text: item.job.spec ? opsOf(item.job) : "" }), " → ");
      } else if (item.model) li.append("uploaded → ");
      if (item.model) {
        li.append("model ", modelLink(item.model.id), " ", el("span", { class: "muted",
          text: `${item.model.name} · ${fmt.int((item.model.params || {}).total)} params` }));
      }
      if (current && item.model && item.model.id === current) li.classList.add("current");
      list.append(li);
    }
    if (!chain.length) list.append(el("li", { class: "muted", text: "—" }));
  }

  async function signOut() {
    setKey("");
    try { await fetch("/ui/signout", { method: "POST", credentials: "same-origin" }); } catch (e) {
      /* offline: the cookie expires by itself */
    }
    window.location.assign("/ui/signin");
  }

  function initSignIn() {
    const form = document.getElementById("signin-form");
    if (!form) return;
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      const value = document.getElementById("key").value.trim();
      const errorNode = document.getElementById("signin-error");
      errorNode.hidden = true;
      try {
        await api("/ui/signin", { method: "POST", json: { key: value }, noRedirect: true });
        setKey(value);
        window.location.assign(body.dataset.next || "/ui");
      } catch (err) {
        showError(errorNode, err);
      }
    });
  }

  document.addEventListener("DOMContentLoaded", () => {
    const out = document.getElementById("signout");
    if (out) out.addEventListener("click", signOut);
    if (body.dataset.page === "signin") initSignIn();
    if (authOn() && body.dataset.page !== "signin" && !key()) {
      flash("This browser has no API key stored for changes (submit, cancel, upload): sign out and in again.", "warn");
    }
  });

  return { api, ApiError, el, clear, fmt, isNum, badge, progressBar, flash, showError, opsOf,
    modelOf, modelLink, jobLink, lineageOf, renderLineage, TERMINAL, key, setKey, authOn };
})();
