"""The bank gate: the worker's check of a candidate bank (`gate_bank`) on held-out frames with synthetic defects
pasted in (`make_positives`) against the serving bank or mutual scoring (docs/memory.md, *The bank gate*)."""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.adaptation.memory.bank import MemoryBank
from pipeline.adaptation.memory.params import MemoryParams
from pipeline.adaptation.memory.records import FrameRecord, frame_record, kept_rows, score_frames
from pipeline.adaptation.memory.scoring import BankScorer, mutual_raw, score_mutual
from pipeline.adaptation.memory.stream import BuildJob, HeldOut
from pipeline.adaptation.synthetic import paste_positives
from pipeline.inspection.frame_scorer import FrameScorer, RawScore
from pipeline.model.tta_gate import GateResult, pixel_auroc

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BankGateRule:
    """When a candidate bank is refused (`gate_bank`)."""

    auroc_margin: float = 0.05
    """Refuse if its pixel AUROC on the pasted positives is below the serving reference's minus this."""
    max_normal_z: float = 1.0
    """Refuse if the held-out normal frames' median memory z lies farther than this from 0."""

    @classmethod
    def from_params(cls, p: MemoryParams) -> BankGateRule:
        return cls(p.gate_auroc_margin, p.gate_max_normal_z)


@dataclass
class BankPositive:
    """A labelled frame of the bank gate: a synthetic defect pasted into a held-out frame, scored by the model."""

    raw: RawScore
    record: FrameRecord
    mask: torch.Tensor
    """(h, w) bool at the model input size: True = the pasted defect."""
    source_frame: str
    """The held-out frame it was pasted into (left out of a mutual reference, as a new frame is)."""


def _mask_at(mask: np.ndarray, hw: tuple[int, int]) -> torch.Tensor:
    m = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None, None]
    if tuple(m.shape[-2:]) != tuple(hw):
        m = F.interpolate(m, size=tuple(hw), mode="nearest")
    return m[0, 0] > 0.5


POSITIVE_KIND = "perlin"
"""The bank gate pastes foreign-texture blobs only. A patch memory is location-blind: a CutPaste rectangle of the
frame's own material is, inside its rim, normal patches at another place, which a bank rightly matches (measured,
tiny test model, wood: pixel AUROC 0.08-0.99 per CutPaste frame against a bank of normal frames, 0.55-0.96 per
Perlin frame); such labels would measure chance, not the bank."""


def make_positives(
    inspector: FrameScorer, line_id: str, held: Sequence[HeldOut], params: MemoryParams
) -> list[BankPositive]:
    """One synthetic defect (`synthetic_anomaly`, a Perlin-masked foreign texture: `POSITIVE_KIND`; deterministic
    in the frame id) pasted into each held-out frame that kept its image, scored by the model (base weights, no
    TTA): one forward per frame."""
    pasted = paste_positives([(h.record.frame_id, h.image) for h in held if h.image is not None], params.seed,
                             POSITIVE_KIND)
    if not pasted:  # no image kept (or one too small to paste into)
        return []
    raws = score_frames(inspector, line_id, [a.image for _, a in pasted], params)
    grid = inspector.model.grid_size
    out = []
    for (fid, a), r in zip(pasted, raws, strict=True):
        rec = frame_record(r, f"{fid}#{a.kind}", params, grid)
        out.append(BankPositive(dataclasses.replace(r, hidden=None, image=None), rec, _mask_at(a.mask, r.input_hw),
                                fid))
    return out


def normal_median_z(bank: MemoryBank, normals: Sequence[FrameRecord]) -> float:
    """Median memory z, under `bank`'s scales, of the admitted patches of frames not in it (NaN: none)."""
    zs = [bank.scales.memory.z(bank.distances(q)) for q in (kept_rows(r) for r in normals) if q.shape[0]]
    return float(torch.cat(zs).median()) if zs else math.nan


def _mutual_median_z(normals: Sequence[FrameRecord], window: Sequence[FrameRecord], share: float) -> float:
    zs = []
    for r in normals:
        ref = [w for w in window if w.frame_id != r.frame_id]
        if not ref:
            continue
        m, scale = mutual_raw(r, ref, share)
        flat = m.reshape(-1)
        zs.append(scale.z(flat if r.keep is None else flat[r.keep.reshape(-1)]))
    return float(torch.cat(zs).median()) if zs else math.nan


def gate_bank(
    candidate: MemoryBank,
    serving: MemoryBank | None,
    normals: Sequence[FrameRecord],
    positives: Sequence[BankPositive],
    scorer: BankScorer,
    rule: BankGateRule | None = None,
    *,
    window: Sequence[FrameRecord] = (),
) -> GateResult:
    """Judge a candidate bank on frames it has never seen; refuse it, with reasons, if it is unsafe.

    `normals`: held-out admitted frames (the newest of the build, kept out of the bank and its calibration);
    `positives`: synthetic defects pasted into them (`make_positives`). The reference is the serving bank, or,
    before the line has one, what serves it now: mutual scoring against `window` (the line's last frames, without
    the positive's own source frame; an empty window leaves the zero-shot map). Refusals:

    * pixel AUROC of the fused map on the positives below the reference's minus `auroc_margin` (the candidate
      learned something like the pasted defects as normal, or lost coverage);
    * the normals' median memory z farther than `max_normal_z` from 0: a bank's scales promise that a new normal
      patch sits at z ~ 0; far above, normal frames raise alarms; far below, the scale widened until defects
      look normal too (AUROC alone misses that: it does not see where the threshold falls).
    """
    r = rule or BankGateRule()
    reasons: list[str] = []
    figures: dict[str, Any] = {"holdout_frames": len(normals), "positives": len(positives),
                               "reference": f"bank:{serving.version}" if serving is not None else "mutual"}
    med_c = normal_median_z(candidate, normals)
    med_s = normal_median_z(serving, normals) if serving is not None else _mutual_median_z(
        normals, window, scorer.params.mutual_share)
    figures.update({"normal_median_z_candidate": med_c, "normal_median_z_serving": med_s})
    if not math.isfinite(med_c) and normals:
        reasons.append("the held-out normal frames have no admitted patch to judge the candidate on")
    elif abs(med_c) > r.max_normal_z:
        what = "normal frames look abnormal" if med_c > 0 else "everything looks normal"
        reasons.append(f"held-out normal frames' median z is {med_c:+.2f} under the candidate (bound "
                       f"±{r.max_normal_z}): {what}")
    if positives:
        raws, recs = [p.raw for p in positives], [p.record for p in positives]
        y = torch.cat([p.mask.reshape(-1) for p in positives])
        cand = torch.cat([m.anomaly_map.reshape(-1) for m in scorer.with_bank_batch(raws, recs, candidate)])
        if serving is not None:
            ref_maps = [m.anomaly_map for m in scorer.with_bank_batch(raws, recs, serving)]
        else:
            ref_maps = [score_mutual(scorer, p.raw, p.record, [w for w in window if w.frame_id != p.source_frame])
                        .anomaly_map for p in positives]
        ref = torch.cat([m.reshape(-1) for m in ref_maps])
        auc_c, auc_s = pixel_auroc(cand, y), pixel_auroc(ref, y)
        figures.update({"labelled_pixels": int(y.sum()), "pixel_auroc_candidate": auc_c,
                        "pixel_auroc_serving": auc_s})
        if not bool(torch.isfinite(cand).all()):
            reasons.append("the candidate produces non-finite maps on the pasted positives")
        elif math.isfinite(auc_c) and math.isfinite(auc_s) and auc_c < auc_s - r.auroc_margin:
            reasons.append(f"pixel AUROC on {len(positives)} pasted positives fell to {auc_c:.3f} from the "
                           f"{figures['reference']} reference's {auc_s:.3f} (margin {r.auroc_margin})")
    return GateResult(not reasons, reasons, figures)


def gate_build(inspector: FrameScorer, line_id: str, job: BuildJob, bank: MemoryBank, params: MemoryParams,
               scorer: BankScorer) -> tuple[dict[str, Any], str | None]:
    """The bank gate of one build (`gate_bank` on the job's held-out frames, a synthetic defect pasted into each):
    (figures for the audit, None) when the candidate passes, (figures, the refusal) when it does not."""
    if not job.holdout:
        why = ("off (memory.gate_holdout_frames: 0)" if params.gate_holdout_frames == 0
               else f"skipped: a build of {job.frames} admitted frames is too small to hold any out")
        return {"gate": why}, None
    positives = make_positives(inspector, line_id, job.holdout, params)
    result = gate_bank(bank, job.parent, [h.record for h in job.holdout], positives, scorer,
                       BankGateRule.from_params(params), window=job.window)
    figures: dict[str, Any] = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                               for k, v in result.figures.items()}
    figures["holdout_ids"] = [h.record.frame_id for h in job.holdout]
    if not positives:
        log.warning("line %s: no held-out frame kept its image: the bank gate judged normals only", line_id)
    return figures, (None if result.accepted else "; ".join(result.reasons))
