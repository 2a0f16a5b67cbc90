"""The validation gate's and the adapter files' refusals that had no test (issue 14, item 1):

- "confidently normal patches became abnormal" (the mirror of the learned-defect refusal);
- a training run whose loss turns non-finite is refused without validating the candidate;
- adapter bytes holding non-finite tensors are refused on load.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.adaptation.tta.files import AdapterTarget, build_meta, from_bytes, to_bytes
from pipeline.errors import AdapterMismatchError
from pipeline.model.adapters import create_adapter
from pipeline.model.text import TextFeatures
from pipeline.model.tta_gate import validate_adapter
from pipeline.model.tta_params import BufferedBudget, GateRule, TTAParams
from pipeline.model.tta_train import TokenSet, refresh_adapter

C, P = 32, 64

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Line:
    """Synthetic tokens: normal ones around a mean, and a direction the text features call abnormal."""

    def __init__(self, seed: int = 0) -> None:
        g = self.g = torch.Generator().manual_seed(seed)
        tn, ta = (F.normalize(torch.randn(C, generator=g), dim=-1) for _ in range(2))
        sentences = lambda t: F.normalize(t + 0.5 * torch.randn(20, C, generator=g) / C**0.5, dim=-1)  # noqa: E731
        self.text = TextFeatures(torch.stack([tn, ta]), sentences(tn), sentences(ta))
        self.mean = 3 * F.normalize(torch.randn(C, generator=g), dim=-1)
        self.defect = 3 * F.normalize(ta - tn, dim=-1)

    def frames(self, n: int, defective: int = 0) -> list[torch.Tensor]:
        """n frames; the first `defective` carry the abnormal direction on their first 12 patches."""
        out = [self.mean + 0.3 * torch.randn(P, C, generator=self.g) for _ in range(n)]
        for f in out[:defective]:
            f[:12] += self.defect
        return out


@pytest.fixture(scope="module")
def line() -> Line:
    return Line()


def test_gate_refuses_a_candidate_that_makes_confidently_normal_patches_abnormal(line: Line) -> None:
    val = TokenSet.from_frames(line.frames(10, defective=2))  # real defects, so the gate has something to judge
    rows = torch.arange(val.n_tokens)
    normal_rows = torch.ones(val.n_tokens, dtype=torch.bool)
    normal_rows[:12] = normal_rows[P : P + 12] = False
    rows = torch.where(normal_rows, rows, -1)  # the defects themselves are never touched (-1 % k != 0)

    def paints_defects(share_every: int):
        def candidate(x: torch.Tensor) -> torch.Tensor:
            # every `share_every`-th token is pushed along the abnormal direction: a clean part now "has defects"
            return x + 2 * line.defect * (rows[: x.shape[0]] % share_every == 0).float()[:, None]

        return candidate

    flipped = "confidently normal patches became abnormal"
    base = validate_adapter(lambda x: x, val, line.text)
    assert base.figures["confident_abnormal"] >= 20 and base.figures["normal_flip_share"] == 0.0
    assert not any(flipped in r for r in base.reasons)
    bad = validate_adapter(paints_defects(3), val, line.text)  # a third of the normal patches flip
    assert not bad.accepted
    assert (f"{bad.figures['normal_flip_share']:.1%} of {int(bad.figures['confident_normal'])} confidently normal "
            "patches became abnormal (> 20%)") in bad.reasons
    assert 0.25 < bad.figures["normal_flip_share"] < 0.4 and bad.figures["confident_normal"] >= 10
    assert bad.figures["abnormal_flip_share"] <= 0.2, "it is the normal side that flipped"

    # the threshold is a share: one patch in ten painted (~10% flips) stays under the 20% limit
    few = validate_adapter(paints_defects(10), val, line.text)
    assert 0.05 < few.figures["normal_flip_share"] < 0.2 and not any(flipped in r for r in few.reasons)
    # and the rule's knob is the one that decides
    strict = validate_adapter(paints_defects(10), val, line.text, GateRule(max_flip_share=0.05))
    assert not strict.accepted and any(flipped in r for r in strict.reasons)
    # fewer confident patches than min_confident: the flip share is not judged
    lax = validate_adapter(paints_defects(3), val, line.text, GateRule(min_confident=10**6))
    assert not any(flipped in r for r in lax.reasons)


def test_a_training_run_whose_loss_turns_non_finite_is_refused_without_validation(line: Line) -> None:
    frames = line.frames(12)
    for f in frames:
        f[7] = float("nan")  # a corrupt token in every frame: any minibatch holding one has a NaN loss
    ts = TokenSet.from_frames(frames)
    budget = BufferedBudget(max_steps=20, max_seconds=60.0, batch_tokens=ts.n_tokens)  # every step sees it all
    adapter, report = refresh_adapter(ts, line.text, "text", TTAParams(seed=0), budget, GateRule(),
                                      holdout=0.25, min_frames=4)
    assert not report.accepted and adapter is not None
    assert report.reasons == ["training produced a non-finite loss"]
    assert report.stopped_by == "non-finite" and report.steps == 0 and math.isnan(report.losses[-1])
    assert report.validation == {"finite": 0.0}, "the gate did not run on a broken candidate"

    # control: the same set without the corrupt token trains its full budget and reaches the gate
    clean = TokenSet.from_frames(line.frames(12, defective=12))
    _, ok = refresh_adapter(clean, line.text, "text", TTAParams(seed=0), budget, GateRule(), holdout=0.25,
                            min_frames=4)
    assert ok.steps == 20 and ok.stopped_by == "steps" and ok.validation["finite"] == 1.0
    assert "training produced a non-finite loss" not in ok.reasons


def test_a_loss_that_explodes_mid_run_stops_training_there(line: Line) -> None:
    ts = TokenSet.from_frames(line.frames(12))
    budget = BufferedBudget(max_steps=20, max_seconds=60.0, batch_tokens=256)
    _, report = refresh_adapter(ts, line.text, "linear", TTAParams(lr=float("inf")), budget, GateRule(),
                                holdout=0.25, min_frames=4)
    assert report.stopped_by == "non-finite" and report.reasons == ["training produced a non-finite loss"]
    assert report.steps >= 1 and len(report.losses) == report.steps + 1, "finite steps, then the NaN one"


@pytest.mark.parametrize(("name", "value"), [("weight", float("nan")), ("bias", float("inf")),
                                             ("weight", float("-inf"))])
def test_adapter_bytes_with_non_finite_tensors_are_refused(line: Line, name: str, value: float) -> None:
    adapter = create_adapter("text", line.text, 0.5, generator=torch.Generator().manual_seed(0))
    target = AdapterTarget("anoclip-tiny", "w-1", C, "p-1", "bottle", "text")
    meta = build_meta(adapter, target)
    loaded, _ = from_bytes(to_bytes(adapter, meta), target, line.text)  # the healthy one loads
    assert torch.equal(loaded.weight, adapter.weight)
    with torch.no_grad():
        getattr(adapter, name).view(-1)[3] = value
    with pytest.raises(AdapterMismatchError, match="non-finite"):
        from_bytes(to_bytes(adapter, meta), target, line.text)
