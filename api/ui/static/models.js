/* The models page: the tenant's models with download links, and the upload form
 * (multipart POST /v1/models with the same fields as the API). */
"use strict";

(() => {
  const { api, el, clear, fmt } = SL;

  function downloads(id) {
    const enc = encodeURIComponent(id);
    return ["safetensors", "onnx", "pt2"].map((f) =>
      el("a", { href: `/v1/models/${enc}/file?format=${f}`, download: "", class: "small dl" }, f));
  }

  async function load() {
    let list;
    try { list = await api("/v1/models"); } catch (err) { SL.flash(`Could not list models: ${err.detail || err}`); return; }
    const tbody = clear(document.querySelector("#models-table tbody"));
    for (const m of list.items) {
      tbody.append(el("tr", { "data-model-id": m.id },
        el("td", {}, SL.modelLink(m.id)), el("td", { text: m.name }),
        el("td", { text: (m.arch || {}).name || "—" }), el("td", { text: m.format }),
        el("td", { class: "num", text: fmt.int((m.params || {}).total) }),
        el("td", { class: "num", text: fmt.bytes(m.size_bytes) }),
        el("td", {}, m.source_job_id ? SL.jobLink(m.source_job_id) : el("span", { class: "muted", text: "upload" })),
        el("td", { class: "small", text: fmt.time(m.created_at) }),
        el("td", { class: "downloads" }, ...downloads(m.id))));
    }
    document.getElementById("models-empty").hidden = list.items.length > 0;
  }

  const form = document.getElementById("upload-form");
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const errorNode = document.getElementById("upload-error");
    const status = document.getElementById("upload-status");
    const button = document.getElementById("upload-submit");
    errorNode.hidden = true;
    const data = new FormData();
    for (const [name, value] of new FormData(form).entries()) {
      if (value instanceof File ? value.size || value.name : String(value).trim()) data.append(name, value);
    }
    button.disabled = true;
    status.textContent = "uploading and validating…";
    try {
      const model = await api("/v1/models", { method: "POST", body: data });
      status.textContent = "";
      window.location.assign(`/ui/models/${encodeURIComponent(model.id)}`);
    } catch (err) {
      status.textContent = "";
      SL.showError(errorNode, err);
    } finally {
      button.disabled = false;
    }
  });
  load();
})();
