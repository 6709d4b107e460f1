"""The dashboard's one page: HTML, CSS and JS inline (the machines it runs on may have no
internet, so nothing loads from elsewhere). Its script polls `/api/farm` (a
`FarmView.to_wire()`) every `__INTERVAL_MS__` milliseconds, which `page()` fills in, and
builds the DOM with `textContent` only: names come from users and are never parsed as HTML.
"""

from __future__ import annotations

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>soafarm dashboard</title>
<style>
  body { font: 14px/1.4 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.2em 2em;
         color: #1d2125; background: #f6f7f9; }
  h1 { font-size: 1.4em; margin: 0 0 .2em; }
  h2 { font-size: 1.1em; margin: 1.4em 0 .5em; }
  .muted { color: #6b7280; }
  #error { background: #fde8e8; color: #8a1c1c; border: 1px solid #f5b5b5; padding: .5em .8em;
           border-radius: 4px; margin: .8em 0; }
  table { border-collapse: collapse; width: 100%; background: #fff; }
  th, td { text-align: left; padding: .35em .6em; border-bottom: 1px solid #e5e7eb;
           vertical-align: middle; }
  th { font-weight: 600; background: #eef0f3; }
  td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
  td.service, td.session-id, td.client-id { white-space: nowrap; }
  tr.client td { color: #4b5563; font-size: .93em; background: #fbfbfc; }
  tr.client td.client-id { padding-left: 1.8em; }
  .bar { display: inline-block; width: 120px; height: 10px; background: #e5e7eb;
         border-radius: 3px; overflow: hidden; vertical-align: middle; }
  .bar > span { display: block; height: 100%; background: #2f855a; }
  td.faults, tr.client td.faults { color: #b42318; font-weight: 600; }
  .state-running { color: #2f855a; } .state-queued { color: #b7791f; }
  .state-failed { color: #b42318; font-weight: 600; }
  .state-closed, .state-released { color: #6b7280; }
  #heatmap { display: grid; grid-template-columns: repeat(auto-fill, minmax(12em, 1fr));
             gap: 8px; }
  .cell { border-radius: 5px; padding: .55em .7em; color: #fff; min-height: 4.2em;
          box-shadow: 0 1px 2px rgba(0,0,0,.15); }
  .cell .host-id { font-weight: 600; word-break: break-all; }
  .cell .util { font-size: 1.5em; font-weight: 600; }
  .legend { margin-top: .6em; font-size: .9em; }
  .legend span.swatch { display: inline-block; width: 1.6em; height: .9em; vertical-align: middle;
                        border-radius: 2px; margin: 0 .2em 0 .8em; }
</style>
</head>
<body>
<header>
  <h1>soafarm dashboard <span class="muted">namespace <span id="namespace">?</span></span></h1>
  <div id="status" class="muted">loading...</div>
</header>
<div id="error" hidden></div>
<section>
  <h2>Sessions (<span id="session-count">0</span>)</h2>
  <table id="sessions">
    <thead><tr>
      <th>session</th><th>service</th><th>state</th><th class="num">units</th>
      <th>progress</th><th class="num">done / total</th><th class="num">rate</th>
      <th class="num">ETA</th><th class="num">faults</th><th>why</th>
    </tr></thead>
    <tbody></tbody>
  </table>
  <p id="no-sessions" class="muted" hidden>No open sessions.</p>
</section>
<section>
  <h2>Hosts by utilisation (<span id="host-count">0</span>)</h2>
  <div id="heatmap"></div>
  <p id="no-hosts" class="muted" hidden>No live worker hosts.</p>
  <div class="legend muted">busy:
    <span class="swatch" style="background: hsl(220, 65%, 42%)"></span>0%
    <span class="swatch" style="background: hsl(110, 65%, 38%)"></span>50%
    <span class="swatch" style="background: hsl(0, 65%, 42%)"></span>100%
    <span class="swatch" style="background: #8a9099"></span>no instance reporting
  </div>
</section>
<script>
"use strict";
const INTERVAL_MS = __INTERVAL_MS__;

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = String(text);
  return e;
}

function fmtRate(r) {
  if (r === null) return "-";
  return (r >= 100 ? r.toFixed(0) : r.toFixed(1)) + "/s";
}

function fmtEta(s) {
  if (s === null) return "-";
  if (s <= 0) return "done";
  s = Math.round(s);
  if (s < 60) return s + "s";
  if (s < 3600) return Math.floor(s / 60) + "m" + String(s % 60).padStart(2, "0") + "s";
  return Math.floor(s / 3600) + "h" + String(Math.floor(s / 60) % 60).padStart(2, "0") + "m";
}

function count(n, what) {
  return n + " " + what + (n === 1 ? "" : "s");
}

function bar(done, total) {
  const b = el("span", "bar");
  const fill = el("span");
  fill.style.width = (total > 0 ? Math.min(100, 100 * done / total) : 0).toFixed(1) + "%";
  b.append(fill);
  return b;
}

function row(cls, cells) {
  const tr = el("tr", cls);
  for (const [c, content] of cells) {
    const td = el("td", c);
    if (content instanceof Node) td.append(content); else td.textContent = String(content);
    tr.append(td);
  }
  return tr;
}

function heat(u) {
  if (u === null) return "#8a9099";
  const v = Math.max(0, Math.min(1, u));
  // blue (idle) through green and yellow to red (every core busy)
  return "hsl(" + Math.round(220 * (1 - v)) + ", 65%, " + (v > 0.3 && v < 0.7 ? 38 : 42) + "%)";
}

function renderSessions(sessions) {
  const body = document.querySelector("#sessions tbody");
  const rows = [];
  for (const s of sessions) {
    const service = s.version ? s.service + " " + s.version : s.service;
    const tr = row("session", [
      ["session-id", s.id], ["service", service + (s.durable ? " (durable)" : "")],
      ["state state-" + s.state, s.state], ["num units", s.allocated_units + "/" + s.target_units],
      ["progress", bar(s.done, s.total)], ["num done-total", s.done + " / " + s.total],
      ["num rate", fmtRate(s.rate)], ["num eta", fmtEta(s.eta)],
      ["num" + (s.faulted ? " faults" : ""), s.faulted], ["why muted", s.why],
    ]);
    tr.id = "session-" + s.id;
    rows.push(tr);
    for (const c of s.clients) {
      const ctr = row("client", [
        ["client-id", "client " + c.client_id + (c.sealed ? "" : " (sending)")], ["", ""],
        ["", c.finished ? "finished" : ""], ["", ""],
        ["progress", bar(c.done, c.total)], ["num done-total", c.done + " / " + c.total],
        ["num rate", fmtRate(c.rate)], ["num eta", fmtEta(c.eta)],
        ["num" + (c.faulted ? " faults" : ""), c.faulted], ["", ""],
      ]);
      ctr.id = "client-" + s.id + "-" + c.client_id;
      rows.push(ctr);
    }
  }
  body.replaceChildren(...rows);
  document.getElementById("session-count").textContent = String(sessions.length);
  document.getElementById("no-sessions").hidden = sessions.length > 0;
}

function renderHosts(hosts) {
  const cells = [];
  for (const h of hosts) {
    const cell = el("div", "cell");
    cell.id = "host-" + h.id;
    cell.style.background = heat(h.utilisation);
    cell.title = "pool " + h.pool + ", heartbeat " + h.heartbeat_age.toFixed(1) + "s ago";
    cell.append(el("div", "host-id", h.id + (h.state ? " (" + h.state + ")" : "")));
    cell.append(el("div", "util",
      h.utilisation === null ? "idle" : Math.round(100 * h.utilisation) + "%"));
    cell.append(el("div", "sizes", count(h.instances, "instance") + ", " + count(h.cores, "core")));
    cells.push(cell);
  }
  document.getElementById("heatmap").replaceChildren(...cells);
  document.getElementById("host-count").textContent = String(hosts.length);
  document.getElementById("no-hosts").hidden = hosts.length > 0;
}

function showError(message) {
  const box = document.getElementById("error");
  box.textContent = message;
  box.hidden = !message;
}

function render(farm) {
  document.getElementById("namespace").textContent = farm.namespace;
  renderSessions(farm.sessions);
  renderHosts(farm.hosts);
  showError(farm.error ? "cannot read the farm: " + farm.error : "");
  const cores = farm.hosts.reduce((n, h) => n + h.cores, 0);
  const instances = farm.hosts.reduce((n, h) => n + h.instances, 0);
  const rate = farm.sessions.reduce((n, s) => n + (s.rate || 0), 0);
  const taken = farm.taken ? new Date(farm.taken * 1000).toLocaleTimeString() : "never";
  document.getElementById("status").textContent =
    count(farm.sessions.length, "session") + ", " + count(farm.hosts.length, "host") + ", " +
    count(instances, "instance") + " on " + count(cores, "core") + ", " + fmtRate(rate) +
    " in all; updated " + taken + ", every " + (INTERVAL_MS / 1000) + "s";
}

async function poll() {
  try {
    const reply = await fetch("/api/farm", {cache: "no-store"});
    if (!reply.ok) throw new Error("HTTP " + reply.status);
    render(await reply.json());
  } catch (e) {
    showError("the dashboard server does not answer (" + e.message + "); retrying");
  } finally {
    setTimeout(poll, INTERVAL_MS);
  }
}
poll();
</script>
</body>
</html>
"""


def page(interval: float) -> str:
    """The page, polling every `interval` seconds."""
    return PAGE.replace("__INTERVAL_MS__", str(max(100, round(interval * 1000))))
