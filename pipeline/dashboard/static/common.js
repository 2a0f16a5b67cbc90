// Helpers shared by the dashboard and the alert page. No framework, no external assets.
"use strict";

const SVG_NS = "http://www.w3.org/2000/svg";

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("data-")) node.setAttribute(k, v);
    else node[k] = v;
  }
  for (const c of children) if (c !== null && c !== undefined) node.append(c);
  return node;
}

function svgEl(tag, attrs) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
  return node;
}

function num(v, digits) {
  const x = typeof v === "number" ? v : parseFloat(v);
  return Number.isFinite(x) ? x.toFixed(digits === undefined ? 4 : digits) : "–";
}

function isAnomalous(r) {
  if (!r) return false;
  if (typeof r.anomalous === "boolean") return r.anomalous;
  const v = r.verdict !== undefined ? r.verdict : r.anomalous;
  if (typeof v === "boolean") return v;
  if (typeof v === "number") return v !== 0;
  return ["1", "true", "yes", "anomalous", "anomaly", "ng"].includes(String(v).trim().toLowerCase());
}

function lineOf(r) { return r ? (r.line || r.line_id || null) : null; }
function frameOf(r) { return r ? String(r.frame_id || r["frame-id"] || "") : ""; }

// Milliseconds since the epoch from whatever time field a record carries (s, ms or ns).
function timeOf(r) {
  const cands = [r.ts_ms, r.published_ms, r.published_ts, r.capture_ts, r.ts];
  for (const c of cands) {
    const x = typeof c === "number" ? c : parseFloat(c);
    if (!Number.isFinite(x) || x <= 0) continue;
    if (x > 1e17) return x / 1e6;
    if (x > 1e11) return x;
    return x * 1000;
  }
  return Date.now();
}

function ago(ms) {
  const s = Math.max(0, (Date.now() - ms) / 1000);
  if (s < 1) return "now";
  if (s < 90) return `${Math.round(s)} s ago`;
  if (s < 5400) return `${Math.round(s / 60)} min ago`;
  return new Date(ms).toLocaleString();
}

function imgUrl(scope, id, kind, width) {
  return `/img/${scope}/${encodeURIComponent(id)}/${kind}` + (width ? `?w=${width}` : "");
}

function regionsOf(r) {
  let regs = r && r.regions;
  if (typeof regs === "string") { try { regs = JSON.parse(regs); } catch (e) { regs = []; } }
  return Array.isArray(regs) ? regs : [];
}

// Draw region boxes into an SVG laid over an image of natural size (w, h).
function drawBoxes(svg, regions, w, h) {
  while (svg.firstChild) svg.firstChild.remove();
  if (!w || !h) return;
  svg.setAttribute("viewBox", `0 0 ${w} ${h}`);
  const stroke = Math.max(1, Math.round(Math.min(w, h) / 150));
  regions.forEach((reg, i) => {
    const b = reg.box || reg.bbox;
    if (!Array.isArray(b) || b.length !== 4) return;
    const [x0, y0, x1, y1] = b;
    svg.append(svgEl("rect", { x: x0, y: y0, width: Math.max(1, x1 - x0), height: Math.max(1, y1 - y0),
      class: "region-box", "stroke-width": stroke, "data-region": i }));
  });
}

async function getJSON(url) {
  const res = await fetch(url, { credentials: "same-origin", cache: "no-store" });
  let body = null;
  try { body = await res.json(); } catch (e) { body = null; }
  if (!res.ok) {
    const err = new Error((body && body.error) || `HTTP ${res.status}`);
    err.status = res.status;
    throw err;
  }
  return body;
}

async function postJSON(url, body) {
  const res = await fetch(url, { method: "POST", credentials: "same-origin", cache: "no-store",
    headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
  let out = null;
  try { out = await res.json(); } catch (e) { out = null; }
  if (!res.ok) {
    const err = new Error((out && out.error) || `HTTP ${res.status}`);
    err.status = res.status;
    throw err;
  }
  return out;
}

// Wall-clock time of a millisecond timestamp: time only for today, date and time otherwise.
function clockTime(ms, withSeconds) {
  const d = new Date(ms);
  const opts = { hour: "2-digit", minute: "2-digit" };
  if (withSeconds !== false) opts.second = "2-digit";
  if (d.toDateString() !== new Date().toDateString()) { opts.month = "short"; opts.day = "numeric"; }
  return d.toLocaleString([], opts);
}

const LABEL_WORDS = { confirmed: "confirmed defect", false_alarm: "false alarm", unsure: "unsure" };

// What operators said about an alert, in a few words ("new" when nobody has looked at it yet).
function labelText(lab) {
  if (!lab) return "new";
  if (lab.label === "confirmed") return `confirmed: ${lab.defect_type}`;
  if (lab.label) return LABEL_WORDS[lab.label] || lab.label;
  return lab.acknowledged ? "acknowledged" : "new";
}

function labelKind(lab) {
  if (!lab) return "new";
  return lab.label || (lab.acknowledged ? "acknowledged" : "new");
}

// A datetime-local input's value as ms since the epoch (local time), or null.
function inputMs(value) {
  if (!value) return null;
  const t = new Date(value).getTime();
  return Number.isFinite(t) ? t : null;
}
