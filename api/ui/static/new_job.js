/* The new-job form: a JobSpec in a textarea, started from the API's example per op, checked as
 * you type against the JobSpec JSON schema (the model POST /v1/jobs validates with; rules that
 * span fields are the API's alone), then posted: a 422 {error, detail} shows next to the form,
 * a 202 opens the job's page. */
"use strict";

(() => {
  const { api, el, clear } = SL;
  const textarea = document.getElementById("spec");
  const templateSelect = document.getElementById("template");
  const modelSelect = document.getElementById("model");
  const datasetSelect = document.getElementById("dataset");
  const status = document.getElementById("spec-status");
  const errorsNode = document.getElementById("spec-errors");
  const query = new URLSearchParams(window.location.search);
  let schema = null;
  let templates = {};
  let checkTimer = null;

  /* ---- a small JSON Schema checker: the keywords pydantic's JobSpec schema uses ---- */
  const typeOf = (v) => (v === null ? "null" : Array.isArray(v) ? "array"
    : Number.isInteger(v) ? "integer" : typeof v);

  function resolve(node) {
    let n = node;
    let guard = 0;
    while (n && n.$ref && guard++ < 32) {
      const path = n.$ref.replace(/^#\//, "").split("/");
      n = path.reduce((acc, part) => (acc ? acc[part] : undefined), schema);
    }
    return n || {};
  }

  function check(value, node, path, errors) {
    const s = resolve(node);
    const where = path || "spec";
    if (s.anyOf || s.oneOf) {
      const branches = s.anyOf || s.oneOf;
      if (s.discriminator && value && typeof value === "object" && !Array.isArray(value)) {
        const prop = s.discriminator.propertyName;
        const tag = value[prop];
        const mapping = s.discriminator.mapping || {};
        const target = mapping[tag] ? { $ref: mapping[tag] }
          : branches.find((b) => (resolve(b).properties || {})[prop] && resolve(b).properties[prop].const === tag);
        if (!target) {
          const tags = Object.keys(mapping).length ? Object.keys(mapping)
            : branches.map((b) => ((resolve(b).properties || {})[prop] || {}).const).filter(Boolean);
          errors.push(`${where}.${prop}: must be one of ${tags.join(", ")}`);
          return;
        }
        check(value, target, path, errors);
        return;
      }
      let best = null;
      for (const b of branches) {
        const errs = [];
        check(value, b, path, errs);
        if (!errs.length) { best = null; break; }
        if (!best || errs.length < best.length) best = errs;
      }
      if (best) errors.push(...best);
      return;
    }
    if (s.const !== undefined && value !== s.const) {
      errors.push(`${where}: must be ${JSON.stringify(s.const)}`);
      return;
    }
    if (s.enum && !s.enum.some((e) => e === value)) {
      errors.push(`${where}: must be one of ${s.enum.map((e) => JSON.stringify(e)).join(", ")}`);
      return;
    }
    if (s.type) {
      const types = Array.isArray(s.type) ? s.type : [s.type];
      const t = typeOf(value);
      const ok = types.some((ty) => ty === t || (ty === "number" && t === "integer"));
      if (!ok) { errors.push(`${where}: must be ${types.join(" or ")}, got ${t}`); return; }
    }
    if (typeof value === "number") {
      if (s.minimum !== undefined && value < s.minimum) errors.push(`${where}: must be ≥ ${s.minimum}`);
      if (s.maximum !== undefined && value > s.maximum) errors.push(`${where}: must be ≤ ${s.maximum}`);
      if (s.exclusiveMinimum !== undefined && value <= s.exclusiveMinimum) errors.push(`${where}: must be > ${s.exclusiveMinimum}`);
      if (s.exclusiveMaximum !== undefined && value >= s.exclusiveMaximum) errors.push(`${where}: must be < ${s.exclusiveMaximum}`);
    }
    if (typeof value === "string") {
      if (s.minLength !== undefined && value.length < s.minLength) errors.push(`${where}: at least ${s.minLength} characters`);
      if (s.maxLength !== undefined && value.length > s.maxLength) errors.push(`${where}: at most ${s.maxLength} characters`);
      if (s.pattern && !(new RegExp(s.pattern, "u")).test(value)) errors.push(`${where}: must match ${s.pattern}`);
    }
    if (Array.isArray(value)) {
      if (s.minItems !== undefined && value.length < s.minItems) errors.push(`${where}: at least ${s.minItems} items`);
      if (s.maxItems !== undefined && value.length > s.maxItems) errors.push(`${where}: at most ${s.maxItems} items`);
      if (s.items) value.forEach((item, i) => check(item, s.items, `${where}[${i}]`, errors));
    } else if (value && typeof value === "object") {
      const props = s.properties || {};
      for (const req of s.required || []) {
        if (!(req in value)) errors.push(`${where}.${req}: required`);
      }
      const keys = Object.keys(value);
      if (s.minProperties !== undefined && keys.length < s.minProperties) errors.push(`${where}: at least ${s.minProperties} entries`);
      if (s.maxProperties !== undefined && keys.length > s.maxProperties) errors.push(`${where}: at most ${s.maxProperties} entries`);
      for (const k of keys) {
        const sub = path ? `${path}.${k}` : k;
        if (props[k]) check(value[k], props[k], sub, errors);
        else if (s.additionalProperties === false) errors.push(`${sub}: unknown field (not allowed here)`);
        else if (s.additionalProperties && typeof s.additionalProperties === "object") check(value[k], s.additionalProperties, sub, errors);
        if (s.propertyNames) check(k, s.propertyNames, `${sub} (name)`, errors);
      }
    }
  }

  function validate(value) {
    const errors = [];
    if (schema) check(value, schema, "", errors);
    return errors;
  }

  /* ---- the editor ---- */
  function parse() {
    try { return { value: JSON.parse(textarea.value) }; } catch (e) { return { error: e.message }; }
  }

  function showCheck() {
    const parsed = parse();
    clear(errorsNode);
    errorsNode.hidden = true;
    if (parsed.error) {
      status.textContent = `not JSON: ${parsed.error}`;
      status.className = "error";
      return;
    }
    const errors = validate(parsed.value);
    if (errors.length) {
      status.textContent = `${errors.length} schema problem(s):`;
      status.className = "error";
      errorsNode.hidden = false;
      errorsNode.append(el("ul", { class: "schema-errors" }, ...errors.slice(0, 20).map((e) => el("li", { text: e }))));
    } else {
      status.textContent = "valid against the JobSpec schema (the API checks the rest on submit)";
      status.className = "ok";
    }
  }

  function write(value) {
    textarea.value = JSON.stringify(value, null, 2);
    showCheck();
  }

  function withChoices(value) {
    const out = { ...value };
    if (modelSelect.value) out.model = modelSelect.value;
    if (datasetSelect.value) out.dataset = datasetSelect.value;
    return out;
  }

  function applyTemplate() {
    const t = templates[templateSelect.value];
    if (t) write(withChoices(JSON.parse(JSON.stringify(t.value))));
  }

  function applyChoice() {
    const parsed = parse();
    if (parsed.value && typeof parsed.value === "object") write(withChoices(parsed.value));
    else applyTemplate();
  }

  templateSelect.addEventListener("change", applyTemplate);
  modelSelect.addEventListener("change", applyChoice);
  datasetSelect.addEventListener("change", applyChoice);
  textarea.addEventListener("input", () => { clearTimeout(checkTimer); checkTimer = setTimeout(showCheck, 250); });

  document.getElementById("job-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const parsed = parse();
    if (parsed.error) { showCheck(); return; }
    const button = document.getElementById("submit-job");
    button.disabled = true;
    try {
      const job = await api("/v1/jobs", { method: "POST", json: parsed.value });
      window.location.assign(`/ui/jobs/${encodeURIComponent(job.id)}`);
    } catch (err) {
      status.textContent = `the API refused the job (${err.status}):`;
      status.className = "error";
      errorsNode.hidden = false;
      clear(errorsNode).append(el("p", { class: "api-error" }, el("strong", { text: err.error }), ": ", err.detail));
    } finally {
      button.disabled = false;
    }
  });

  (async () => {
    const [spec, models, datasets] = await Promise.all([
      api("/ui/jobspec.json"),
      api("/v1/models").catch(() => ({ items: [] })),
      api("/v1/datasets").catch(() => ({ items: [] })),
    ]);
    schema = spec.schema;
    templates = spec.templates;
    for (const [op, t] of Object.entries(templates)) templateSelect.append(el("option", { value: op, text: t.summary || op }));
    for (const m of models.items) {
      modelSelect.append(el("option", { value: m.id, text: `${m.name} (${(m.arch || {}).name || "?"}, ${SL.fmt.int((m.params || {}).total)} params) ${SL.fmt.short(m.id)}` }));
    }
    datasetSelect.append(el("option", { value: "", text: "the template's" }));
    for (const d of datasets.items) datasetSelect.append(el("option", { value: d.id, text: d.builtin ? d.id : `${d.name} ${SL.fmt.short(d.id)}` }));
    if (query.get("model")) {
      if (![...modelSelect.options].some((o) => o.value === query.get("model"))) {
        modelSelect.append(el("option", { value: query.get("model"), text: query.get("model") }));
      }
      modelSelect.value = query.get("model");
    }
    if (query.get("op") && templates[query.get("op")]) templateSelect.value = query.get("op");
    if (query.get("from")) {
      try {
        const job = await api(`/v1/jobs/${encodeURIComponent(query.get("from"))}`);
        write(job.spec);
        return;
      } catch (err) { SL.flash(`Could not load job ${query.get("from")}: ${err.detail || err}`); }
    }
    applyTemplate();
  })();
})();
