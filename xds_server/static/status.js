// The status page: polls status.json (xds_server/status.py says its shape) and redraws the tables,
// and history.json (xds_server/status_history.py) for the charts drawn in them.
// Plain DOM and textContent only: names and messages come from clients and catalogs, never as HTML.
"use strict";

const POLL_MS = 1000;
const SVG_NS = "http://www.w3.org/2000/svg";
// A chart's drawing box; CSS scales it (preserveAspectRatio none) to its cell.
const CHART_W = 120;
const CHART_H = 24;

// The last history.json; the tables redraw every second, the history changes every interval_s.
let history = null;

// el("td", {class: "x", dataset: {field: "reserved"}}, "text", childNode, ...)
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "dataset") Object.assign(node.dataset, value);
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child ?? "");
  return node;
}

function svg(tag, attrs = {}, ...children) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  node.append(...children);
  return node;
}

function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (Math.abs(n) >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return `${i === 0 ? n : n.toFixed(1)} ${units[i]}`;
}

function clock(unixSeconds) {
  return new Date(unixSeconds * 1000).toLocaleTimeString();
}

function dateTime(unixSeconds) {
  return new Date(unixSeconds * 1000).toLocaleString();
}

function shortType(typeUrl) {
  return typeUrl.slice(typeUrl.lastIndexOf(".") + 1);
}

// A number cell: formatted for people, the raw value in data-value for scripts and tests.
function numberCell(field, value, format = String) {
  return el("td", {class: "num", dataset: {field, value: String(value)}}, format(value));
}

function usageBar(ep) {
  const used = ep.reserved_bytes + ep.excess_bytes;
  const fraction = ep.capacity_bytes > 0 ? Math.min(1, used / ep.capacity_bytes) : 0;
  const bar = el("div", {class: "fill"});
  bar.style.width = `${(fraction * 100).toFixed(1)}%`;
  return el("td", {dataset: {field: "use", value: String(fraction)}},
            el("div", {class: "bar", title: `${bytes(used)} of ${bytes(ep.capacity_bytes)}`}, bar),
            ` ${Math.round(fraction * 100)}%`);
}

// SVG path data of one series over the history's window, newest at the right edge, values from 0 to
// `top`; a null (no replica reported the endpoint then) breaks the line.
function linePath(times, values, top) {
  const newest = times[times.length - 1];
  let d = "";
  let drawing = false;
  values.forEach((v, i) => {
    if (v === null) { drawing = false; return; }
    const x = CHART_W - ((newest - times[i]) / history.window_s) * CHART_W;
    // A pixel's margin top and bottom: a line at zero or at the top is not cut in half by the edge.
    const y = CHART_H - 1 - (Math.min(v, top) / top) * (CHART_H - 2);
    d += `${drawing ? "L" : "M"}${x.toFixed(1)},${y.toFixed(1)}`;
    drawing = true;
  });
  return d;
}

// A small chart: one path per series [name, values], data-* attributes for scripts and tests
// (data-values: the series as JSON).
function chart(kind, title, top, series) {
  const paths = series.map(([name, values]) => svg("path", {
    class: `line ${name}`, d: linePath(history.times, values, top), "data-series": name,
    "data-values": JSON.stringify(values)}));
  return svg("svg", {class: "chart", viewBox: `0 0 ${CHART_W} ${CHART_H}`, preserveAspectRatio: "none",
                     "data-chart": kind}, svg("title", {}, title), ...paths);
}

const windowText = () => `last ${Math.round(history.window_s / 60)} min`;

function kvChart(model, address) {
  const series = history?.models.find((m) => m.name === model)?.endpoints.find((e) => e.address === address);
  if (!series) return "";
  return chart("kv", `KV of capacity, ${windowText()}: reserved (blue), with engine excess (orange)`, 1,
               [["reserved", series.reserved], ["used", series.used]]);
}

function admissionsChart(model) {
  const series = history?.models.find((m) => m.name === model);
  if (!series) return "";
  const top = Math.max(1, ...series.admitted, ...series.refused);
  const sum = (values) => values.reduce((a, b) => a + b, 0);
  return el("span", {class: "admissions"},
    chart("admissions", `requests per ${history.interval_s} s, ${windowText()}: admitted (green), ` +
          `refused (red); up to ${top}`, top, [["admitted", series.admitted], ["refused", series.refused]]),
    ` ${sum(series.admitted)} admitted, ${sum(series.refused)} refused, ${windowText()}`);
}

function endpointRow(modelName, ep) {
  const blind = ep.blind_replicas.length ? ` (stale metrics: ${ep.blind_replicas.join(", ")})` : "";
  return el("tr", {dataset: {endpoint: ep.address}},
    el("td", {}, ep.address, ep.priority ? el("span", {class: "tag"}, `overflow ${ep.priority}`) : ""),
    el("td", {dataset: {field: "health", value: ep.health}},
       el("span", {class: `health ${ep.health}`}, ep.health), blind),
    numberCell("reserved", ep.reserved_bytes, bytes),
    numberCell("capacity", ep.capacity_bytes, bytes),
    usageBar(ep),
    numberCell("excess", ep.excess_bytes, bytes),
    numberCell("reservations", ep.reservations),
    numberCell("replicas", ep.replicas),
    el("td", {class: "chart-cell"}, kvChart(modelName, ep.address)));
}

function modelBody(model) {
  const head = el("tr", {class: "model"},
    el("th", {colspan: "9"}, model.name,
       el("span", {class: "detail"},
          `${model.protocol}, context ${model.max_context_tokens}, output ${model.max_output_tokens} tokens, `,
          `budget ${bytes(model.endpoints[0]?.budget_bytes ?? 0)} per endpoint, waiting `,
          el("span", {dataset: {field: "waiting", value: String(model.waiting)}}, String(model.waiting))),
       admissionsChart(model.name)));
  return el("tbody", {dataset: {model: model.name}}, head,
            ...model.endpoints.map((ep) => endpointRow(model.name, ep)));
}

function refusalRow(r) {
  return el("tr", {dataset: {code: r.code}},
    el("td", {class: "nowrap"}, clock(r.time)), el("td", {dataset: {field: "model"}}, r.model || "-"),
    el("td", {class: "num"}, String(r.status)), el("td", {dataset: {field: "code"}}, r.code),
    el("td", {class: "message"}, r.message), el("td", {dataset: {field: "request_id"}}, r.request_id ?? "-"),
    el("td", {class: "nowrap"}, r.replica));
}

function nodeRow(node, replicas) {
  const acked = Object.entries(node.acked_versions ?? {}).sort()
    .map(([type, version]) => `${shortType(type)} ${version}`).join(", ");
  const nack = node.last_nack
    ? `${shortType(node.last_nack.type_url)} ${node.last_nack.version || "-"}: ${node.last_nack.error_detail}` : "";
  const report = replicas.get(node.id);
  const reportCell = report === undefined ? el("td", {}, "-")
    : el("td", {class: report.ok ? "" : "bad"}, report.ok ? "ok" : report.error);
  return el("tr", {dataset: {node: node.id}},
    el("td", {class: "nowrap"}, node.id), el("td", {class: "nowrap"}, node.group),
    el("td", {class: "nowrap"}, dateTime(node.connected_since_unix)),
    el("td", {class: "versions"}, acked),
    el("td", {class: "num"}, node.budget_share === undefined ? "-" : node.budget_share.toFixed(3)),
    el("td", {class: nack ? "bad" : ""}, nack), reportCell);
}

function render(data) {
  document.getElementById("version").textContent = data.version;
  document.getElementById("updated").textContent = `updated ${clock(data.time)}`;
  const models = document.getElementById("models");
  models.querySelectorAll("tbody").forEach((b) => b.remove());
  models.append(...data.models.map(modelBody));
  document.querySelector("#refusals tbody").replaceChildren(...data.refusals.map(refusalRow));
  const replicas = new Map(data.replicas.map((r) => [r.node_id, r]));
  document.querySelector("#nodes tbody").replaceChildren(...data.nodes.map((n) => nodeRow(n, replicas)));
  const failed = data.replicas.filter((r) => !r.ok).map((r) => `${r.node_id}: ${r.error}`);
  showProblem(failed.length ? `Some ext_proc replicas did not report (their numbers are missing): ${failed.join("; ")}`
                            : null);
}

// `stale`: the tables are the last ones received, not current.
function showProblem(text, stale = false) {
  const problem = document.getElementById("problem");
  problem.hidden = text === null;
  problem.textContent = text ?? "";
  document.body.classList.toggle("stale", stale);
}

async function poll() {
  try {
    const resp = await fetch("status.json", {cache: "no-store"});
    if (!resp.ok) throw new Error(`HTTP ${resp.status}`);
    render(await resp.json());
  } catch (e) {
    // Keep the last tables, marked stale: what they say may no longer be true.
    showProblem(`Cannot reach the control plane (${e.message}); the numbers below are old.`, true);
  } finally {
    // Scheduled after each answer, not on a fixed interval: a slow control plane is not piled on.
    setTimeout(poll, POLL_MS);
  }
}

// The charts' data, fetched again every sampling interval; a failed fetch keeps the last one (the
// tables already say when the control plane is away).
async function pollHistory() {
  let wait = POLL_MS;
  try {
    const resp = await fetch("history.json", {cache: "no-store"});
    if (resp.ok) {
      history = await resp.json();
      wait = history.interval_s * 1000;
    }
  } catch (e) {
    // Retried in a second.
  } finally {
    setTimeout(pollHistory, wait);
  }
}

poll();
pollHistory();
