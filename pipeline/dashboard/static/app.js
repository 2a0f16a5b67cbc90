// The live dashboard: a snapshot from /api/snapshot, then server-sent events from /events.
// Pub/sub can lose messages, so every (re)connection re-reads the snapshot, and alerts are always
// fetched from the alerts stream (the reliable path), a live result only says "look now".
"use strict";

const HISTORY = 200;
const ALERTS = 30;
const FRAMES = 50;
const YIELD_HOURS = 12;
const IMAGE_MIN_INTERVAL_MS = 250;   // per line: at most 4 image refreshes a second
const STATE_WORDS = { stale: "STALE", no_worker: "NO WORKER", waiting: "waiting" };
const state = { lines: new Map(), order: [], alerts: [], alertIds: new Set(), alertsNext: null, alertsTotal: 0,
                alertFilter: {}, workers: [], events: 0, resyncs: 0, framesCursor: [], framesNext: null };
let source = null;
let backoff = 1000;
let fetchingAlerts = null;
let alertsAgain = false;

// --- per-line cards ----------------------------------------------------------------------------
// Cards keep the server's order (configured lines first, then lines announced by workers), whatever
// order events arrive in.
function orderOf(id) {
  const i = state.order.indexOf(id);
  return i < 0 ? state.order.length : i;
}

function placeCard(node, id) {
  const parent = document.getElementById("lines");
  const after = [...parent.children].find((c) => orderOf(c.dataset.line) > orderOf(id) ||
    (orderOf(c.dataset.line) === orderOf(id) && c.dataset.line > id));
  if (after) parent.insertBefore(node, after); else parent.append(node);
}

function lineCard(id) {
  let st = state.lines.get(id);
  if (st) return st;
  const node = document.getElementById("line-template").content.firstElementChild.cloneNode(true);
  node.dataset.line = id;
  node.id = `line-${id}`;
  node.querySelector(".line-id").textContent = id;
  const heat = node.querySelector(".heat");
  const slider = node.querySelector(".heat-opacity");
  const setOpacity = () => { heat.style.opacity = String(slider.value / 100); };
  slider.addEventListener("input", setOpacity);
  setOpacity();
  placeCard(node, id);
  st = { id, node, latest: null, history: [], threshold: {}, adapter: null, throughput: null, status: null,
         labels: null, suggestion: null, yield: null, lastImageAt: 0, imageTimer: null, shownFrame: null };
  state.lines.set(id, st);
  refreshLineSelects();
  return st;
}

function refreshLineSelects() {
  const ids = [...state.lines.keys()].sort((a, b) => orderOf(a) - orderOf(b) || (a < b ? -1 : 1));
  for (const sel of document.querySelectorAll("select.line-select")) {
    const have = [...sel.options].map((o) => o.value).filter((v) => v);
    if (have.join() === ids.join()) continue;
    const keep = sel.value;
    sel.replaceChildren(el("option", { value: "", text: "all lines" }), ...ids.map((i) => el("option", { value: i, text: i })));
    sel.value = keep;
  }
}

function renderLine(st) {
  const n = st.node;
  const r = st.latest;
  if (st.classNameText !== undefined) n.querySelector(".class-name").textContent = st.classNameText || "";
  const badge = n.querySelector(".verdict");
  const lineState = st.status ? st.status.state : "live";
  n.dataset.state = lineState;
  n.querySelector(".status-text").textContent = st.status && lineState !== "live" ? st.status.text : "";
  if (!r) {
    badge.textContent = STATE_WORDS[lineState] || "no frame yet";
    badge.className = "verdict badge" + (lineState === "no_worker" || lineState === "stale" ? " warn" : "");
    delete n.dataset.verdict;
    delete n.dataset.frameId;
  } else {
    const bad = isAnomalous(r);
    n.dataset.verdict = bad ? "anomalous" : "normal";
    if (lineState === "stale" || lineState === "no_worker") {
      badge.textContent = STATE_WORDS[lineState];   // the last verdict is old news: say so instead
      badge.className = "verdict badge warn";
    } else {
      badge.textContent = bad ? "ANOMALOUS" : "normal";
      badge.className = "verdict badge " + (bad ? "bad" : "good");
    }
    n.querySelector(".score").textContent = num(r.score);
    n.querySelector(".frame-id").textContent = frameCaption(r);
    n.dataset.frameId = frameOf(r);
  }
  const thr = currentThreshold(st);
  const source = st.threshold && st.threshold.source ? ` (${st.threshold.source})` : "";
  n.querySelector(".threshold").textContent = thr === null ? "–" : num(thr) + source;
  const tp = st.throughput;
  n.querySelector(".fps").textContent = tp ? `${num(tp.fps, 2)} frames/s · ${tp.stream_length} in stream` : "–";
  renderLabels(st);
  renderYield(st);
  renderAdapter(st);
  drawChart(n.querySelector(".chart"), st.history, thr);
  scheduleImage(st);
}

function frameCaption(r) {
  const cam = r.camera ? `${r.camera} · ` : "";
  return `${cam}${clockTime(timeOf(r))} (${ago(timeOf(r))}) · frame ${frameOf(r)}`;
}

function renderLabels(st) {
  const n = st.node;
  const c = st.labels;
  const dd = n.querySelector(".labels");
  if (!c) { dd.textContent = "–"; return; }
  const types = Object.entries(c.defect_types || {}).map(([k, v]) => `${k} ${v}`).join(", ");
  const rate = c.false_alarm_rate === null || c.false_alarm_rate === undefined ? "" :
    ` · false-alarm rate ${(100 * c.false_alarm_rate).toFixed(1)}%`;
  dd.textContent = `${c.confirmed} confirmed${types ? " (" + types + ")" : ""} · ${c.false_alarm} false alarm` +
    `${c.false_alarm === 1 ? "" : "s"} · ${c.unsure} unsure${rate}`;
  dd.dataset.falseAlarms = String(c.false_alarm);
  const sd = n.querySelector(".suggestion");
  sd.textContent = st.suggestion ? st.suggestion.text : "–";
  if (st.suggestion && st.suggestion.threshold !== null) sd.dataset.threshold = String(st.suggestion.threshold);
}

function renderYield(st) {
  const y = st.yield;
  const dd = st.node.querySelector(".yield");
  const svg = st.node.querySelector(".yield-chart");
  while (svg.firstChild) svg.firstChild.remove();
  if (!y || !y.hours || !y.hours.length) { dd.textContent = "–"; return; }
  const hours = y.hours.slice(-YIELD_HOURS);
  const last = hours[hours.length - 1];
  const total = hours.reduce((a, h) => [a[0] + h.pass, a[1] + h.fail], [0, 0]);
  const pct = (p, f) => (p + f ? `${(100 * p / (p + f)).toFixed(1)}%` : "–");
  dd.textContent = `this hour ${last.pass} pass / ${last.fail} fail = ${pct(last.pass, last.fail)}; ` +
    `last ${hours.length} h ${pct(total[0], total[1])}` + (y.since_ms ? ` (counted since ${clockTime(y.since_ms, false)})` : "");
  dd.dataset.pass = String(last.pass);
  dd.dataset.fail = String(last.fail);
  const W = 600, H = 70, B = 14, bw = W / hours.length;
  const top = Math.max(1, ...hours.map((h) => h.pass + h.fail));
  hours.forEach((h, i) => {
    const x = i * bw + 2, w = bw - 4;
    const hp = (h.pass / top) * (H - B - 2), hf = (h.fail / top) * (H - B - 2);
    const bar = svgEl("g", { "data-hour": h.hour_ms });
    bar.append(svgEl("rect", { x, y: H - B - hp, width: w, height: hp, class: "pass-bar" }));
    bar.append(svgEl("rect", { x, y: H - B - hp - hf, width: w, height: hf, class: "fail-bar" }));
    const t = svgEl("title", {});
    t.textContent = `${clockTime(h.hour_ms, false)}: ${h.pass} pass, ${h.fail} fail, yield ${pct(h.pass, h.fail)}`;
    bar.append(t);
    svg.append(bar);
    const label = svgEl("text", { x: x + w / 2, y: H - 2, class: "axis-label", "text-anchor": "middle" });
    label.textContent = new Date(h.hour_ms).getHours() + "h";
    svg.append(label);
  });
}

function currentThreshold(st) {
  const t = st.threshold && (st.threshold.image !== undefined ? st.threshold.image : st.threshold.threshold);
  if (t !== undefined && t !== null && Number.isFinite(parseFloat(t))) return parseFloat(t);
  if (st.latest && Number.isFinite(parseFloat(st.latest.threshold))) return parseFloat(st.latest.threshold);
  return null;
}

function renderAdapter(st) {
  const a = st.adapter;
  const dd = st.node.querySelector(".adapter");
  const bank = st.node.querySelector(".bank");
  if (bank) bank.textContent = (st.latest && st.latest.bank_version) || "none";
  const rd = st.node.querySelector(".refresh");
  const inUse = st.latest && st.latest.adapter_version;
  if (!a) { dd.textContent = inUse || "base model"; rd.textContent = "–"; return; }
  let text = a.current ? a.current : "base model (no adapter)";
  if (inUse && a.current && inUse !== a.current) text += ` (frames still on ${inUse})`;
  if (a.paused) text += " · paused";
  dd.textContent = text;
  dd.dataset.version = a.current || "";
  const ev = a.last_refresh || a.last_event;
  if (!ev) { rd.textContent = "none yet"; return; }
  const what = ev.outcome || ev.action || ev.event || ev.kind || "event";
  const why = ev.reason || ev.detail || ev.message || "";
  rd.textContent = `${what}${ev.version ? " " + ev.version : ""} · ${ago(timeOf(ev))}${why ? " · " + why : ""}`;
  rd.dataset.outcome = String(what);
}

// Only the newest frame is drawn, at most every IMAGE_MIN_INTERVAL_MS, so a fast line cannot
// flood the browser with requests. A live message is short; the frame's full result (regions,
// thresholds) is read once per drawn frame.
function scheduleImage(st) {
  const fid = st.latest && frameOf(st.latest);
  if (!fid || fid === st.shownFrame || st.imageTimer) return;
  const wait = Math.max(0, st.lastImageAt + IMAGE_MIN_INTERVAL_MS - Date.now());
  st.imageTimer = setTimeout(() => {
    st.imageTimer = null;
    const id = frameOf(st.latest);
    if (!id || id === st.shownFrame) return;
    st.shownFrame = id;
    st.lastImageAt = Date.now();
    showFrame(st, id);
  }, wait);
}

async function showFrame(st, id) {
  const n = st.node;
  // raw frames are kept per frame only for alerts; the line's latest image is always there
  n.querySelector(".base").src = imgUrl("latest", st.id, "image", 640) + `&f=${encodeURIComponent(id)}`;
  n.querySelector(".heat").src = imgUrl("frame", id, "heatmap", 640);
  n.querySelector(".outline").src = imgUrl("frame", id, "outline", 640);
  drawBoxes(n.querySelector(".boxes"), [], 0, 0);
  let f;
  try { f = await getJSON(`/api/frames/${encodeURIComponent(id)}?alert=0`); } catch (e) { return; }
  if (frameOf(st.latest) !== id) return;
  if (f.result) { st.latest = Object.assign({}, f.result, st.latest); }
  const result = st.latest;
  n.querySelector(".regions").textContent = [f.region_text, f.verdict_note].filter((x) => x).join(" · ");
  const regs = regionsOf(result);
  if (!regs.length) return;
  if (result.width && result.height) {
    drawBoxes(n.querySelector(".boxes"), regs, result.width, result.height);
    return;
  }
  const sizer = new Image();   // boxes are in frame pixels; the mask has the frame's own size
  sizer.onload = () => {
    if (frameOf(st.latest) === id) drawBoxes(n.querySelector(".boxes"), regs, sizer.naturalWidth, sizer.naturalHeight);
  };
  sizer.src = imgUrl("frame", id, "mask");
}

// --- score chart (inline SVG) with a wall-clock time axis ---------------------------------------
const TICK_STEPS_S = [1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400];

function timeTicks(t0, t1, most) {
  const span = (t1 - t0) / 1000;
  const step = (TICK_STEPS_S.find((s) => span / s <= most) || 86400) * 1000;
  const ticks = [];
  for (let t = Math.ceil(t0 / step) * step; t <= t1; t += step) ticks.push(t);
  return { ticks, seconds: step < 60000 };
}

function drawChart(svg, points, thr) {
  while (svg.firstChild) svg.firstChild.remove();
  const W = 600, H = 170, L = 44, R = 8, T = 8, B = 20;
  svg.append(svgEl("rect", { x: L, y: T, width: W - L - R, height: H - T - B, class: "plot-bg" }));
  const pts = points.filter((p) => Number.isFinite(parseFloat(p.score)));
  svg.dataset.points = String(pts.length);
  if (!pts.length) {
    const t = svgEl("text", { x: W / 2, y: H / 2, class: "axis-label", "text-anchor": "middle" });
    t.textContent = "no scores yet";
    svg.append(t);
    return;
  }
  const ys = pts.map((p) => parseFloat(p.score));
  for (const p of pts) if (Number.isFinite(parseFloat(p.threshold))) ys.push(parseFloat(p.threshold));
  if (thr !== null) ys.push(thr);
  let lo = Math.min(...ys), hi = Math.max(...ys);
  if (hi - lo < 1e-6) { lo -= 0.01; hi += 0.01; }
  const pad = (hi - lo) * 0.08;
  lo -= pad; hi += pad;
  const t0 = pts[0].ts_ms, t1 = Math.max(pts[pts.length - 1].ts_ms, t0 + 1000);
  const x = (t) => L + ((t - t0) / (t1 - t0)) * (W - L - R);
  const y = (v) => T + (1 - (v - lo) / (hi - lo)) * (H - T - B);
  for (const v of [lo + pad, (lo + hi) / 2, hi - pad]) {
    svg.append(svgEl("line", { x1: L, x2: W - R, y1: y(v), y2: y(v), class: "grid" }));
    const t = svgEl("text", { x: L - 4, y: y(v) + 4, class: "axis-label", "text-anchor": "end" });
    t.textContent = v.toFixed(3);
    svg.append(t);
  }
  const { ticks, seconds } = timeTicks(t0, t1, 6);
  svg.dataset.ticks = String(ticks.length);
  for (const tk of ticks) {
    svg.append(svgEl("line", { x1: x(tk), x2: x(tk), y1: T, y2: H - B, class: "grid" }));
    const t = svgEl("text", { x: x(tk), y: H - 5, class: "axis-label time-tick", "text-anchor": "middle" });
    t.textContent = new Date(tk).toLocaleTimeString([], seconds ? { hour: "2-digit", minute: "2-digit", second: "2-digit" }
      : { hour: "2-digit", minute: "2-digit" });
    svg.append(t);
  }
  // the threshold each frame was judged against (it moves when calibration finishes)
  const thrPts = pts.filter((p) => Number.isFinite(parseFloat(p.threshold)));
  if (thrPts.length) {
    let d = "";
    thrPts.forEach((p, i) => {
      const px = x(p.ts_ms), py = y(parseFloat(p.threshold));
      d += i === 0 ? `M${px},${py}` : `H${px}V${py}`;
    });
    d += `H${W - R}`;
    svg.append(svgEl("path", { d, class: "thr-line" }));
  } else if (thr !== null) {
    svg.append(svgEl("line", { x1: L, x2: W - R, y1: y(thr), y2: y(thr), class: "thr-line" }));
  }
  if (thr !== null) {
    const t = svgEl("text", { x: W - R - 2, y: y(thr) - 3, class: "thr-label", "text-anchor": "end" });
    t.textContent = `threshold ${thr.toFixed(3)}`;
    svg.append(t);
  }
  svg.append(svgEl("polyline", { points: pts.map((p) => `${x(p.ts_ms)},${y(parseFloat(p.score))}`).join(" "),
    class: "score-line" }));
  for (const p of pts) {
    if (!p.anomalous) continue;
    const dot = svgEl("circle", { cx: x(p.ts_ms), cy: y(parseFloat(p.score)), r: 3.5, class: "anom-dot" });
    const tip = svgEl("title", {});
    tip.textContent = `${clockTime(p.ts_ms)} score ${num(p.score)}`;
    dot.append(tip);
    svg.append(dot);
  }
}

// --- alerts ------------------------------------------------------------------------------------
function alertItem(a) {
  const fid = frameOf(a);
  const regs = regionsOf(a);
  const thumb = el("div", { class: "thumb" },
    el("img", { class: "layer base", src: imgUrl("frame", fid, "heatmap", 160), alt: `alert ${fid}`, loading: "lazy" }),
    el("img", { class: "layer outline", src: imgUrl("frame", fid, "outline", 160), alt: "" }));
  const boxes = svgEl("svg", { class: "layer boxes", preserveAspectRatio: "none" });
  thumb.append(boxes);
  const sizer = new Image();
  sizer.onload = () => drawBoxes(boxes, regs, sizer.naturalWidth, sizer.naturalHeight);
  sizer.src = imgUrl("frame", fid, "mask");
  const kind = labelKind(a.label);
  const text = el("div", { class: "alert-text" },
    el("div", {}, el("strong", { text: lineOf(a) || "?" }),
      document.createTextNode(`${a.camera ? " · " + a.camera : ""} · ${clockTime(timeOf(a))}`),
      el("span", { class: `label-badge ${kind}`, "data-label": kind, text: labelText(a.label) })),
    el("div", { text: `score ${num(a.score)} (threshold ${num(a.threshold)})` }),
    el("div", { class: "muted region-text", text: a.region_text || `${regs.length} region(s)` }),
    el("div", { class: "muted small", text: `${ago(timeOf(a))} · frame ${fid}` }));
  const link = el("a", { class: "alert-link", href: `/alert/${encodeURIComponent(fid)}`, title: "open the alert" },
    thumb, text);
  return el("li", { class: "alert-item", "data-frame-id": fid, "data-line": lineOf(a) || "", "data-id": a.id || "",
                    "data-label": kind }, link);
}

function filtering() { return Object.values(state.alertFilter).some((v) => v); }

function renderAlerts() {
  const ul = document.getElementById("alert-list");
  const existing = new Map([...ul.children].map((li) => [li.dataset.id || li.dataset.frameId, li]));
  const items = state.alerts.map((a) => {
    const li = existing.get(a.id || frameOf(a));
    return li && li.dataset.label === labelKind(a.label) ? li : alertItem(a);
  });
  ul.replaceChildren(...items);
  document.getElementById("no-alerts").hidden = state.alerts.length > 0;
  document.getElementById("no-alerts").textContent = filtering() ? "No alert matches the filter." : "No alerts yet.";
  const total = state.alertsTotal;
  document.getElementById("alert-count").textContent = state.alerts.length
    ? `(${state.alerts.length} shown${total ? ` of ${total} in the stream` : ""})` : "";
  document.getElementById("alerts-older").hidden = !state.alertsNext;
}

function addAlerts(list, { replace = false, older = false } = {}) {
  if (replace) { state.alerts = []; state.alertIds = new Set(); }
  for (const a of list) {
    const key = a.id || frameOf(a);
    if (state.alertIds.has(key)) continue;
    state.alertIds.add(key);
    state.alerts.push(a);
  }
  state.alerts.sort((p, q) => (p.id < q.id ? 1 : p.id > q.id ? -1 : 0));
  if (!older && state.alerts.length > ALERTS && !state.pagedAlerts) {
    state.alerts = state.alerts.slice(0, ALERTS);
    state.alertsNext = state.alerts[state.alerts.length - 1].id;
  }
  renderAlerts();
}

function alertQuery(extra) {
  const f = state.alertFilter;
  const q = new URLSearchParams({ count: String(ALERTS), ...extra });
  for (const k of ["line", "label", "camera"]) if (f[k]) q.set(k, f[k]);
  if (f.from) q.set("from", String(f.from));
  if (f.to) q.set("to", String(f.to));
  return `/api/alerts?${q}`;
}

// The first page of alerts: the live list, or what matches the filter. `before` pages go further back.
async function loadAlerts() {
  try {
    const body = await getJSON(filtering() ? alertQuery({}) : `/api/alerts?count=${ALERTS}`);
    state.pagedAlerts = false;
    state.alertsTotal = body.total || 0;
    state.alertsNext = filtering() ? body.next : (body.alerts.length >= ALERTS ? body.alerts[body.alerts.length - 1].id : null);
    addAlerts(body.alerts || [], { replace: true });
  } catch (e) { problem(e); }
}

async function olderAlerts() {
  if (!state.alertsNext) return;
  try {
    const body = await getJSON(alertQuery({ before: state.alertsNext }));
    state.pagedAlerts = true;
    state.alertsNext = body.next;
    state.alertsTotal = body.total || state.alertsTotal;
    addAlerts(body.alerts || [], { older: true });
  } catch (e) { problem(e); }
}

// Catch up on the alerts stream after the newest alert we show; coalesces bursts of live events.
async function fetchNewAlerts() {
  if (filtering()) return loadAlerts();
  if (fetchingAlerts) { alertsAgain = true; return fetchingAlerts; }
  fetchingAlerts = (async () => {
    do {
      alertsAgain = false;
      const newest = state.alerts.length ? state.alerts[0].id : null;
      const url = newest ? `/api/alerts?after=${encodeURIComponent(newest)}&count=${ALERTS}` : `/api/alerts?count=${ALERTS}`;
      try {
        const body = await getJSON(url);
        if (body.total) state.alertsTotal = body.total;
        addAlerts(body.alerts || []);
      } catch (e) { problem(e); break; }
    } while (alertsAgain);
  })();
  try { await fetchingAlerts; } finally { fetchingAlerts = null; }
}

function onLabel(lab) {
  let changed = false;
  for (const a of state.alerts) {
    if (frameOf(a) === lab.frame_id) { a.label = lab; changed = true; }
  }
  if (changed) renderAlerts();
  const st = state.lines.get(lab.line);
  if (st) loadLineLabels(st);
}

async function loadLineLabels(st) {
  try {
    const body = await getJSON(`/api/lines/${encodeURIComponent(st.id)}/labels`);
    st.labels = body.counts;
    st.suggestion = body.suggestion;
    renderLabels(st);
  } catch (e) { /* the next tick brings the counts */ }
}

// --- frames browser ----------------------------------------------------------------------------
function formFilter(form) {
  const d = new FormData(form);
  return { line: d.get("line") || "", camera: (d.get("camera") || "").trim(), verdict: d.get("verdict") || "",
           label: d.get("label") || "", from: inputMs(d.get("from")), to: inputMs(d.get("to")) };
}

async function loadFrames(before) {
  const f = formFilter(document.getElementById("frame-filters"));
  const q = new URLSearchParams({ count: String(FRAMES) });
  for (const k of ["line", "camera", "verdict"]) if (f[k]) q.set(k, f[k]);
  if (f.from) q.set("from", String(f.from));
  if (f.to) q.set("to", String(f.to));
  if (before) q.set("before", before);
  let body;
  try { body = await getJSON(`/api/frames?${q}`); } catch (e) { problem(e); return; }
  state.framesNext = body.next;
  const rows = (body.frames || []).map((r) => {
    const bad = isAnomalous(r);
    const fid = frameOf(r);
    const link = bad ? el("a", { href: `/alert/${encodeURIComponent(fid)}`, text: fid }) : el("span", { text: fid });
    return el("tr", { class: bad ? "frame bad" : "frame", "data-frame-id": fid, "data-verdict": bad ? "anomalous" : "normal" },
      el("td", { text: clockTime(timeOf(r)) }), el("td", { text: lineOf(r) || "" }), el("td", { text: r.camera || "" }),
      el("td", { text: num(r.score) }), el("td", { text: bad ? "anomalous" : "normal" }),
      el("td", { text: bad ? labelText(r.label) : "" }), el("td", { class: "small" }, link));
  });
  document.querySelector("#frames tbody").replaceChildren(...rows);
  document.getElementById("frames-older").disabled = !state.framesNext;
  document.getElementById("frames-info").textContent = rows.length
    ? `${rows.length} frame${rows.length === 1 ? "" : "s"}, ${clockTime(timeOf(body.frames[0]))} back to ` +
      `${clockTime(timeOf(body.frames[body.frames.length - 1]))}` : "no frame matches";
  document.getElementById("frames-panel").dataset.rows = String(rows.length);
}

// --- workers -----------------------------------------------------------------------------------
function renderWorkers(workers) {
  state.workers = workers || [];
  const tbody = document.querySelector("#workers tbody");
  const list = (v) => (Array.isArray(v) ? v.join(", ") : v === undefined || v === null || v === "" ? "–" : String(v));
  const rows = state.workers.map((w) => {
    const fps = w.frames_per_s !== undefined ? w.frames_per_s : w.fps;
    const health = w.health || "unknown";
    const redisBad = w.redis_ok === 0 || w.redis_ok === "0" || w.redis_ok === false;
    return el("tr", { class: `worker ${health}`, "data-worker": w.worker_id, title: w.host ? `${w.host} pid ${w.pid}` : "" },
      el("td", { text: w.worker_id }),
      el("td", { class: "health", text: health + (redisBad ? " · Redis down" : "") }),
      el("td", { text: list(w.lines) }),
      el("td", { text: list(w.partitions) }),
      el("td", { text: fps === undefined ? "–" : num(fps, 2) }),
      el("td", { text: w.in_flight === undefined ? "–" : String(w.in_flight) }),
      el("td", { text: w.age_s === null || w.age_s === undefined ? "–" : `${num(w.age_s, 0)} s` }));
  });
  tbody.replaceChildren(...rows);
  document.getElementById("no-workers").hidden = rows.length > 0;
}

// --- state from the server -----------------------------------------------------------------------
function applyLine(l) {
  const st = lineCard(l.id);
  st.classNameText = l.class_name ? `${l.class_name}${l.domain ? " · " + l.domain : ""}` : "(not configured here)";
  st.latest = l.latest || null;   // what Redis holds now, even if that is nothing
  if (l.history) st.history = l.history.slice(-HISTORY);
  for (const k of ["threshold", "adapter", "throughput", "status", "labels", "yield"]) if (l[k]) st[k] = l[k];
  renderLine(st);
}

async function resync() {
  try {
    const snap = await getJSON("/api/snapshot");
    state.order = snap.lines.map((l) => l.id);
    for (const l of snap.lines) applyLine(l);
    for (const st of state.lines.values()) { placeCard(st.node, st.id); loadLineLabels(st); }
    document.getElementById("who").textContent = snap.identity ? `you: ${snap.identity}` : "";
    renderWorkers(snap.workers);
    setRedis(true);
    state.resyncs += 1;
    document.body.dataset.resyncs = String(state.resyncs);
    hideBanner("snapshot");
    if (filtering()) loadAlerts();
    else {
      state.alertsTotal = snap.alerts_total || 0;
      state.alertsNext = (snap.alerts || []).length >= ALERTS ? snap.alerts[snap.alerts.length - 1].id : null;
      state.pagedAlerts = false;
      addAlerts(snap.alerts || [], { replace: true });
    }
  } catch (e) { problem(e); }
}

function onResult(msg) {
  const id = lineOf(msg);
  if (!id) return;
  state.events += 1;
  document.body.dataset.events = String(state.events);
  const st = lineCard(id);
  st.latest = msg;
  if (st.status && st.status.state !== "live" && st.status.state !== "no_worker") st.status = { state: "live", text: "live" };
  const thr = msg.threshold !== undefined ? msg.threshold : currentThreshold(st);
  const point = { id: msg.id || null, ts_ms: timeOf(msg), frame_id: frameOf(msg), score: msg.score,
                  threshold: thr, anomalous: isAnomalous(msg), adapter_version: msg.adapter_version };
  const last = st.history[st.history.length - 1];
  if (!last || last.frame_id !== point.frame_id) {
    if (last && point.ts_ms < last.ts_ms) point.ts_ms = last.ts_ms;
    st.history.push(point);
    if (st.history.length > HISTORY) st.history.splice(0, st.history.length - HISTORY);
  }
  renderLine(st);
  if (msg.alert === true || point.anomalous) fetchNewAlerts();
}

function onTick(t) {
  renderWorkers(t.workers);
  if (t.alerts_total !== undefined && !filtering()) { state.alertsTotal = t.alerts_total; renderAlerts(); }
  // A tick lists the lines in the server's order too, and may come before the first snapshot does.
  const ids = t.order || [];
  if (ids.length && ids.join("\n") !== state.order.join("\n")) {
    state.order = ids;
    for (const st of state.lines.values()) placeCard(st.node, st.id);
  }
  for (const [id, l] of Object.entries(t.lines || {})) {
    const st = lineCard(id);
    Object.assign(st, { throughput: l.throughput, adapter: l.adapter, threshold: l.threshold, status: l.status,
                        labels: l.labels, yield: l.yield });
    renderLine(st);
  }
}

// --- connection state --------------------------------------------------------------------------
function setConn(s) {
  document.body.dataset.conn = s;
  const pill = document.getElementById("conn-pill");
  pill.textContent = { live: "live", reconnecting: "reconnecting…", connecting: "connecting…" }[s] || s;
  pill.className = "pill " + (s === "live" ? "ok" : "warn");
  if (s === "live") hideBanner("conn"); else showBanner("conn", "Connection to the dashboard lost; reconnecting…");
}

function setRedis(ok, error) {
  document.body.dataset.redis = ok ? "up" : "down";
  const pill = document.getElementById("redis-pill");
  pill.textContent = ok ? "Redis ok" : "Redis down";
  pill.className = "pill " + (ok ? "ok" : "bad");
  if (ok) hideBanner("redis");
  else showBanner("redis", `Redis unreachable${error ? " (" + error + ")" : ""}; showing the last known state, retrying…`);
}

const banners = new Map();
function showBanner(key, text) { banners.set(key, text); paintBanner(); }
function hideBanner(key) { banners.delete(key); paintBanner(); }
function paintBanner() {
  const b = document.getElementById("banner");
  b.hidden = banners.size === 0;
  b.textContent = [...banners.values()].join(" · ");
}

function problem(e) {
  if (e && e.status === 401) showBanner("auth", "Access token refused or missing: reopen the dashboard with ?token=…");
  else if (e && e.status === 429) showBanner("auth", e.message);
  else if (e && e.status === 503) setRedis(false, e.message);
  else showBanner("snapshot", `Could not load data: ${e && e.message ? e.message : e}`);
}

function connect() {
  if (source) source.close();
  setConn(document.body.dataset.conn === "live" ? "reconnecting" : document.body.dataset.conn);
  source = new EventSource("/events");
  source.addEventListener("open", () => { backoff = 1000; setConn("live"); resync(); });
  source.addEventListener("error", () => {
    setConn("reconnecting");
    if (source.readyState === EventSource.CLOSED) {   // the browser gave up (e.g. an HTTP error): we don't
      source.close();
      setTimeout(connect, backoff);
      backoff = Math.min(backoff * 2, 15000);
    }
  });
  source.addEventListener("hello", (ev) => { const d = JSON.parse(ev.data); setRedis(d.redis, d.error); });
  source.addEventListener("redis", (ev) => { const d = JSON.parse(ev.data); setRedis(d.redis, d.error); });
  source.addEventListener("resync", () => resync());
  source.addEventListener("result", (ev) => onResult(JSON.parse(ev.data)));
  source.addEventListener("tick", (ev) => onTick(JSON.parse(ev.data)));
  source.addEventListener("label", (ev) => onLabel(JSON.parse(ev.data)));
}

function clock() {
  document.getElementById("clock").textContent = new Date().toLocaleTimeString();
  for (const st of state.lines.values()) {
    if (st.latest) st.node.querySelector(".frame-id").textContent = frameCaption(st.latest);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  const af = document.getElementById("alert-filters");
  af.addEventListener("submit", (ev) => { ev.preventDefault(); state.alertFilter = formFilter(af); delete state.alertFilter.verdict; loadAlerts(); });
  af.addEventListener("reset", () => { setTimeout(() => { state.alertFilter = {}; loadAlerts(); }, 0); });
  document.getElementById("alerts-older").addEventListener("click", olderAlerts);
  const ff = document.getElementById("frame-filters");
  ff.addEventListener("submit", (ev) => { ev.preventDefault(); state.framesCursor = []; loadFrames(null); });
  document.getElementById("frames-newest").addEventListener("click", () => { state.framesCursor = []; loadFrames(null); });
  document.getElementById("frames-older").addEventListener("click", () => {
    if (state.framesNext) { state.framesCursor.push(state.framesNext); loadFrames(state.framesNext); }
  });
  resync();
  connect();
  loadFrames(null);
  clock();
  setInterval(clock, 1000);
});
