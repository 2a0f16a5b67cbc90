"""Token sets and admission: which buffered frames and patches may teach the adapter what "normal" is.

The loss labels every real token "normal". Over a buffer that would teach a recurring defect to be normal,
hence `admit` (only confidently normal frames; abnormal-looking patches left out of the loss) and the
validation gate (`tta_gate`). See docs/tta.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pipeline.model.tta_params import MAD_TO_STD, AdmissionRule


@dataclass
class Admission:
    admitted: bool
    reason: str
    """Empty when admitted; otherwise why not, in words."""
    clean: torch.Tensor | None
    """(N,) bool: patches that may be labelled normal (only when admitted)."""
    abnormal_share: float
    rule: str = ""
    """Which rule refused: image_score, image_z, abnormal_patches, non_finite ('' when admitted)."""


def robust_z(values: torch.Tensor, reference: torch.Tensor | None = None) -> torch.Tensor:
    """(values - median) / (1.4826 * MAD) of `reference` (default: the values themselves); robust to outliers."""
    ref = (values if reference is None else reference).float().reshape(-1)
    med = ref.median()
    mad = (ref - med).abs().median() * MAD_TO_STD
    return (values.float() - med) / mad.clamp_min(1e-12)


def admit(
    image_score: float,
    scores: torch.Tensor,
    rule: AdmissionRule,
    image_reference: torch.Tensor | None = None,
) -> Admission:
    """Decide whether a frame enters the buffer and which of its patches may be labelled normal.

    scores: (N,) base-model p(abnormal) of the frame's tokens. image_reference: recent image scores for
    the relative image rule (ignored when fewer than 20).
    """
    s = scores.reshape(-1).float()
    if not (math.isfinite(image_score) and bool(torch.isfinite(s).all())):
        return Admission(False, "non-finite scores", None, 1.0, "non_finite")
    if rule.max_image_score is not None and image_score >= rule.max_image_score:
        return Admission(False, f"image score {image_score:.4g} >= ceiling {rule.max_image_score:.4g}", None,
                         float("nan"), "image_score")
    if rule.image_z is not None and image_reference is not None and image_reference.numel() >= 20:
        z = float(robust_z(torch.tensor([image_score]), image_reference)[0])
        if z >= rule.image_z:
            return Admission(False, f"image score z {z:.2f} >= {rule.image_z} against recent frames", None,
                             float("nan"), "image_z")
    abnormal = robust_z(s) >= rule.patch_z
    share = float(abnormal.float().mean())
    if share > rule.max_abnormal_share:
        return Admission(False, f"{share:.1%} of patches look abnormal (> {rule.max_abnormal_share:.1%})", None,
                         share, "abnormal_patches")
    return Admission(True, "", ~abnormal, share)
