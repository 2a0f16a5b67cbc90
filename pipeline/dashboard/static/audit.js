// Who acknowledged, labelled or commented which alert, when, and what the label was before.
"use strict";

let next = null;

function row(e) {
  const label = e.label ? labelText({ label: e.label, defect_type: e.defect_type }) : "–";
  const before = e.previous_label ? labelText({ label: e.previous_label, defect_type: e.previous_defect_type }) : "–";
  return el("tr", { "data-frame-id": e.frame_id, "data-actor": e.actor, "data-action": e.action },
    el("td", { text: clockTime(e.ts_ms) }), el("td", { text: e.actor }), el("td", { text: e.action }),
    el("td", { text: e.line }),
    el("td", { class: "small" }, el("a", { href: `/alert/${encodeURIComponent(e.frame_id)}`, text: e.frame_id })),
    el("td", { text: label }), el("td", { text: before }), el("td", { text: e.comment || "" }));
}

async function load(older) {
  const d = new FormData(document.getElementById("audit-filters"));
  const q = new URLSearchParams({ count: "100" });
  for (const k of ["line", "frame"]) if ((d.get(k) || "").trim()) q.set(k, d.get(k).trim());
  if (older && next) q.set("before", next);
  let body;
  try { body = await getJSON(`/api/audit?${q}`); } catch (e) {
    const b = document.getElementById("banner");
    b.hidden = false;
    b.textContent = `Could not load the audit: ${e.message}`;
    return;
  }
  const tbody = document.querySelector("#audit tbody");
  const rows = (body.audit || []).map(row);
  if (older) tbody.append(...rows); else tbody.replaceChildren(...rows);
  next = body.audit && body.audit.length >= 100 ? body.next : null;
  document.getElementById("audit-older").disabled = !next;
  document.getElementById("no-audit").hidden = tbody.children.length > 0;
  document.body.dataset.state = "loaded";
}

document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("audit-filters").addEventListener("submit", (ev) => { ev.preventDefault(); load(false); });
  document.getElementById("audit-older").addEventListener("click", () => load(true));
  load(false);
});
