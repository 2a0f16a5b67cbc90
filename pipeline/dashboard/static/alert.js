// One alert, full size: the frame with outline and region boxes, the mask and the heatmap.
"use strict";

function fact(dl, name, value) {
  dl.append(el("dt", { text: name }), el("dd", { text: value === undefined || value === null ? "–" : String(value) }));
}

async function loadAlert() {
  const fid = decodeURIComponent(location.pathname.replace(/^\/alert\//, ""));
  document.getElementById("alert-title").textContent = fid;
  document.title = `anoclip · alert ${fid}`;
  let frame;
  try {
    frame = await getJSON(`/api/frames/${encodeURIComponent(fid)}`);
  } catch (e) {
    const b = document.getElementById("banner");
    b.hidden = false;
    b.textContent = e.status === 404 ? `Frame ${fid} is no longer in Redis (its TTL ran out) or was never published.`
      : `Could not load the alert: ${e.message}`;
    document.body.dataset.state = "missing";
    return;
  }
  const r = frame.result || {};
  const a = frame.alert || {};
  const merged = Object.assign({}, a, r);
  const regs = regionsOf(r).length ? regionsOf(r) : regionsOf(a);
  const dl = document.getElementById("alert-facts");
  fact(dl, "line", lineOf(merged));
  fact(dl, "verdict", isAnomalous(merged) ? "anomalous" : "normal");
  fact(dl, "score", num(merged.score));
  fact(dl, "threshold", num(merged.threshold));
  fact(dl, "adapter", merged.adapter_version || "base model");
  fact(dl, "when", new Date(timeOf(merged)).toLocaleString());
  fact(dl, "regions", regs.length);
  fact(dl, "kept in Redis for", frame.ttl_s > 0 ? `${Math.round(frame.ttl_s / 3600)} h more` : "–");

  const b = frame.blobs || {};
  const full = document.getElementById("full-frame");
  full.addEventListener("load", () => {
    drawBoxes(document.getElementById("full-boxes"), regs, full.naturalWidth, full.naturalHeight);
    document.body.dataset.state = "loaded";
  });
  full.src = imgUrl("frame", fid, b.image ? "image" : "heatmap");
  if (b.mask) {
    document.getElementById("full-outline").src = imgUrl("frame", fid, "outline");
    document.getElementById("full-mask").src = imgUrl("frame", fid, "mask");
  }
  if (b.heatmap) document.getElementById("full-heatmap").src = imgUrl("frame", fid, "heatmap");

  const tbody = document.querySelector("#regions tbody");
  tbody.replaceChildren(...regs.map((reg, i) => el("tr", { "data-region": i },
    el("td", { text: i + 1 }), el("td", { text: reg.area }),
    el("td", { text: Array.isArray(reg.box) ? `[${reg.box.join(", ")}]` : "–" }),
    el("td", { text: reg.peak === undefined ? "–" : num(reg.peak) }))));
  document.getElementById("raw").textContent = JSON.stringify({ result: frame.result, alert: frame.alert }, null, 2);
}

document.addEventListener("DOMContentLoaded", loadAlert);
