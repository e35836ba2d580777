// The status page: polls status.json (xds_server/status.py says its shape) and redraws the tables.
// Plain DOM and textContent only: names and messages come from clients and catalogs, never as HTML.
"use strict";

const POLL_MS = 1000;

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

function endpointRow(ep) {
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
    numberCell("replicas", ep.replicas));
}

function modelBody(model) {
  const head = el("tr", {class: "model"},
    el("th", {colspan: "8"}, model.name,
       el("span", {class: "detail"},
          `${model.protocol}, context ${model.max_context_tokens}, output ${model.max_output_tokens} tokens, `,
          `budget ${bytes(model.endpoints[0]?.budget_bytes ?? 0)} per endpoint, waiting `,
          el("span", {dataset: {field: "waiting", value: String(model.waiting)}}, String(model.waiting)))));
  return el("tbody", {dataset: {model: model.name}}, head, ...model.endpoints.map(endpointRow));
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

poll();
