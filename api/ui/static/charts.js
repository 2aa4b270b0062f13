/* slimline dashboard: small hand-written SVG charts (line, scatter with a Pareto set, bars).
 * Each chart is <figure class="chart" data-chart=NAME> holding one <svg>; a drawn series is
 * <path class="series"> (lines) or <circle class="point"> (markers), so tests can count them. */
"use strict";

const SLChart = (() => {
  const W = 460; const H = 280;
  const M = { top: 28, right: 14, bottom: 42, left: 62 };
  const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#ca8a04",
    "#db2777", "#4b5563", "#65a30d"];
  const isNum = (v) => typeof v === "number" && Number.isFinite(v);
  const el = (...args) => SL.el(...args);

  function niceStep(span, count) {
    const raw = span / Math.max(1, count);
    const mag = 10 ** Math.floor(Math.log10(raw));
    const norm = raw / mag;
    return (norm < 1.5 ? 1 : norm < 3 ? 2 : norm < 7 ? 5 : 10) * mag;
  }

  function linearTicks(lo, hi, count = 5) {
    if (lo === hi) { lo -= 1; hi += 1; }
    const step = niceStep(hi - lo, count);
    const ticks = [];
    for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) ticks.push(+t.toPrecision(12));
    return ticks;
  }

  function tickLabel(v) {
    const a = Math.abs(v);
    if (a !== 0 && (a >= 1e5 || a < 1e-3)) return v.toExponential(0);
    if (a >= 1e3) return `${+(v / 1e3).toPrecision(3)}k`;
    return String(+v.toPrecision(3));
  }

  function extent(values, log) {
    const vs = values.filter((v) => isNum(v) && (!log || v > 0));
    if (!vs.length) return null;
    let lo = Math.min(...vs); let hi = Math.max(...vs);
    if (log) { lo = Math.log10(lo); hi = Math.log10(hi); }
    if (lo === hi) { const pad = Math.abs(lo) * 0.1 || 1; lo -= pad; hi += pad; }
    const pad = (hi - lo) * 0.05;
    return [lo - pad, hi + pad];
  }

  function frame(container, name, title, opts) {
    const figure = el("figure", { class: "chart", "data-chart": name });
    const svg = el("svg", { viewBox: `0 0 ${W} ${H}`, width: W, height: H, role: "img",
      "aria-label": title });
    svg.append(el("text", { x: M.left, y: 16, class: "chart-title", text: title }));
    if (opts.xLabel) svg.append(el("text", { x: (M.left + W - M.right) / 2, y: H - 6, class: "axis-label", "text-anchor": "middle", text: opts.xLabel }));
    if (opts.yLabel) {
      svg.append(el("text", { x: 12, y: (M.top + H - M.bottom) / 2, class: "axis-label", "text-anchor": "middle",
        transform: `rotate(-90 12 ${(M.top + H - M.bottom) / 2})`, text: opts.yLabel }));
    }
    figure.append(svg);
    container.append(figure);
    return { figure, svg };
  }

  /* Scales and axes for x/y extents; returns {sx, sy} mapping data to pixels. */
  function axes(svg, xr, yr, opts) {
    const x0 = M.left; const x1 = W - M.right; const y0 = H - M.bottom; const y1 = M.top;
    const sx = (v) => x0 + ((opts.logX ? Math.log10(v) : v) - xr[0]) / (xr[1] - xr[0]) * (x1 - x0);
    const sy = (v) => y0 - ((opts.logY ? Math.log10(v) : v) - yr[0]) / (yr[1] - yr[0]) * (y0 - y1);
    const g = el("g", { class: "axes" });
    g.append(el("line", { x1: x0, y1: y0, x2: x1, y2: y0, class: "axis" }));
    g.append(el("line", { x1: x0, y1: y0, x2: x0, y2: y1, class: "axis" }));
    const xt = opts.categories ? [] : linearTicks(xr[0], xr[1], 5);
    for (const t of xt) {
      const v = opts.logX ? 10 ** t : t;
      const px = x0 + (t - xr[0]) / (xr[1] - xr[0]) * (x1 - x0);
      if (px < x0 - 0.5 || px > x1 + 0.5) continue;
      g.append(el("line", { x1: px, y1: y0, x2: px, y2: y0 + 4, class: "axis" }));
      g.append(el("text", { x: px, y: y0 + 16, "text-anchor": "middle", class: "tick", text: tickLabel(v) }));
    }
    for (const t of linearTicks(yr[0], yr[1], 5)) {
      const v = opts.logY ? 10 ** t : t;
      const py = y0 - (t - yr[0]) / (yr[1] - yr[0]) * (y0 - y1);
      if (py > y0 + 0.5 || py < y1 - 0.5) continue;
      g.append(el("line", { x1: x0, y1: py, x2: x1, y2: py, class: "grid" }));
      g.append(el("text", { x: x0 - 6, y: py + 4, "text-anchor": "end", class: "tick", text: tickLabel(v) }));
    }
    svg.append(g);
    return { sx, sy, x0, x1, y0, y1 };
  }

  function legend(figure, items) {
    if (items.length < 2 && !(items[0] && items[0].always)) return;
    const ul = el("ul", { class: "legend" });
    items.forEach((item) => {
      const swatch = el("span", { class: "swatch" });
      swatch.style.background = item.color;
      ul.append(el("li", {}, swatch, item.name));
    });
    figure.append(ul);
  }

  /* series: [{name, points: [[x, y], ...], dashed}] ; opts: {xLabel, yLabel, logY, hlines, vlines} */
  function line(container, name, title, series, opts = {}) {
    const usable = series.map((s) => ({ ...s, points: s.points.filter((p) => isNum(p[0]) && isNum(p[1]) && (!opts.logY || p[1] > 0)) }))
      .filter((s) => s.points.length);
    if (!usable.length) return null;
    const xs = usable.flatMap((s) => s.points.map((p) => p[0]));
    const ys = usable.flatMap((s) => s.points.map((p) => p[1])).concat((opts.hlines || []).map((h) => h.y));
    const xr = extent(xs, false); const yr = extent(ys, opts.logY);
    const { figure, svg } = frame(container, name, title, opts);
    const { sx, sy, x0, x1, y0, y1 } = axes(svg, xr, yr, opts);
    for (const h of opts.hlines || []) {
      if (!isNum(h.y) || (opts.logY && h.y <= 0)) continue;
      svg.append(el("line", { x1: x0, x2: x1, y1: sy(h.y), y2: sy(h.y), class: "refline" }, el("title", { text: h.name })));
    }
    for (const v of opts.vlines || []) {
      if (!isNum(v.x)) continue;
      svg.append(el("line", { x1: sx(v.x), x2: sx(v.x), y1: y0, y2: y1, class: "refline" }, el("title", { text: v.name })));
    }
    const items = [];
    usable.forEach((s, i) => {
      const color = s.color || COLORS[i % COLORS.length];
      const d = s.points.map((p, j) => `${j ? "L" : "M"}${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join("");
      svg.append(el("path", { d, class: `series${s.dashed ? " dashed" : ""}`, stroke: color, "data-points": s.points.length },
        el("title", { text: s.name })));
      if (s.points.length <= 40) {
        for (const p of s.points) {
          svg.append(el("circle", { cx: sx(p[0]).toFixed(1), cy: sy(p[1]).toFixed(1), r: 2.5, fill: color, class: "point" },
            el("title", { text: `${s.name}: ${p[0]}, ${+p[1].toPrecision(4)}` })));
        }
      }
      items.push({ name: s.name, color });
    });
    legend(figure, items);
    return figure;
  }

  /* points: [{x, y, label, pareto, href, kind}] ; the Pareto points are connected and marked. */
  function scatter(container, name, title, points, opts = {}) {
    const usable = points.filter((p) => isNum(p.x) && isNum(p.y) && (!opts.logX || p.x > 0));
    if (!usable.length) return null;
    const extraX = (opts.vlines || []).map((v) => v.x).filter(isNum);
    const xr = extent(usable.map((p) => p.x).concat(extraX), opts.logX);
    const yr = extent(usable.map((p) => p.y), false);
    const { figure, svg } = frame(container, name, title, opts);
    const { sx, sy, y0, y1 } = axes(svg, xr, yr, opts);
    for (const v of opts.vlines || []) {
      if (!isNum(v.x)) continue;
      svg.append(el("line", { x1: sx(v.x), x2: sx(v.x), y1: y0, y2: y1, class: "refline" }, el("title", { text: v.name })));
      svg.append(el("text", { x: sx(v.x) + 3, y: y1 + 10, class: "tick", text: v.name }));
    }
    const front = usable.filter((p) => p.pareto).sort((a, b) => a.x - b.x);
    if (front.length > 1) {
      const d = front.map((p, j) => `${j ? "L" : "M"}${sx(p.x).toFixed(1)},${sy(p.y).toFixed(1)}`).join("");
      svg.append(el("path", { d, class: "series pareto-line", stroke: COLORS[1], "data-points": front.length },
        el("title", { text: "Pareto set" })));
    }
    for (const p of usable) {
      const cls = `point${p.pareto ? " pareto" : ""}${p.kind ? ` ${p.kind}` : ""}`;
      const dot = p.kind === "baseline"
        ? el("rect", { x: sx(p.x) - 5, y: sy(p.y) - 5, width: 10, height: 10, class: cls })
        : el("circle", { cx: sx(p.x).toFixed(1), cy: sy(p.y).toFixed(1), r: p.pareto || p.kind === "winner" ? 6 : 4.5, class: cls,
          "data-label": p.label || "" });
      dot.append(el("title", { text: `${p.title || p.label || ""}: ${opts.xLabel || "x"} ${p.x}, ${opts.yLabel || "y"} ${+p.y.toPrecision(4)}${p.pareto ? " (Pareto)" : ""}` }));
      if (p.href) {
        const a = el("svg:a", { href: p.href });
        a.append(dot);
        svg.append(a);
      } else svg.append(dot);
      if (p.label && usable.length <= 40) {
        const right = sx(p.x) > (M.left + W - M.right) / 2;  // labels point inwards
        svg.append(el("text", { x: sx(p.x) + (right ? -7 : 7), y: sy(p.y) - 6, class: "point-label",
          "text-anchor": right ? "end" : "start", text: p.label }));
      }
    }
    legend(figure, [{ name: "Pareto set", color: COLORS[1], always: true }, { name: "other", color: "#6b7280" }]);
    return figure;
  }

  /* categories: [names]; series: [{name, values: [..per category..]}] -> grouped bars */
  function bars(container, name, title, categories, series, opts = {}) {
    const vals = series.flatMap((s) => s.values).filter(isNum);
    if (!categories.length || !vals.length) return null;
    const yr = [Math.min(0, ...vals), Math.max(...vals) * 1.08 || 1];
    const { figure, svg } = frame(container, name, title, opts);
    const { sy, x0, x1, y0 } = axes(svg, [0, 1], yr, { ...opts, categories: true });
    const band = (x1 - x0) / categories.length;
    const bw = Math.max(2, (band * 0.8) / series.length);
    const items = [];
    series.forEach((s, i) => {
      const color = s.color || COLORS[i % COLORS.length];
      const parts = [];
      categories.forEach((cat, j) => {
        const v = s.values[j];
        if (!isNum(v)) return;
        const x = x0 + band * j + band * 0.1 + bw * i;
        const top = sy(Math.max(v, 0)); const bottom = sy(Math.min(v, 0));
        parts.push(`M${x.toFixed(1)},${bottom.toFixed(1)}V${top.toFixed(1)}H${(x + bw).toFixed(1)}V${bottom.toFixed(1)}Z`);
      });
      svg.append(el("path", { d: parts.join(""), class: "series bars", fill: color, stroke: "none", "data-points": parts.length },
        el("title", { text: s.name })));
      items.push({ name: s.name, color });
    });
    categories.forEach((cat, j) => {
      const x = x0 + band * (j + 0.5);
      const label = String(cat).length > 14 ? `…${String(cat).slice(-13)}` : String(cat);
      svg.append(el("text", { x, y: y0 + 14, "text-anchor": "middle", class: "tick" }, label, el("title", { text: cat })));
    });
    legend(figure, items);
    return figure;
  }

  return { line, scatter, bars, COLORS };
})();
