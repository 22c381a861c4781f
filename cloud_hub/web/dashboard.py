"""The live dashboard of ``cloud-hub serve --http HOST:PORT``: ``/`` (one HTML page, no build step),
``/api/fleet`` (the JSON it polls every 2 s), each device's page ``/devices/<id>`` (and its JSON,
``/api/devices/<id>``: :mod:`cloud_hub.web.device_page`) and ``/metrics`` (Prometheus) on one threaded server.

The page shows the fleet table (device, online, model version, outbox depth, last seen, accuracy or
error, results), results per minute and accuracy per minute over the last 30 minutes as SVG plots,
the rollouts with the open canary's verdict, the dead letters, and each device's drift (flagged above
``edge_agent.drift.DRIFTING``). The per-minute plots count minutes of the hub's clock (``received_at``, when
it stored a result), as the page says: a device's own window times would put an outbox that drains after an
hour offline an hour back, off the 30-minute plot. Who may see it, and the server itself: :mod:`cloud_hub.web.http_door`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import orjson

from cloud_hub.data import sessions
from cloud_hub.data.aggregate import dashboard_view
from cloud_hub.web import device_page
from cloud_hub.web.http_door import WSGIApp, error_answer
from edge_agent.drift import DRIFTING

if TYPE_CHECKING:
    from cloud_hub.data.ingest import Hub


def snapshot(hub: Hub) -> dict[str, Any]:
    """What the page shows, from the database (and the worker's backlog)."""
    from cloud_hub.data.store import Store
    from cloud_hub.rollout import canary
    from cloud_hub.rounds.store import RoundStore
    from cloud_hub.rounds.store import views as round_views

    store = Store(hub.engine)
    name = hub.settings.model_name
    with sessions.transaction(hub.engine, write=False) as conn:
        view = dashboard_view(conn, time.time())
        rollouts = store.rollouts(conn, name)[:5]
        events = store.events(conn, 10)
        rounds = round_views(conn, name, [r.id for r in RoundStore().rounds(conn, name, limit=5)])
    verdict = canary.judge(hub.engine, rollouts[0], hub.settings) if rollouts and rollouts[0].state == "canary" else None
    return {**view, "backlog": hub.backlog, "model": name, "events": events,
            "limited": {} if hub.admission is None else hub.admission.limiter.most_dropped(10),
            "rollouts": [{"version": r.version, "previous_version": r.previous, "state": r.state,
                          "cohort": list(r.cohort), "started_at": r.started_at, "reason": r.reason} for r in rollouts],
            "verdict": None if verdict is None else verdict.to_obj(), "rounds": rounds,
            "canary_warning": canary.unsigned_promotion(hub.settings, rollouts[0]) if verdict is not None else None}


def app(metrics: WSGIApp, hub: Hub) -> WSGIApp:
    def route(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        if environ.get("REQUEST_METHOD") not in ("GET", "HEAD"):  # the door only shows: nothing to post
            start_response("405 Method Not Allowed", [("Content-Type", "text/plain"), ("Allow", "GET, HEAD")])
            return [b"method not allowed: GET or HEAD\n"]
        if path == "/metrics":
            return metrics(environ, start_response)
        if path in ("/", "/index.html"):
            start_response("200 OK", [("Content-Type", "text/html; charset=utf-8"), ("Cache-Control", "no-store")])
            return [PAGE.replace("%(drifting)s", repr(DRIFTING)).encode()]
        if path == "/api/fleet":
            try:
                body, status = orjson.dumps(snapshot(hub), option=orjson.OPT_NON_STR_KEYS), "200 OK"
            except Exception as exc:  # the database away for a moment: the page says so and polls again
                status, text = error_answer(exc)
                body = orjson.dumps({"error": text})
            start_response(status, [("Content-Type", "application/json"), ("Cache-Control", "no-store")])
            return [body]
        if path.startswith((device_page.PAGE_PREFIX, device_page.API_PREFIX)):
            return device_page.answer(hub, path, start_response)
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found: try / (the dashboard), /devices/<id>, /metrics or /api/fleet\n"]
    return route


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>edgeml fleet</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body { font: 14px system-ui, sans-serif; margin: 1.5em; color: #222; }
 h1 { font-size: 1.3em; margin: 0 0 .2em; } h2 { font-size: 1.05em; margin: 1.4em 0 .4em; }
 table { border-collapse: collapse; } th, td { padding: .25em .7em; border-bottom: 1px solid #ddd; text-align: right; }
 th:first-child, td:first-child { text-align: left; } .off { color: #999; } .bad { color: #b00; }
 .plots { display: flex; gap: 2em; flex-wrap: wrap; } svg { background: #fafafa; border: 1px solid #eee; }
 #status, .note { color: #666; }
</style></head>
<body>
<h1>edgeml fleet</h1>
<div id="status">loading…</div>
<h2>devices</h2>
<table id="devices"><thead><tr><th>device</th><th>state</th><th>model</th><th>outbox</th><th>last seen</th>
<th>accuracy / error (1 h)</th><th>results</th><th>drift (PSI)</th></tr></thead><tbody></tbody></table>
<div class="plots">
 <div><h2>results per minute (hub clock, 30 min)</h2><svg id="rate" width="420" height="140"></svg></div>
 <div><h2>accuracy per minute (hub clock)</h2><svg id="acc" width="420" height="140"></svg></div>
</div>
<p class="note" id="clock">Both plots count minutes of the hub's clock: when it stored each result (<code>received_at</code>),
not the device's timestamp of the window. A device that was offline shows up in the minutes its outbox drained;
<code>cloud-hub stats --bucket minute</code> buckets by the devices' clocks (the window's start).</p>
<h2>rollouts</h2><div id="rollouts"></div><div id="verdict"></div>
<h2>federated rounds</h2><div id="rounds"></div>
<h2>dead letters</h2><div id="dead"></div>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
const DRIFTING = %(drifting)s;
const esc = (s) => String(s ?? "-").replace(/[\\u0000-\\u001f\\u007f-\\u009f\\u061c\\u200e\\u200f\\u202a-\\u202e\\u2066-\\u2069]/g,
  (c) => c.charCodeAt(0) < 256 ? "\\\\x" + c.charCodeAt(0).toString(16).padStart(2, "0")
    : "\\\\u" + c.charCodeAt(0).toString(16).padStart(4, "0")).replace(/[&<>"]/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"}[c]));
const ago = (t) => t == null ? "-" : Math.max(0, Math.round(Date.now() / 1000 - t)) + " s ago";
const pct = (x) => x == null ? "-" : (100 * x).toFixed(1) + "%";
const num = (x) => x == null ? "-" : x.toFixed(2);
function plot(svg, points, max, fmt) {
  const w = svg.width.baseVal.value, h = svg.height.baseVal.value, pad = 28;
  if (!points.length) { svg.innerHTML = '<text x="10" y="20" fill="#999">no data yet</text>'; return; }
  const t0 = points[0][0], t1 = Math.max(points[points.length - 1][0], t0 + 60);
  const x = (t) => pad + (w - 2 * pad) * (t - t0) / (t1 - t0), y = (v) => h - pad - (h - 2 * pad) * v / (max || 1);
  const d = points.map((p, i) => (i ? "L" : "M") + x(p[0]).toFixed(1) + " " + y(p[1]).toFixed(1)).join(" ");
  const dots = points.map((p) => '<circle cx="' + x(p[0]).toFixed(1) + '" cy="' + y(p[1]).toFixed(1) + '" r="3" fill="#2a6fdb"/>').join("");
  svg.innerHTML = '<path d="' + d + '" fill="none" stroke="#2a6fdb" stroke-width="2"/>' + dots +
    '<text x="4" y="14" fill="#666">' + fmt(max) + '</text><text x="4" y="' + (h - 8) + '" fill="#666">0</text>';
}
function render(f) {
  const rows = f.devices.map((d) => "<tr class=\\"" + (d.state === "online" ? "" : "off") + "\\" data-device=\\"" + esc(d.device_id) + "\\">" +
    "<td><a href=\\"/devices/" + encodeURIComponent(d.device_id) + "\\">" + esc(d.device_id) + "</a></td><td>" + esc(d.state) + "</td><td>" + (d.model_version == null ? "-" : "v" + d.model_version) +
    "</td><td>" + esc(d.outbox_depth) + "</td><td>" + ago(d.last_seen) + "</td><td>" +
    (d.error ? num(d.error.median) + " (median)" : pct(d.accuracy)) + "</td><td class=\\"results\\">" + d.results +
    "</td><td class=\\"" + (d.drift_psi > DRIFTING ? "bad" : "") + "\\">" + (d.drift_psi == null ? "-" :
    d.drift_psi.toFixed(2) + (d.drift_psi > DRIFTING ? " drifting" : "")) + "</td></tr>");
  $("devices").tBodies[0].innerHTML = rows.join("");
  const rate = f.minutes.map((m) => [m.start, m.results]);
  plot($("rate"), rate, Math.max(1, ...rate.map((p) => p[1])), (v) => v + "/min");
  plot($("acc"), f.minutes.filter((m) => m.accuracy != null).map((m) => [m.start, m.accuracy]), 1, pct);
  $("rollouts").innerHTML = f.rollouts.length ? "<table><tr><th>version</th><th>state</th><th>cohort</th><th>why</th></tr>" +
    f.rollouts.map((r) => "<tr><td>v" + r.version + " (from v" + esc(r.previous_version) + ")</td><td class=\\"" +
      (r.state === "rolled_back" ? "bad" : "") + "\\">" + esc(r.state) + "</td><td>" + esc(r.cohort.join(", ")) +
      "</td><td>" + esc(r.reason || (f.verdict && r.state === "canary" ? f.verdict.reason : "")) + "</td></tr>").join("") + "</table>"
    : "no canary rollout yet";
  const v = f.verdict;
  $("verdict").innerHTML = v ? "<p>open canary: <b>" + esc(v.action) + "</b> · " + esc(v.reason) + "<br>to decide: " +
    esc(v.deciding) + (v.class_shift == null ? "" : "<br>predicted classes shifted " + pct(v.class_shift) + " from the cohort's history") +
    (f.canary_warning ? '<br><span class="bad">' + esc(f.canary_warning) + "</span>" : "") + "</p>" : "";
  const score = (r, x) => x == null ? "-" : r.task === "classification" ? pct(x) : num(x);
  $("rounds").innerHTML = f.rounds.length ? "<table><tr><th>round</th><th>base</th><th>state</th><th>accepted / late / refused (secure: the devices in the sum the hub saw)</th>" +
    "<th>upload</th><th>devices before → after</th><th>hold-out before → after</th><th>epsilon: round / model</th></tr>" +
    f.rounds.map((r) => "<tr data-round=\\"" + r.round + "\\"><td>" + r.round + "</td><td>v" + r.base_version + "</td><td class=\\"" +
      (r.state === "failed" || r.state === "rejected" ? "bad" : "") + "\\">" + esc(r.state) + (r.new_version ? " v" + r.new_version : "") +
      "</td><td>" + (r.secure ? "secure: " + (r.summed == null ? r.masked : r.summed) + " in the sum"
                              : r.accepted + " / " + r.late + " / " + r.refused) + "</td><td>" + Math.round(r.upload_bytes / 1024) +
      " kB</td><td>" + score(r, r.device_metric_before) + " → " + score(r, r.device_metric_after) + "</td><td>" +
      score(r, r.holdout_before) + " → " + score(r, r.holdout_after) + "</td><td>" +
      (r.epsilon == null ? (r.dp ? esc(r.dp) + ": none spent" : "-")
                         : esc(r.dp) + " " + r.epsilon.toPrecision(3) + " / " + r.epsilon_total.toPrecision(3) +
                           " (δ " + r.dp_delta + ")") + "</td></tr>").join("") + "</table>"
    : "no federated round yet (cloud-hub federate)";
  $("dead").innerHTML = f.dead_letters.count + " refused messages" + (f.dead_letters.latest.length ? ": " +
    f.dead_letters.latest.map((d) => esc(d.reason)).join("; ") : "") +
    (Object.keys(f.limited).length ? "<br>over their limit (messages dropped since serve started): " +
      Object.entries(f.limited).map(([d, n]) => "<b>" + esc(d) + "</b> " + n).join(", ") : "");
  $("status").textContent = f.devices.length + " devices, " + f.results + " results, backlog " + f.backlog +
    " · updated " + new Date().toLocaleTimeString();
}
async function poll() {
  try {
    // from the origin: a page opened as http://user:token@host/ makes a relative URL carry them, which fetch refuses
    const r = await fetch(new URL("/api/fleet", location.origin), {cache: "no-store"});
    const f = r.status === 401 ? null : await r.json();
    if (f === null) { $("status").textContent = "not authorized (the hub's token changed?): reload the page"; }
    else if (f.error) { $("status").textContent = f.error; } else { render(f); }
  } catch (e) { $("status").textContent = "hub unreachable: " + e; }
  setTimeout(poll, 2000);
}
poll();
</script>
</body></html>
"""
