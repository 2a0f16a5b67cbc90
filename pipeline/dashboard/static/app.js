// The live dashboard: a snapshot from /api/snapshot, then server-sent events from /events.
// Pub/sub can lose messages, so every (re)connection re-reads the snapshot, and alerts are always
// fetched from the alerts stream (the reliable path), a live result only says "look now".
"use strict";

const HISTORY = 200;
const ALERTS = 30;
const IMAGE_MIN_INTERVAL_MS = 250;   // per line: at most 4 image refreshes a second
const state = { lines: new Map(), alerts: [], alertIds: new Set(), workers: [], events: 0, resyncs: 0 };
let source = null;
let backoff = 1000;
let fetchingAlerts = null;
let alertsAgain = false;

// --- per-line cards ----------------------------------------------------------------------------
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
  document.getElementById("lines").append(node);
  st = { id, node, latest: null, history: [], threshold: {}, adapter: null, throughput: null,
         lastImageAt: 0, imageTimer: null, shownFrame: null, frameW: 0, frameH: 0 };
  state.lines.set(id, st);
  return st;
}

function renderLine(st) {
  const n = st.node;
  const r = st.latest;
  if (st.classNameText !== undefined) n.querySelector(".class-name").textContent = st.classNameText || "";
  const badge = n.querySelector(".verdict");
  if (!r) {
    badge.textContent = "no frame yet";
    badge.className = "verdict badge";
    delete n.dataset.verdict;
    delete n.dataset.frameId;
  } else {
    const bad = isAnomalous(r);
    badge.textContent = bad ? "ANOMALOUS" : "normal";
    badge.className = "verdict badge " + (bad ? "bad" : "good");
    n.dataset.verdict = bad ? "anomalous" : "normal";
    n.querySelector(".score").textContent = num(r.score);
    n.querySelector(".frame-id").textContent = `frame ${frameOf(r)} · ${ago(timeOf(r))}`;
    n.dataset.frameId = frameOf(r);
  }
  const thr = currentThreshold(st);
  const source = st.threshold && st.threshold.source ? ` (${st.threshold.source})` : "";
  n.querySelector(".threshold").textContent = thr === null ? "–" : num(thr) + source;
  const tp = st.throughput;
  n.querySelector(".fps").textContent = tp ? `${num(tp.fps, 2)} frames/s · ${tp.stream_length} in stream` : "–";
  renderAdapter(st);
  drawChart(n.querySelector(".chart"), st.history, thr);
  scheduleImage(st);
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
  let result = st.latest;
  if (!Array.isArray(result.regions)) {
    try {
      const f = await getJSON(`/api/frames/${encodeURIComponent(id)}?alert=0`);
      if (f.result && frameOf(st.latest) === id) { st.latest = Object.assign({}, f.result, st.latest); result = st.latest; }
    } catch (e) { return; }
  }
  const regs = regionsOf(result);
  if (!regs.length || frameOf(st.latest) !== id) return;
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

// --- score chart (inline SVG) ------------------------------------------------------------------
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
  const t0 = pts[0].ts_ms, t1 = Math.max(pts[pts.length - 1].ts_ms, t0 + 1);
  const x = (t) => L + ((t - t0) / (t1 - t0)) * (W - L - R);
  const y = (v) => T + (1 - (v - lo) / (hi - lo)) * (H - T - B);
  for (const v of [lo + pad, (lo + hi) / 2, hi - pad]) {
    svg.append(svgEl("line", { x1: L, x2: W - R, y1: y(v), y2: y(v), class: "grid" }));
    const t = svgEl("text", { x: L - 4, y: y(v) + 4, class: "axis-label", "text-anchor": "end" });
    t.textContent = v.toFixed(3);
    svg.append(t);
  }
  const span = svgEl("text", { x: L, y: H - 5, class: "axis-label" });
  span.textContent = `${Math.round((t1 - t0) / 1000)} s`;
  svg.append(span);
  const now = svgEl("text", { x: W - R, y: H - 5, class: "axis-label", "text-anchor": "end" });
  now.textContent = "latest";
  svg.append(now);
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
    svg.append(svgEl("circle", { cx: x(p.ts_ms), cy: y(parseFloat(p.score)), r: 3.5, class: "anom-dot" }));
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
  const largest = regs.length ? regs[0] : null;
  const where = largest && Array.isArray(largest.box) ? ` · largest ${largest.area} px at [${largest.box.join(", ")}]` : "";
  const text = el("div", { class: "alert-text" },
    el("div", {}, el("strong", { text: lineOf(a) || "?" }), document.createTextNode(` score ${num(a.score)}`)),
    el("div", { class: "muted", text: `${regs.length} region${regs.length === 1 ? "" : "s"}${where}` }),
    el("div", { class: "muted small", text: `${fid} · ${ago(timeOf(a))}` }));
  const link = el("a", { class: "alert-link", href: `/alert/${encodeURIComponent(fid)}`, title: "open the alert" },
    thumb, text);
  return el("li", { class: "alert-item", "data-frame-id": fid, "data-line": lineOf(a) || "", "data-id": a.id || "" }, link);
}

function addAlerts(list, { replace = false } = {}) {
  if (replace) { state.alerts = []; state.alertIds = new Set(); }
  for (const a of list) {
    const key = a.id || frameOf(a);
    if (state.alertIds.has(key)) continue;
    state.alertIds.add(key);
    state.alerts.push(a);
  }
  state.alerts.sort((p, q) => (p.id < q.id ? 1 : p.id > q.id ? -1 : 0));
  state.alerts = state.alerts.slice(0, ALERTS);
  const ul = document.getElementById("alert-list");
  const existing = new Map([...ul.children].map((li) => [li.dataset.id || li.dataset.frameId, li]));
  const items = state.alerts.map((a) => existing.get(a.id || frameOf(a)) || alertItem(a));
  ul.replaceChildren(...items);
  document.getElementById("no-alerts").hidden = state.alerts.length > 0;
  document.getElementById("alert-count").textContent = state.alerts.length ? `(${state.alerts.length})` : "";
}

// Catch up on the alerts stream after the newest alert we show; coalesces bursts of live events.
async function fetchNewAlerts() {
  if (fetchingAlerts) { alertsAgain = true; return fetchingAlerts; }
  fetchingAlerts = (async () => {
    do {
      alertsAgain = false;
      const newest = state.alerts.length ? state.alerts[0].id : null;
      const url = newest ? `/api/alerts?after=${encodeURIComponent(newest)}&count=${ALERTS}` : `/api/alerts?count=${ALERTS}`;
      try {
        const body = await getJSON(url);
        addAlerts(body.alerts || []);
      } catch (e) { problem(e); break; }
    } while (alertsAgain);
  })();
  try { await fetchingAlerts; } finally { fetchingAlerts = null; }
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
  if (l.threshold) st.threshold = l.threshold;
  if (l.adapter) st.adapter = l.adapter;
  if (l.throughput) st.throughput = l.throughput;
  renderLine(st);
}

async function resync() {
  try {
    const snap = await getJSON("/api/snapshot");
    for (const l of snap.lines) applyLine(l);
    addAlerts(snap.alerts || [], { replace: true });
    renderWorkers(snap.workers);
    setRedis(true);
    state.resyncs += 1;
    document.body.dataset.resyncs = String(state.resyncs);
    hideBanner("snapshot");
  } catch (e) { problem(e); }
}

function onResult(msg) {
  const id = lineOf(msg);
  if (!id) return;
  state.events += 1;
  document.body.dataset.events = String(state.events);
  const st = lineCard(id);
  st.latest = msg;
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
  for (const [id, l] of Object.entries(t.lines || {})) {
    const st = lineCard(id);
    Object.assign(st, { throughput: l.throughput, adapter: l.adapter, threshold: l.threshold });
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
}

function clock() {
  document.getElementById("clock").textContent = new Date().toLocaleTimeString();
  for (const st of state.lines.values()) {
    if (st.latest) st.node.querySelector(".frame-id").textContent = `frame ${frameOf(st.latest)} · ${ago(timeOf(st.latest))}`;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  resync();
  connect();
  clock();
  setInterval(clock, 1000);
});
