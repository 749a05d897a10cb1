// ctrl-exec web console: the fleet, recent runs, live output, and a run form.
// It talks only to this API (same origin, the page's CSP forbids anything else), with
// the same auth as any client: a token typed once is kept in `token` below, in this
// page's memory only (never in storage, a URL or a log), and sent as a Bearer header.
// #run=<reqid> in the address follows that run's output when the page opens.
"use strict";

let token = "";
const fleet = new Map();          // host -> {tags, scripts, ping}

function $(id) { return document.getElementById(id); }

function say(text) { $("message").textContent = text || ""; }

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "class") node.className = value; else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child instanceof Node ? child : String(child ?? ""));
  return node;
}

function headers(json) {
  const out = {};
  if (json) out["Content-Type"] = "application/json";
  if (token) out["Authorization"] = "Bearer " + token;
  return out;
}

async function api(method, path, body) {
  const response = await fetch(path, {method, headers: headers(body !== undefined),
                                      body: body === undefined ? undefined : JSON.stringify(body),
                                      cache: "no-store", credentials: "omit"});
  let data = null;
  try { data = await response.json(); } catch (err) { data = null; }
  if (!response.ok) {
    const detail = data ? (data.detail || data.error || JSON.stringify(data)) : response.statusText;
    throw new Error(method + " " + path + " answered " + response.status + ": " + detail);
  }
  return data;
}

// Read an NDJSON answer as it arrives; onEvent gets each parsed line.
async function stream(response, onEvent) {
  if (!response.ok) {
    let detail = response.statusText;
    try { const data = await response.json(); detail = data.detail || data.error || detail; } catch (err) {}
    throw new Error("the server answered " + response.status + ": " + detail);
  }
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, {stream: true});
    let cut;
    while ((cut = buffer.indexOf("\n")) >= 0) {
      const line = buffer.slice(0, cut).trim();
      buffer = buffer.slice(cut + 1);
      if (line) onEvent(JSON.parse(line));
    }
  }
  if (buffer.trim()) onEvent(JSON.parse(buffer));
}

// --- fleet -------------------------------------------------------------------------------

async function loadFleet() {
  const discovery = await api("GET", "/discovery");
  fleet.clear();
  for (const [host, row] of Object.entries(discovery.hosts || {})) {
    fleet.set(host, {discovery: row, ping: null});
  }
  if (fleet.size) {
    const ping = await api("POST", "/ping", {hosts: [...fleet.keys()]});
    for (const row of ping.results || []) {
      if (fleet.has(row.host)) fleet.get(row.host).ping = row;
    }
  }
  drawFleet();
}

function daysLeft(row) {
  if (typeof row.days_left === "number") return row.days_left;
  const when = Date.parse(row.expiry || "");
  return Number.isNaN(when) ? null : Math.floor((when - Date.now()) / 86400000);
}

function drawFleet() {
  const body = $("fleet").querySelector("tbody");
  body.replaceChildren();
  const scripts = new Set();
  for (const [host, entry] of fleet) {
    const d = entry.discovery || {};
    const p = entry.ping || {};
    for (const s of d.scripts || []) scripts.add(typeof s === "string" ? s : s.name);
    const tags = Object.entries(d.tags || {}).map(([k, v]) => k + "=" + v).join(", ");
    const reachable = p.status === "ok";
    const left = daysLeft(p.status === "ok" ? p : d);
    body.append(el("tr", {"data-host": host},
      el("td", {}, el("input", {type: "checkbox", value: host, "aria-label": "select " + host})),
      el("td", {}, host), el("td", {}, tags || "(none)"),
      el("td", {class: reachable ? "ok" : "bad"}, reachable ? "yes" : (p.error || d.error || "no")),
      el("td", {}, p.rtt || ""), el("td", {}, p.expiry || d.expiry || ""),
      el("td", {class: left !== null && left < 30 ? "warn" : ""}, left === null ? "" : left),
      el("td", {}, p.version || d.version || "")));
  }
  const select = $("script");
  const chosen = select.value;
  select.replaceChildren(...[...scripts].sort().map((s) => el("option", {value: s}, s)));
  if (chosen) select.value = chosen;
}

// --- runs ----------------------------------------------------------------------------------

async function loadRuns() {
  const data = await api("GET", "/runs?limit=20");
  const body = $("runs").querySelector("tbody");
  body.replaceChildren();
  for (const run of data.runs || []) {
    const states = Object.entries(run.summary || {}).filter(([, n]) => n)
      .map(([state, n]) => state + " " + n).join(", ");
    const row = el("tr", {"data-reqid": run.reqid},
      el("td", {}, run.reqid), el("td", {}, run.script), el("td", {}, run.mode),
      el("td", {}, run.user), el("td", {}, (run.hosts || []).join(", ")), el("td", {}, states),
      el("td", {}, run.complete ? new Date(run.completed * 1000).toISOString() : "running"));
    row.addEventListener("click", () => follow(run.reqid).catch((err) => say(err.message)));
    body.append(row);
  }
}

// One block per host; stdout / stderr appended as the events arrive.
function outputFor(title) {
  $("output-title").textContent = title;
  const out = $("output");
  out.replaceChildren();
  const blocks = new Map();
  function block(host) {
    if (!blocks.has(host)) {
      const state = el("span", {class: "state"}, "running");
      const node = el("div", {class: "host-output", "data-host": host}, el("h3", {}, host + " ", state));
      out.append(node);
      blocks.set(host, {node, state, last: null});
    }
    return blocks.get(host);
  }
  return function onEvent(event) {
    if (event.event === "start") { for (const host of event.hosts || []) block(host); return; }
    if (event.event === "stdout" || event.event === "stderr") {
      const b = block(event.host);
      if (!b.last || b.last.className !== event.event) {
        b.last = el("pre", {class: event.event});
        b.node.append(b.last);
      }
      b.last.textContent += event.data;
      return;
    }
    if (event.event === "exit") {
      const b = block(event.host);
      const ok = event.exit === 0 && !event.error;
      b.state.className = "state " + (ok ? "ok" : "bad");
      b.state.textContent = "exit " + event.exit + (event.error ? " - " + event.error : "");
      return;
    }
    if (event.event === "done") { loadRuns().catch((err) => say(err.message)); return; }
    if (event.event === "error") say(event.detail || event.error);
  };
}

async function follow(reqid) {
  say("");
  const onEvent = outputFor("run " + reqid);
  const response = await fetch("/runs/" + encodeURIComponent(reqid) + "/events",
                               {headers: headers(false), cache: "no-store", credentials: "omit"});
  await stream(response, onEvent);
}

async function startRun(submit) {
  submit.preventDefault();
  say("");
  const hosts = [...document.querySelectorAll("#fleet input[type=checkbox]:checked")].map((b) => b.value);
  const body = {script: $("script").value, stream: true,
                args: $("args").value.split("\n").filter((line) => line !== "")};
  const tags = $("tags").value.trim();
  if (tags) {
    body.targets = {tags: {}};
    for (const pair of tags.split(",")) {
      const [key, value] = pair.split("=");
      if (!key || value === undefined) { say("tags must be key=value pairs separated by commas"); return; }
      body.targets.tags[key.trim()] = value.includes("|") ? value.split("|") : value.trim();
    }
  }
  if (hosts.length) body.hosts = hosts;
  if (!hosts.length && !tags) { say("tick at least one host, or give tags"); return; }
  const onEvent = outputFor(body.script + " on " + (hosts.join(", ") || tags));
  const response = await fetch("/run", {method: "POST", headers: headers(true),
                                        body: JSON.stringify(body), cache: "no-store",
                                        credentials: "omit"});
  await stream(response, onEvent);
}

function refreshAll() {
  say("");
  loadFleet().catch((err) => say(err.message));
  loadRuns().catch((err) => say(err.message));
}

document.addEventListener("DOMContentLoaded", () => {
  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    token = $("token").value;
    $("token").value = "";
    $("token-state").textContent = token ? "token set" : "no token";
    refreshAll();
  });
  $("refresh").addEventListener("click", () => loadFleet().catch((err) => say(err.message)));
  $("refresh-runs").addEventListener("click", () => loadRuns().catch((err) => say(err.message)));
  $("run-form").addEventListener("submit", (event) => startRun(event).catch((err) => say(err.message)));
  refreshAll();
  const wanted = /^#run=([A-Za-z0-9_-]{1,64})$/.exec(location.hash);
  if (wanted) follow(wanted[1]).catch((err) => say(err.message));
});
