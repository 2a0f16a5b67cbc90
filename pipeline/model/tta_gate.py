"""The validation gate of buffered TTA: a candidate adapter checked on held-out frames and labelled positives.

Refusals: non-finite values, flipped confident verdicts, collapsed score spread, pixel AUROC and contrast
on labelled positives against the serving version; never passed unchecked. `calibrate_thresholds` gives
the candidate its own pixel threshold on the held-out frames. See docs/tta.md.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from pipeline.model.text import TextFeatures
from pipeline.model.tta_admission import robust_z
from pipeline.model.tta_params import MAD_TO_STD, GateRule
from pipeline.model.tta_scoring import MapFn, TokenAdapterFn, grid_map_fn, patch_scores

if TYPE_CHECKING:
    from pipeline.model.tta_train import TokenSet  # tta_train runs the gate


@dataclass
class GateResult:
    accepted: bool
    reasons: list[str]
    figures: dict[str, float]


def _quantiles(s: torch.Tensor) -> dict[str, float]:
    q = torch.tensor([0.5, 0.99, 0.999])
    sample = s if s.numel() <= 1_000_000 else s[torch.linspace(0, s.numel() - 1, 1_000_000).long()]
    v = torch.quantile(sample.double(), q.double()).tolist()
    return {"p50": v[0], "p99": v[1], "p999": v[2]}


@dataclass
class GateFrame:
    """A frame the gate judges with a known mask ("known", not "labelled": most are synthetic): a synthetic defect
    pasted into a held-out frame, an operator-confirmed defect with the mask the operator endorsed, or an
    operator's false alarm (an all-normal mask). Its tokens come from the base model."""

    tokens: torch.Tensor
    """Raw tokens of the frame as scored, e.g. (n_tiles, n_layers, P, C)."""
    mask: torch.Tensor
    """(h, w) bool at the model input size: True = a known abnormal pixel."""
    source: str = "synthetic"
    """synthetic | operator | false_alarm: where the mask comes from."""

    @property
    def input_hw(self) -> tuple[int, int]:
        return int(self.mask.shape[0]), int(self.mask.shape[1])


_MAX_AUROC_PIXELS = 2_000_000


def pixel_auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """ROC AUC of `scores` against boolean `labels` (ties count half); NaN when one class is absent."""
    s = scores.reshape(-1).double()
    y = labels.reshape(-1).bool()
    n_pos = int(y.sum())
    n_neg = int(y.numel()) - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    order = torch.argsort(s)
    _, inverse, counts = torch.unique_consecutive(s[order], return_inverse=True, return_counts=True)
    avg_rank = counts.cumsum(0).double() - (counts.double() - 1) / 2  # 1-based mean rank of each tie group
    ranks = torch.empty_like(s)
    ranks[order] = avg_rank[inverse]
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _labelled_maps(
    adapter: TokenAdapterFn | None, positives: Sequence[GateFrame], map_fn: MapFn
) -> tuple[torch.Tensor, torch.Tensor]:
    """All pixels of the labelled frames under `adapter`: (scores, labels), at most ~2M (even stride)."""
    scores, labels = [], []
    for f in positives:
        m = map_fn(f.tokens, f.input_hw, adapter).float().cpu()
        if tuple(m.shape) != f.input_hw:
            raise ValueError(f"map of shape {tuple(m.shape)} for a mask of {f.input_hw}")
        scores.append(m.reshape(-1))
        labels.append(f.mask.reshape(-1).bool().cpu())
    s, y = torch.cat(scores), torch.cat(labels)
    if s.numel() > _MAX_AUROC_PIXELS:
        keep = torch.arange(0, s.numel(), math.ceil(s.numel() / _MAX_AUROC_PIXELS))
        s, y = s[keep], y[keep]
    return s, y


def _contrast(s: torch.Tensor, y: torch.Tensor) -> float:
    """Median p(abnormal) of the labelled-abnormal pixels minus the median of the others."""
    return float(s[y].median() - s[~y].median())


def validate_adapter(
    candidate: TokenAdapterFn,
    val: TokenSet,
    text: TextFeatures,
    rule: GateRule | None = None,
    *,
    temperature: float = 1.0,
    serving: TokenAdapterFn | None = None,
    positives: Sequence[GateFrame] = (),
    map_fn: MapFn | None = None,
) -> GateResult:
    """Check a candidate on held-out frames and labelled positives; refuse it with reasons if it is unsafe.

    Refusals: non-finite outputs; the spread of p(abnormal) on the held-out frames collapsing against the
    base model's; more than `max_flip_share` of confidently abnormal patches (base z >= confident_z) no
    longer standing out (candidate z < normal_z), or of confidently normal patches (base z <= normal_z)
    becoming confidently abnormal; on the labelled positives (`positives`, e.g. synthetic defects pasted
    into held-out frames), a pixel AUROC below the serving version's (`serving`, None = the base model)
    minus `auroc_margin`, or a contrast below `min_contrast_ratio` of the serving version's (every pixel
    shifted towards one side); and a candidate with nothing abnormal to judge it on (fewer than
    `min_confident` confidently abnormal patches and no labelled positives) is refused, never passed.
    """
    r = rule or GateRule()
    base = patch_scores(val.tokens, text, None, temperature)
    cand = patch_scores(val.tokens, text, candidate, temperature)
    reasons: list[str] = []
    figures: dict[str, float] = {"tokens": float(val.n_tokens), "frames": float(val.n_frames)}
    finite = bool(torch.isfinite(cand).all())
    figures["finite"] = float(finite)
    if not finite:
        reasons.append("the candidate produces non-finite scores")
        return GateResult(False, reasons, figures)
    base_sd, cand_sd = float(base.std()), float(cand.std())
    ratio = cand_sd / base_sd if base_sd > 0 else (1.0 if cand_sd == 0 else math.inf)
    figures.update({"base_sd": base_sd, "candidate_sd": cand_sd, "spread_ratio": ratio})
    if ratio < r.min_spread_ratio:
        reasons.append(f"score spread collapsed: SD {cand_sd:.3g} is {ratio:.2f}x the base model's "
                       f"(< {r.min_spread_ratio})")
    base_mad = float((base - base.median()).abs().median()) * MAD_TO_STD
    figures["normal_shift_z"] = float(cand.median() - base.median()) / max(base_mad, 1e-12)
    z0, z1 = robust_z(base), robust_z(cand)
    conf_abn, conf_norm = z0 >= r.confident_z, z0 <= r.normal_z
    n_abn, n_norm = int(conf_abn.sum()), int(conf_norm.sum())
    flip_abn = float((z1[conf_abn] < r.normal_z).float().mean()) if n_abn else 0.0
    flip_norm = float((z1[conf_norm] >= r.confident_z).float().mean()) if n_norm else 0.0
    figures.update({"confident_abnormal": float(n_abn), "abnormal_flip_share": flip_abn,
                    "confident_normal": float(n_norm), "normal_flip_share": flip_norm})
    if n_abn >= r.min_confident and flip_abn > r.max_flip_share:
        reasons.append(f"{flip_abn:.1%} of {n_abn} confidently abnormal patches no longer stand out "
                       f"(> {r.max_flip_share:.0%}): the candidate learned them as normal")
    if n_norm >= r.min_confident and flip_norm > r.max_flip_share:
        reasons.append(f"{flip_norm:.1%} of {n_norm} confidently normal patches became abnormal "
                       f"(> {r.max_flip_share:.0%})")
    n_labelled = 0
    if positives:
        fn = map_fn or grid_map_fn(text, temperature)
        sc, y = _labelled_maps(candidate, positives, fn)
        ss, _ = _labelled_maps(serving, positives, fn)
        n_labelled = int(y.sum())
        figures.update({"labelled_frames": float(len(positives)), "labelled_pixels": float(n_labelled),
                        "operator_frames": float(sum(f.source == "operator" for f in positives))})
        if not bool(torch.isfinite(sc).all()):
            reasons.append("the candidate produces non-finite maps on the labelled frames")
            return GateResult(False, reasons, figures)
        if n_labelled and n_labelled < y.numel():
            auc_c, auc_s = pixel_auroc(sc, y), pixel_auroc(ss, y)
            con_c, con_s = _contrast(sc, y), _contrast(ss, y)
            figures.update({"pixel_auroc_candidate": auc_c, "pixel_auroc_serving": auc_s,
                            "contrast_candidate": con_c, "contrast_serving": con_s,
                            "contrast_ratio": con_c / con_s if con_s > 0 else math.nan})
            if auc_c < auc_s - r.auroc_margin:
                reasons.append(f"pixel AUROC on {len(positives)} labelled frames fell to {auc_c:.3f} from the "
                               f"serving version's {auc_s:.3f} (margin {r.auroc_margin})")
            if r.min_contrast_ratio > 0 and con_s > 0 and con_c < r.min_contrast_ratio * con_s:
                reasons.append(f"contrast of the labelled defects collapsed: {con_c:.3g} vs the serving version's "
                               f"{con_s:.3g} (< {r.min_contrast_ratio}x): every pixel shifted towards one side")
    if n_abn < r.min_confident and n_labelled < r.min_confident:
        reasons.append(f"nothing abnormal to validate against: {n_abn} confidently abnormal patches and "
                       f"{n_labelled} labelled abnormal pixels (need {r.min_confident}); a candidate is never "
                       "promoted unchecked")
    for name, sv in (("base", base), ("candidate", cand)):
        for k, v in _quantiles(sv).items():
            figures[f"{name}_{k}"] = v
    return GateResult(not reasons, reasons, figures)


_CALIBRATION_PIXELS = 4096
"""Pixels sampled per held-out frame for the pixel threshold (enough for a 0.999 quantile over many frames)."""
_CALIBRATION_FRAMES = 64
"""The newest held-out frames the pixel threshold is calibrated on: 262k sampled pixels, ~260 above a 0.999
quantile; a map costs about a tenth of a frame's scoring, so all 200 of a 1,000-frame refresh would add ~2%."""


def calibrate_thresholds(
    adapter: TokenAdapterFn | None,
    val: TokenSet,
    map_fn: MapFn,
    *,
    quantile: float = 0.99,
    pixel_quantile: float = 0.999,
    image_changes: bool = False,
    seed: int = 0,
) -> dict[str, Any]:
    """The thresholds a version carries, calibrated on held-out normal frames (as the line calibrates its own).

    pixel: the `pixel_quantile` of the version's map pixels on the newest (at most 64) frames of `val`;
    pixel_median colours heatmaps.
    image: the `quantile` of the held-out image scores when the version changes image scores
    (`image_changes`); an adapter never does, and admission truncates the held-out image scores (a
    recalibrated image threshold would be biased low), so for adapters it is None (the line's applies)
    and the held-out quantile is kept as `image_heldout` for the record.
    """
    g = torch.Generator().manual_seed(seed)
    samples = []
    first = max(0, val.n_frames - _CALIBRATION_FRAMES)
    for i in range(first, val.n_frames):
        hw = val.input_hw[i] if val.input_hw else None
        m = map_fn(val.frame(i), hw, adapter).float().reshape(-1).cpu()
        if m.numel() > _CALIBRATION_PIXELS:
            m = m[torch.randint(0, m.numel(), (_CALIBRATION_PIXELS,), generator=g)]
        samples.append(m)
    px = torch.cat(samples).double()
    qs = torch.quantile(px, torch.tensor([pixel_quantile, 0.5], dtype=torch.float64)).tolist()
    scores = torch.tensor([v for v in (val.image_scores or []) if math.isfinite(v)], dtype=torch.float64)
    heldout = float(torch.quantile(scores, quantile)) if scores.numel() else None
    return {"pixel": qs[0], "pixel_median": qs[1], "image": heldout if image_changes else None,
            "image_heldout": heldout, "frames": val.n_frames - first, "quantile": quantile,
            "pixel_quantile": pixel_quantile}
