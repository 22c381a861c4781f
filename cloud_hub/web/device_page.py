"""One device's page on the live dashboard: ``/devices/<id>`` (HTML, drawn on the server, no script) and
``/api/devices/<id>`` (its JSON), linked from the fleet table.

It shows the model versions the device ran over time (runs of its stored results, by the hub's clock, with
the device's window times beside them), its class histogram (a regressor's: its values per output), and
the drift its last status reported. The data: :func:`cloud_hub.data.device_history.device_history`.

A path is hostile input: an id that is not a device id (the contract's rule) is a 404 without a query, an
unknown one a 404 naming it, and every text on the page is HTML-escaped.
"""

from __future__ import annotations

import html
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import orjson

from cloud_hub.data import sessions
from cloud_hub.data.device_history import device_history
from cloud_hub.data.summaries import shown, utc_text
from cloud_hub.web.http_door import error_answer
from edge_agent.contract import valid_id
from edge_agent.drift import DRIFTING

if TYPE_CHECKING:
    from cloud_hub.data.ingest import Hub

PAGE_PREFIX, API_PREFIX = "/devices/", "/api/devices/"
COLOURS = ("#2a6fdb", "#e07b00", "#2a9d4b", "#a23cc4", "#c4323c", "#3c9dc4")
StartResponse = Callable[..., Any]


def escape(text: str) -> str:
    """A device's text in HTML: its control characters written out as in the CLI (a right-to-left override
    shown as ``\\u202e``, not obeyed), then HTML's specials escaped."""
    return html.escape(shown(text))


def href(device_id: str) -> str:
    """The page of ``device_id``, as a link's target."""
    return PAGE_PREFIX + quote(device_id, safe="")


def answer(hub: Hub, path: str, start_response: StartResponse) -> Iterable[bytes]:
    """``/devices/<id>`` or ``/api/devices/<id>`` (``path`` is PATH_INFO: already percent-decoded)."""
    as_json = path.startswith(API_PREFIX)
    device_id = path[len(API_PREFIX if as_json else PAGE_PREFIX):]
    if not valid_id(device_id):
        return _missing(start_response, as_json, f"{device_id[:80]!r} is not a device id "
                        "(1-64 letters, digits and _ . : -)")
    try:
        with sessions.transaction(hub.engine, write=False) as conn:
            view = device_history(conn, device_id)
    except Exception as exc:  # the database away for a moment: say so, a reload tries again
        status, text = error_answer(exc)
        return _send(start_response, status, as_json, {"error": text}, f"<p>{escape(text)}</p>")
    if view is None:
        return _missing(start_response, as_json, f"no device {device_id!r} on this hub (it has neither sent a "
                        "status nor a result)")
    return _send(start_response, "200 OK", as_json, view, render(view, time.time()))


def _missing(start_response: StartResponse, as_json: bool, why: str) -> Iterable[bytes]:
    return _send(start_response, "404 Not Found", as_json, {"error": why}, f'<p class="bad">{escape(why)}</p>')


def _send(start_response: StartResponse, status: str, as_json: bool, obj: dict[str, Any],
          body: str) -> Iterable[bytes]:
    if as_json:
        start_response(status, [("Content-Type", "application/json"), ("Cache-Control", "no-store")])
        return [orjson.dumps(obj, option=orjson.OPT_NON_STR_KEYS)]
    title = escape(str(obj.get("device_id", "device")))
    start_response(status, [("Content-Type", "text/html; charset=utf-8"), ("Cache-Control", "no-store")])
    return [(HEAD % {"title": title} + '<p><a href="/">← the fleet</a></p>' + body + "</body></html>").encode()]


def when(t: float | None) -> str:
    return utc_text(t, " UTC")


def _num(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def render(view: dict[str, Any], now: float) -> str:
    """The page's body for :func:`device_history`'s ``view``."""
    s = view["status"] or {}
    name = escape(view["device_id"])
    head = (f"<h1>device {name}</h1><p id=\"summary\">{escape(str(s.get('state') or 'no status yet'))} · "
            f"reports model {escape(str(s.get('model_name') or '-'))} v{escape(str(s.get('model_version') or '-'))} · "
            f"outbox {escape(str(s.get('outbox_depth') if s.get('outbox_depth') is not None else '-'))} · "
            f"last heard {when(s.get('last_seen'))} (hub clock) · {view['results']} results stored"
            + (f"<br>last error: {escape(str(s['last_error']))}" if s.get("last_error") else "")
            + f"<br><small>as of {when(now)}; reload for newer</small></p>")
    return head + versions(view["runs"]) + histogram(view) + drift(view["drift"])


def versions(runs: list[dict[str, Any]]) -> str:
    """The versions it ran: a strip over the hub's clock, then one row per run."""
    out = ["<h2>model versions over time</h2>"]
    if not runs:
        return out[0] + '<p id="versions">no results stored yet</p>'
    t0, t1 = runs[0]["received"][0], max(r["received"][1] for r in runs)
    span, w, pad = max(t1 - t0, 1.0), 760, 10

    def x(t: float) -> float:
        return pad + (w - 2 * pad) * (t - t0) / span

    bars = "".join(
        f'<rect x="{x(r["received"][0]):.1f}" y="20" width="{max(3.0, x(r["received"][1]) - x(r["received"][0])):.1f}" '
        f'height="22" fill="{COLOURS[r["version"] % len(COLOURS)]}"><title>v{r["version"]}: {r["results"]} results'
        f'</title></rect><text x="{x(r["received"][0]):.1f}" y="14" font-size="11">v{r["version"]}</text>'
        for r in runs)
    out.append(f'<svg id="timeline" width="{w}" height="62">{bars}<text x="{pad}" y="58" font-size="10" fill="#666">'
               f'{when(t0)}</text><text x="{w - pad}" y="58" font-size="10" fill="#666" text-anchor="end">{when(t1)}'
               '</text></svg><p class="note">Each bar is a run of consecutive results (by seq) from one version, '
               "placed by the hub's clock: when it stored them.</p>")
    rows = "".join(
        f'<tr data-version="{r["version"]}"><td>v{r["version"]}</td><td>{r["results"]}</td>'
        f'<td>{r["seq"][0]} – {r["seq"][1]}</td><td>{when(r["received"][0])} → {when(r["received"][1])}</td>'
        f'<td>{when(r["start"][0])} → {when(r["start"][1])}</td>'
        f'<td>{_num(None if r["accuracy"] is None else 100 * r["accuracy"], ".1f")}'
        f'{"%" if r["accuracy"] is not None else ""}</td><td>{_num(r["mean_confidence"], ".2f")}</td></tr>'
        for r in runs)
    out.append('<table id="versions"><thead><tr><th>version</th><th>results</th><th>seq</th>'
               "<th>stored (hub clock)</th><th>windows (device clock)</th><th>accuracy</th><th>mean confidence</th>"
               f"</tr></thead><tbody>{rows}</tbody></table>")
    return "".join(out)


def histogram(view: dict[str, Any]) -> str:
    """The classes it predicted (all its results), or a regressor's values (its latest ones)."""
    classes: dict[str, int] = view["classes"]
    if classes:
        total, top = sum(classes.values()), max(classes.values())
        rows = "".join(
            f'<tr data-class="{escape(label)}"><td>{escape(label)}</td><td><svg width="300" height="14">'
            f'<rect width="{300 * n / top:.1f}" height="14" fill="#2a6fdb"/></svg></td><td>{n}</td>'
            f"<td>{100 * n / total:.1f}%</td></tr>" for label, n in classes.items())
        return f'<h2>predicted classes</h2><table id="classes"><tbody>{rows}</tbody></table>'
    values = view["values"]
    if values is None:
        return '<h2>predicted classes</h2><p id="classes">no predictions stored yet</p>'
    plots = []
    for o in values["outputs"]:
        top, edges, n = max(o["counts"]) or 1, o["edges"], len(o["counts"])
        bars = "".join(f'<rect x="{10 + 30 * i}" y="{110 - 100 * c / top:.1f}" width="26" height="{100 * c / top:.1f}" '
                       f'fill="#2a6fdb"><title>{edges[i]:.4g} – {edges[i + 1]:.4g}: {c}</title></rect>'
                       for i, c in enumerate(o["counts"]))
        plots.append(f'<div><b>output {o["output"]}</b><br><svg class="values" width="{20 + 30 * n}" height="130">'
                     f'{bars}<text x="10" y="126" font-size="10">{edges[0]:.4g}</text><text x="{10 + 30 * n}" '
                     f'y="126" font-size="10" text-anchor="end">{edges[-1]:.4g}</text></svg></div>')
    return (f'<h2>predicted values</h2><p id="classes">a regressor (outputs: {values["width"]}): its latest '
            f'{values["results"]} results, 10 equal bins per output</p><div class="plots">{"".join(plots)}</div>')


def drift(d: dict[str, Any]) -> str:
    psi = d["psi"]
    flag = "" if psi is None or psi <= DRIFTING else ' <b class="bad">drifting</b>'
    shown = ("none reported yet (a device reports it from 400 windows on, with a model whose manifest carries "
             "its training's feature bins)" if psi is None else f"{psi:.2f}{flag}")
    return (f'<h2>drift</h2><p id="drift">PSI of its features against its model\'s training: {shown} '
            f"(flagged above {DRIFTING}) · mean confidence {_num(d['mean_confidence'], '.2f')} · reported "
            f"{when(d['reported_at'])} (device clock)<br><small>From its last status: the hub keeps no history of "
            "it in its database; Prometheus does (<code>edgeml_device_drift_psi</code>).</small></p>")


HEAD = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>%(title)s · edgeml fleet</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body { font: 14px system-ui, sans-serif; margin: 1.5em; color: #222; }
 h1 { font-size: 1.3em; margin: 0 0 .2em; } h2 { font-size: 1.05em; margin: 1.4em 0 .4em; }
 table { border-collapse: collapse; } th, td { padding: .25em .7em; border-bottom: 1px solid #ddd; text-align: right; }
 th:first-child, td:first-child { text-align: left; } .bad { color: #b00; } .note, small { color: #666; }
 .plots { display: flex; gap: 2em; flex-wrap: wrap; } svg { background: #fafafa; border: 1px solid #eee; }
</style></head>
<body>
"""
