// One alert, full size: the frame with outline and region boxes, the mask and the heatmap; and the
// operator's part: acknowledge, label (confirmed defect with a type / false alarm / unsure), comment.
"use strict";

let frameId = "";

function fact(dl, name, value) {
  dl.append(el("dt", { text: name }), el("dd", { text: value === undefined || value === null ? "–" : String(value) }));
}

function banner(text) {
  const b = document.getElementById("banner");
  b.hidden = !text;
  b.textContent = text || "";
}

// Region position in words, as the server describes the largest one (thirds of the frame).
function where(box, w, h) {
  if (!Array.isArray(box) || !w || !h) return "–";
  const cx = (box[0] + box[2]) / 2 / w, cy = (box[1] + box[3]) / 2 / h;
  const row = cy < 1 / 3 ? "upper" : cy > 2 / 3 ? "lower" : "middle";
  const col = cx < 1 / 3 ? "left" : cx > 2 / 3 ? "right" : "centre";
  return row === "middle" && col === "centre" ? "centre" : `${row} ${col}`;
}

function renderLabel(lab, audit) {
  const st = document.getElementById("label-status");
  const parts = [];
  if (lab && lab.acknowledged) parts.push(`acknowledged by ${lab.acknowledged_by} at ${clockTime(lab.acknowledged_ms)}`);
  if (lab && lab.label) parts.push(`labelled ${labelText(lab)} by ${lab.labelled_by} at ${clockTime(lab.labelled_ms)}`);
  if (lab && lab.comment) parts.push(`last comment by ${lab.commented_by}: “${lab.comment}”`);
  st.textContent = parts.length ? parts.join(" · ") : "Nobody has acknowledged this alert yet.";
  document.body.dataset.label = labelKind(lab);
  document.getElementById("ack").disabled = !!(lab && lab.acknowledged);
  if (lab && lab.label) {
    const radio = document.querySelector(`input[name="label"][value="${lab.label}"]`);
    if (radio) radio.checked = true;
    document.getElementById("defect-type").value = lab.defect_type || "";
    document.getElementById("mask-is-defect").checked = !!lab.mask_is_defect;
  }
  const ul = document.getElementById("label-history");
  ul.replaceChildren(...(audit || []).map((e) => {
    let what = e.action;
    if (e.action === "label") {
      what = `labelled ${labelText({ label: e.label, defect_type: e.defect_type })}`;
      if (e.previous_label) what += ` (was ${labelText({ label: e.previous_label, defect_type: e.previous_defect_type })})`;
    } else if (e.action === "acknowledge") what = "acknowledged";
    else if (e.action === "comment") what = `commented “${e.comment}”`;
    return el("li", { "data-action": e.action, "data-actor": e.actor, text: `${clockTime(e.ts_ms)} · ${e.actor} ${what}` });
  }));
}

async function act(body) {
  try {
    const out = await postJSON(`/api/labels/${encodeURIComponent(frameId)}`, body);
    banner("");
    renderLabel(out.label, out.audit);
    return true;
  } catch (e) {
    banner(`Could not save: ${e.message}`);
    return false;
  }
}

async function loadSession() {
  try {
    const s = await getJSON("/api/session");
    document.getElementById("who").textContent = `as ${s.identity}`;
    document.getElementById("defect-types").replaceChildren(...(s.defect_types || []).map((t) => el("option", { value: t })));
  } catch (e) { /* labelling still works; the names just are not offered */ }
}

async function loadAlert() {
  frameId = decodeURIComponent(location.pathname.replace(/^\/alert\//, ""));
  const fid = frameId;
  document.getElementById("alert-title").textContent = fid;
  document.title = `anoclip · alert ${fid}`;
  let frame;
  try {
    frame = await getJSON(`/api/frames/${encodeURIComponent(fid)}`);
  } catch (e) {
    banner(e.status === 404 ? `Frame ${fid} is no longer in Redis (its TTL ran out) or was never published.`
      : `Could not load the alert: ${e.message}`);
    document.body.dataset.state = "missing";
    return;
  }
  const r = frame.result || {};
  const a = frame.alert || {};
  const lab = frame.label || {};
  const merged = Object.assign({}, lab, a, r);
  const regs = regionsOf(r).length ? regionsOf(r) : regionsOf(a);
  const dl = document.getElementById("alert-facts");
  fact(dl, "line", lineOf(merged));
  fact(dl, "camera", merged.camera || "–");
  fact(dl, "verdict", isAnomalous(merged) || lab.label ? "anomalous" : "normal");
  fact(dl, "score", num(merged.score));
  fact(dl, "threshold", num(merged.threshold));
  fact(dl, "adapter", merged.adapter_version || "base model");
  fact(dl, "memory bank", merged.bank_version || "none");
  const known = merged.ts_ms || merged.published_ts || merged.capture_ts;
  fact(dl, "when", new Date(timeOf(known ? merged : { ts_ms: lab.alert_ts_ms })).toLocaleString());
  fact(dl, "regions", frame.region_text || regs.length);
  fact(dl, "kept in Redis for", frame.ttl_s > 0 ? `${Math.round(frame.ttl_s / 3600)} h more` : "kept with its label");
  if (frame.verdict_note) {
    const note = document.getElementById("alert-note");
    note.hidden = false;
    note.textContent = `Note: ${frame.verdict_note}. The image score decides the verdict; the mask only shows where.`;
  }
  document.getElementById("region-text").textContent = frame.region_text ? `· ${frame.region_text}` : "";
  renderLabel(frame.label, frame.audit);

  const b = frame.blobs || {};
  const full = document.getElementById("full-frame");
  full.addEventListener("load", () => {
    drawBoxes(document.getElementById("full-boxes"), regs, full.naturalWidth, full.naturalHeight);
    document.body.dataset.state = "loaded";
  });
  full.src = imgUrl("frame", fid, b.image || lab.has_image ? "image" : "heatmap");
  if (b.mask || lab.has_mask) {
    document.getElementById("full-outline").src = imgUrl("frame", fid, "outline");
    document.getElementById("full-mask").src = imgUrl("frame", fid, "mask");
  }
  if (b.heatmap) document.getElementById("full-heatmap").src = imgUrl("frame", fid, "heatmap");

  const W = merged.width, H = merged.height;
  const tbody = document.querySelector("#regions tbody");
  tbody.replaceChildren(...regs.map((reg, i) => el("tr", { "data-region": i },
    el("td", { text: i + 1 }),
    el("td", { text: W && H ? `${(100 * reg.area / (W * H)).toFixed(1)}% (${reg.area} px)` : `${reg.area} px` }),
    el("td", { text: where(reg.box, W, H) }),
    el("td", { text: Array.isArray(reg.box) ? `[${reg.box.join(", ")}]` : "–" }),
    el("td", { text: reg.peak === undefined ? "–" : num(reg.peak) }))));
  document.getElementById("raw").textContent = JSON.stringify({ result: frame.result, alert: frame.alert }, null, 2);
}

document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("ack").addEventListener("click", () => act({ action: "acknowledge" }));
  document.getElementById("label-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const chosen = document.querySelector('input[name="label"]:checked');
    if (!chosen) { banner("Choose confirmed defect, false alarm or unsure first."); return; }
    const body = { action: "label", label: chosen.value };
    if (chosen.value === "confirmed") {
      body.defect_type = document.getElementById("defect-type").value.trim();
      body.mask_is_defect = document.getElementById("mask-is-defect").checked;
    }
    act(body);
  });
  document.getElementById("comment-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const box = document.getElementById("comment");
    if (await act({ action: "comment", comment: box.value })) box.value = "";
  });
  loadSession();
  loadAlert();
});
