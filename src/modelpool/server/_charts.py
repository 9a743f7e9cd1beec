"""The status page's charts: CSS and a small inline script that draws SVG from
``/status/history.json`` (no external assets: the page works offline)."""

from __future__ import annotations

__all__ = ["SCRIPT", "STYLE"]

STYLE = """
  .charts { display: grid; grid-template-columns: repeat(2, minmax(0, 1fr)); gap: .6rem 1rem;
            margin: .6rem 0 .8rem; max-width: 64rem; }
  @media (min-width: 1900px) {
    .charts { grid-template-columns: repeat(4, minmax(0, 1fr)); max-width: none; }
  }
  @media (max-width: 700px) { .charts { grid-template-columns: 1fr; } }
  .charts .empty { color: #666; font-style: italic; }
  svg.chart { width: 100%; height: auto; background: #fbfbfd; border: 1px solid #e3e3e8;
              border-radius: 4px; font: 11px system-ui, sans-serif; }
  svg.chart .title { font-weight: 600; fill: #1d1d1f; }
  svg.chart .axis { fill: #666; }
  svg.chart .grid { stroke: #e6e6ea; stroke-width: 1; }
  svg.chart .series { fill: none; stroke-width: 1.8; stroke-linejoin: round; }
  svg.chart .restart { stroke: #b00020; stroke-width: 1.2; stroke-dasharray: 3 2; }
  svg.chart .restart-mark { fill: #b00020; }
"""

# Plain JavaScript, no libraries. ``drawCharts(history)`` fills each model section's
# ``.charts`` with four SVGs: throughput, latency percentiles, queue, workers by state; every
# chart marks worker restarts with a dashed vertical line (its <title> says why).
SCRIPT = r"""
const SVG_W = 420, SVG_H = 170, PAD = {l: 42, r: 10, t: 34, b: 20};
const COLORS = {
  requests: "#2563eb", errors: "#dc2626", p50: "#16a34a", p90: "#d97706", p99: "#c026d3",
  queued: "#7c3aed", in_flight: "#0891b2", busy: "#f59e0b", idle: "#22c55e",
  starting: "#3b82f6", retiring: "#a855f7", stopping: "#6b7280", restarting: "#ef4444",
  failed: "#7f1d1d", stopped: "#9ca3af",
};
function color(key, i) {
  return COLORS[key] || ["#0ea5e9", "#84cc16", "#f43f5e", "#64748b"][i % 4];
}
function niceMax(v) {
  if (!(v > 0)) return 1;
  const p = Math.pow(10, Math.floor(Math.log10(v)));
  for (const k of [1, 2, 2.5, 5, 10]) if (k * p >= v) return k * p;
  return 10 * p;
}
function num(v) {
  if (v === null || v === undefined) return "\u2013";
  const a = Math.abs(v);
  if (a >= 1e4) return (v / 1e3).toFixed(0) + "k";
  if (a >= 1e3) return (v / 1e3).toFixed(1) + "k";
  if (a >= 100 || Number.isInteger(v)) return v.toFixed(0);
  if (a >= 10) return v.toFixed(1);
  return v.toFixed(2);
}
function ago(s) {
  if (s <= 0) return "now";
  return s % 60 ? "-" + s + "s" : "-" + s / 60 + "m";
}
// One chart as SVG text. spec: {name, title, unit, t, t0, t1, series: [{key, label, values}],
// stacked, integer, restarts: [{t, count, reasons}]}
function chartSVG(spec) {
  const w = SVG_W - PAD.l - PAD.r, h = SVG_H - PAD.t - PAD.b;
  const span = Math.max(spec.t1 - spec.t0, 1e-6);
  const x = t => PAD.l + (t - spec.t0) / span * w;
  const n = spec.t.length;
  let top = 0;
  if (spec.stacked) {
    for (let i = 0; i < n; i++) {
      let sum = 0;
      for (const s of spec.series) sum += s.values[i] || 0;
      top = Math.max(top, sum);
    }
  } else {
    for (const s of spec.series) for (const v of s.values) if (v !== null) top = Math.max(top, v);
  }
  const ymax = spec.integer ? Math.max(1, Math.ceil(niceMax(top))) : niceMax(top * 1.05);
  const y = v => PAD.t + h - v / ymax * h;
  const out = [];
  out.push('<svg class="chart" data-chart="' + spec.name + '" viewBox="0 0 ' + SVG_W + " " +
           SVG_H + '" role="img" aria-label="' + esc(spec.title) + '">');
  out.push('<text class="title" x="' + PAD.l + '" y="13">' + esc(spec.title) + "</text>");
  // legend, with the latest value of each series
  let lx = PAD.l;
  spec.series.forEach((s, i) => {
    let last = null;
    for (let j = n - 1; j >= 0 && last === null; j--) last = s.values[j];
    const label = s.label + " " + num(last) + (last === null ? "" : spec.unit || "");
    out.push('<rect x="' + lx + '" y="20" width="9" height="9" fill="' + color(s.key, i) + '"/>' +
             '<text class="legend" data-series="' + s.key + '" x="' + (lx + 12) + '" y="28">' +
             esc(label) + "</text>");
    lx += 22 + label.length * 5.6;
  });
  // horizontal grid and y labels
  const ticks = spec.integer && ymax <= 4 ? ymax : 4;
  for (let k = 0; k <= ticks; k++) {
    const v = ymax * k / ticks, yy = y(v).toFixed(1);
    out.push('<line class="grid" x1="' + PAD.l + '" x2="' + (PAD.l + w) + '" y1="' + yy +
             '" y2="' + yy + '"/><text class="axis" x="' + (PAD.l - 4) + '" y="' + yy +
             '" dy="3.5" text-anchor="end">' + num(v) + "</text>");
  }
  // time axis: seconds before the newest sample
  const step = [10, 30, 60, 120, 300, 600].find(s => span / s <= 6) || 600;
  for (let s = 0; s <= span + 1e-6; s += step) {
    const xx = x(spec.t1 - s);
    out.push('<text class="axis" x="' + xx.toFixed(1) + '" y="' + (SVG_H - 6) +
             '" text-anchor="' + (s === 0 ? "end" : "middle") + '">' + ago(s) + "</text>");
  }
  if (!n) {
    out.push('<text class="axis" x="' + (PAD.l + w / 2) + '" y="' + (PAD.t + h / 2) +
             '" text-anchor="middle">collecting\u2026</text>');
  } else if (spec.stacked) {
    // counts hold until the next sample: steps, not slopes
    const base = new Array(n).fill(0);
    const xs = spec.t.map(x), xe = j => (j + 1 < n ? xs[j + 1] : xs[j]).toFixed(1);
    spec.series.forEach((s, i) => {
      const upper = base.map((b, j) => b + (s.values[j] || 0));
      const pts = [];
      for (let j = 0; j < n; j++) {
        const yy = y(upper[j]).toFixed(1);
        pts.push(xs[j].toFixed(1) + "," + yy, xe(j) + "," + yy);
      }
      for (let j = n - 1; j >= 0; j--) {
        const yy = y(base[j]).toFixed(1);
        pts.push(xe(j) + "," + yy, xs[j].toFixed(1) + "," + yy);
      }
      out.push('<path class="area" data-series="' + s.key + '" fill="' + color(s.key, i) +
               '" fill-opacity="0.8" stroke="none" d="M' + pts.join("L") + 'Z"/>');
      for (let j = 0; j < n; j++) base[j] = upper[j];
    });
  } else {
    spec.series.forEach((s, i) => {
      let d = "", pen = false;
      for (let j = 0; j < n; j++) {
        const v = s.values[j];
        if (v === null || v === undefined) { pen = false; continue; }  // a gap: no answers
        d += (pen ? "L" : "M") + x(spec.t[j]).toFixed(1) + "," + y(v).toFixed(1);
        pen = true;
      }
      out.push('<path class="series" data-series="' + s.key + '" stroke="' + color(s.key, i) +
               '" d="' + d + '"/>');
    });
  }
  for (const r of spec.restarts) {
    if (r.t < spec.t0) continue;
    const xx = x(r.t).toFixed(1);
    const why = Object.entries(r.reasons)
      .map(([k, v]) => k + (v > 1 ? " \u00d7" + v : "")).join(", ");
    const tip = "worker restart at " + new Date(r.t * 1000).toLocaleTimeString() + ": " + why;
    out.push('<g class="restart-marker"><title>' + esc(tip) + '</title><line class="restart" x1="' +
             xx + '" x2="' + xx + '" y1="' + PAD.t + '" y2="' + (PAD.t + h) + '"/>' +
             '<path class="restart-mark" d="M' + xx + "," + (PAD.t + 5) + "l-4,-6h8z" + '"/></g>');
  }
  out.push("</svg>");
  return out.join("");
}
function modelCharts(m, history) {
  const t1 = history.now, first = m.t.length ? m.t[0] : t1;
  const t0 = Math.max(t1 - history.window_s, Math.min(first, t1 - 60));
  const common = {t: m.t, t0: t0, t1: t1, restarts: m.restarts};
  const states = Object.keys(m.workers);
  return [
    chartSVG({...common, name: "throughput", title: "Requests per second", unit: "/s",
              series: [{key: "requests", label: "requests", values: m.requests_per_s},
                       {key: "errors", label: "errors", values: m.errors_per_s}]}),
    chartSVG({...common, name: "latency", title: "Latency (ms, answered in each second)",
              unit: " ms", series: ["p50", "p90", "p99"].map(
                q => ({key: q, label: q, values: m.latency_ms[q]}))}),
    chartSVG({...common, name: "queue", title: "Queue depth and requests in flight",
              integer: true,
              series: [{key: "queued", label: "queued", values: m.queued},
                       {key: "in_flight", label: "in flight", values: m.in_flight}]}),
    chartSVG({...common, name: "workers",
              title: "Workers by state" + (m.restarts.length ? " (dashed: restarts)" : ""),
              integer: true, stacked: true,
              series: states.map(s => ({key: s, label: s, values: m.workers[s]}))}),
  ].join("");
}
function drawCharts(history) {
  for (const m of history.models) {
    modelSection(m.name).querySelector(".charts").innerHTML = modelCharts(m, history);
  }
}
"""
