"""The live status page (``GET /``) and the JSON it polls (``GET /status.json``; the charts'
history, ``GET /status/history.json``, is ``_history``'s)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from modelpool import __version__
from modelpool.config import version_order as _order

from . import _charts
from ._shared import worker_json

if TYPE_CHECKING:
    from ._served import ServedModel
    from ._shared import MergedModel

__all__ = ["PAGE", "snapshot"]

_STARTED = time.time()


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def snapshot(
    served_models: Mapping[str, ServedModel | MergedModel],
    window: float,
    accepting: bool,
    load_errors: Mapping[str, str] | None = None,
    other_versions: Mapping[str, Mapping[str, ServedModel | MergedModel]] | None = None,
) -> dict[str, Any]:
    """Everything the page shows, in one JSON object: the server's models (each model's
    default version; with several front processes, merged over them: each worker names its
    ``front``), its readiness ``window`` (seconds), whether it is ``accepting`` requests, why
    a model's last (re)load failed while its old pool serves on (``load_errors``), and the
    versions served beside each default one (``other_versions``: name -> version -> model),
    under their model's ``other_versions``."""
    load_errors = load_errors or {}
    other_versions = other_versions or {}
    models = []
    for name, served in served_models.items():
        model = {"name": name} | _model(served, window)
        model["last_load_error"] = load_errors.get(name)
        others = other_versions.get(name, {})
        model["other_versions"] = [_model(others[v], window) for v in sorted(others, key=_order)]
        models.append(model)
    return {
        "server": {"version": __version__, "uptime_s": time.time() - _STARTED},
        "accepting": accepting,
        "models": models,
    }


def _model(served: ServedModel | MergedModel, window: float) -> dict[str, Any]:
    """One version of a model: its readiness, queue, latency and workers."""
    stats = served.pool.stats()
    ready, why = served.readiness(window, stats)
    recent = list(served.recent)[-500:]
    return {
        "version": served.version,
        "model": served.settings.model,
        "ready": ready,
        "why_not_ready": why,
        "queued": stats["queued"],
        "in_flight": stats["in_flight"],
        "workers": [worker_json(w, getattr(w, "front", 0)) for w in stats["workers"]],
        "latency_ms": {
            "count": len(recent),
            "p50": _ms(statistics.median(recent) if recent else None),
            "p99": _ms(_percentile(recent, 0.99)),
        },
        "exit_reasons": stats["exit_reasons"],
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1e3, 3)


PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>modelpool status</title>
<style>
  body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5rem; color: #1d1d1f; }
  h1 { font-size: 1.3rem; margin: 0 0 .25rem; }
  h2 { font-size: 1.05rem; margin: 1.5rem 0 .4rem; }
  .meta { color: #666; }
  table { border-collapse: collapse; min-width: 40rem; }
  th, td { text-align: left; padding: .25rem .7rem; border-bottom: 1px solid #ddd; }
  td.n { text-align: right; font-variant-numeric: tabular-nums; }
  .ready { color: #0a7d28; font-weight: 600; }
  .down { color: #b00020; font-weight: 600; }
  .busy { color: #9a6700; }
  #error { color: #b00020; }
  #account form { display: inline; }
  #account button { font: inherit; margin-left: .4rem; cursor: pointer; }
/*CHARTS-STYLE*/</style>
</head>
<body>
<h1>modelpool</h1>
<div class="meta">updated <span id="updated">never</span> <span id="error"></span>
<span id="account"></span></div>
<div id="models"></div>
<div id="keys"></div>
<script>
"use strict";
function esc(value) {
  const d = document.createElement("div");
  d.textContent = value === null || value === undefined ? "" : String(value);
  return d.innerHTML.replace(/"/g, "&quot;");
}
function mib(bytes) { return bytes ? (bytes / 1048576).toFixed(1) + " MiB" : ""; }
function sec(s) { return s === null || s === undefined ? "" : s.toFixed(2) + " s"; }
function ms(v) { return v === null || v === undefined ? "n/a" : v.toFixed(2) + " ms"; }
// One section per model, kept across updates: its head and table are redrawn from
// status.json, its charts from status/history.json.
function modelSection(name) {
  const container = document.getElementById("models");
  for (const s of container.children) if (s.dataset.model === name) return s;
  const s = document.createElement("section");
  s.className = "model";
  s.dataset.model = name;
  s.innerHTML = '<div class="head"></div><div class="charts"></div><div class="workers"></div>';
  container.appendChild(s);
  return s;
}
function render(data) {
  const names = new Set(data.models.map(m => m.name));
  for (const s of Array.from(document.getElementById("models").children)) {
    if (!names.has(s.dataset.model)) s.remove();
  }
  for (const m of data.models) {
    const section = modelSection(m.name);
    const others = m.other_versions || [];
    section.querySelector(".head").innerHTML =
      "<h2>" + esc(m.name) + " <small>(" + esc(m.model) + ", version " + esc(m.version) +
      ((m.versions || []).length > 1 ? " of " + esc(m.versions.join(", ")) : "") +
      ")</small> " + readiness(m) +
      (m.last_load_error ? ' <span class="down">' + esc(m.last_load_error) + "</span>" : "") +
      "</h2>" + figures(m, others.length ? "default version " + esc(m.version) + ": " : "") +
      others.map(o => figures(o, "version " + esc(o.version) + " (" + esc(o.model) + "): " +
                              readiness(o) + " &middot; ")).join("");
    // with several versions, one table: a version column says whose worker each row is
    const all = [m].concat(others);
    const versionCell = v => others.length ? '<td class="version">' + esc(v.version) + "</td>" : "";
    section.querySelector(".workers").innerHTML =
      "<table><thead><tr>" + (others.length ? "<th>version</th>" : "") +
      "<th>worker</th><th>pid</th><th>state</th><th>served</th>" +
      "<th>restarts</th><th>RSS</th><th>current request age</th><th>last exit</th>" +
      "</tr></thead><tbody>" +
      all.map(v => v.workers.map(w =>
        '<tr class="worker">' + versionCell(v) + '<td class="n">' + w.index +
        '</td><td class="n pid">' +
        esc(w.pid) + '</td><td class="state ' + esc(w.state) + '">' + esc(w.state) +
        '</td><td class="n served">' + w.served + '</td><td class="n">' + w.restarts +
        '</td><td class="n">' + mib(w.rss) + '</td><td class="n">' + sec(w.busy_for) +
        "</td><td>" + esc(w.last_exit) + "</td></tr>").join("")).join("") +
      "</tbody></table>";
  }
}
function readiness(m) {
  return m.ready ? '<span class="ready">ready</span>'
                 : '<span class="down">not ready</span> ' + esc(m.why_not_ready);
}
// One version's queue and latency ("label": which version, when the model has several).
function figures(m, label) {
  return '<div class="figures">' + label +
    'queue depth <b class="queued">' + m.queued + "</b> &middot; in flight <b>" +
    m.in_flight + '</b> &middot; recent latency p50 <b class="p50">' +
    ms(m.latency_ms.p50) + "</b> p99 <b>" + ms(m.latency_ms.p99) + "</b> (" +
    m.latency_ms.count + " requests)</div>";
}
function when(t) { return t ? new Date(t * 1000).toLocaleString() : "never"; }
// With authentication on: who is signed in (a log-out form for a session) and the API keys
// they may see, with their usage.
function renderAccount(auth) {
  const account = document.getElementById("account");
  const keys = document.getElementById("keys");
  if (!auth || !auth.user) { account.innerHTML = ""; keys.innerHTML = ""; return; }
  let html = '&middot; signed in as <b class="user">' + esc(auth.user) + "</b> (" +
    esc(auth.role) + ")";
  if (auth.csrf) {
    html += '<form method="post" action="/auth/logout"><input type="hidden" name="csrf" value="' +
      esc(auth.csrf) + '"><button type="submit" id="logout">Log out</button></form>';
  }
  if (account.dataset.html !== html) { account.innerHTML = html; account.dataset.html = html; }
  if (auth.keys_error) { keys.innerHTML = "<h2>API keys</h2><p>" + esc(auth.keys_error); return; }
  keys.innerHTML = "<h2>API keys</h2><table><thead><tr><th>key</th><th>user</th>" +
    "<th>models</th><th>state</th><th>requests</th><th>rows</th><th>errors</th>" +
    "<th>last used</th></tr></thead><tbody>" +
    (auth.keys || []).map(k =>
      '<tr class="key"><td class="prefix">' + esc(k.prefix) + "</td><td>" + esc(k.user) +
      "</td><td>" + esc(k.models ? k.models.join(", ") : "all") + "</td><td>" +
      esc(k.state) + '</td><td class="n requests">' + k.requests + '</td><td class="n">' +
      k.rows + '</td><td class="n">' + k.errors + "</td><td>" + esc(when(k.last_used_at)) +
      "</td></tr>").join("") + "</tbody></table>";
}
/*CHARTS-SCRIPT*/
async function getJSON(url) {
  const response = await fetch(url, {cache: "no-store"});
  if (response.status === 401 && document.getElementById("account").dataset.html) {
    window.location = "/auth/login?next=/";  // the session ended: log in again
  }
  if (!response.ok) throw new Error(url + ": HTTP " + response.status);
  return response.json();
}
async function tick() {
  const [status, history] = await Promise.allSettled(
    [getJSON("status.json"), getJSON("status/history.json")]);
  if (status.status === "fulfilled") { render(status.value); renderAccount(status.value.auth); }
  if (history.status === "fulfilled") drawCharts(history.value);
  const failed = [status, history].find(r => r.status === "rejected");
  document.getElementById("error").textContent =
    failed ? "(server unreachable: " + failed.reason.message + ")" : "";
  if (!failed) document.getElementById("updated").textContent = new Date().toLocaleTimeString();
}
async function loop() {
  try { await tick(); } finally { setTimeout(loop, 1000); }
}
loop();
</script>
</body>
</html>
""".replace("/*CHARTS-STYLE*/", _charts.STYLE.lstrip("\n")).replace(
    "/*CHARTS-SCRIPT*/", _charts.SCRIPT.strip("\n")
)
