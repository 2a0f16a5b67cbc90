"""Regressions for the buffered-TTA defects of issue 11 ("Why", items 1-3): each test failed before its fix.

Synthetic tokens with a known structure (the `Line` of test_tta.py) for the pure-torch parts; the tiny
random-init model for the evaluation harness.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pipeline.adaptation.tta.token_buffer import TokenBuffer
from pipeline.model import tta_per_frame
from pipeline.model.tta_gate import validate_adapter
from pipeline.model.tta_params import AdmissionRule, BufferedBudget, GateRule, TTAParams
from pipeline.model.tta_per_frame import adapt_per_frame
from pipeline.model.tta_scoring import patch_scores, tta_loss
from pipeline.model.tta_train import TokenSet, refresh_adapter, train_buffered
from tests.unit.test_tta import Line, P

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def line() -> Line:
    return Line(seed=4)


# --- (1) `anoclip eval --tta buffered` never refreshed with the defaults --------------------------------
@pytest.fixture(scope="module")
def small_class(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pipeline.evaluation.synth import write_mvtec_tree

    root = tmp_path_factory.mktemp("synth-buffered")
    write_mvtec_tree(root, ["bottle"], n_good=14, n_defect=2, size=64, seed=2)  # 14 good + 10 defects
    return root


def test_eval_buffered_refreshes_on_a_dataset_sized_class_with_the_defaults(
    small_class: Path, tiny_settings, tmp_path: Path
) -> None:
    from pipeline.evaluation.datasets import read_mvtec
    from pipeline.evaluation.loop import run_eval
    from pipeline.evaluation.options import EvalOptions
    from pipeline.evaluation.report import report_dict

    assert tiny_settings.tta.refresh_every == 500 and tiny_settings.tta.min_frames == 50  # the defaults
    index = read_mvtec(small_class, ["bottle"])
    opts = EvalOptions(out=tmp_path / "r", tta="buffered", image_score="cls", progress=False, figures=False)
    report, _ = run_eval(tiny_settings, index, opts)
    adaptation = report_dict(report)["per_class"]["bottle"]["adaptation"]
    assert adaptation["mode"] == "buffered"
    assert adaptation["refreshes"] >= 2, adaptation  # scaled to the class: 24 frames, not 500
    assert adaptation["refreshes"] == len(adaptation["outcomes"])
    assert adaptation["schedule"]["refresh_every"] < 24


def test_eval_buffered_is_an_error_when_no_refresh_ran(small_class: Path, tiny_settings, tmp_path: Path) -> None:
    from pipeline.adaptation.tta.buffered import BufferedTTAError
    from pipeline.evaluation.datasets import read_mvtec
    from pipeline.evaluation.loop import run_eval
    from pipeline.evaluation.options import EvalOptions

    index = read_mvtec(small_class, ["bottle"])
    # admission refuses every frame (ceiling 0): nothing to train on, so no refresh can run
    settings = tiny_settings.model_copy(
        update={"tta": tiny_settings.tta.model_copy(update={"admit_max_image_score": 0.0})})
    opts = EvalOptions(out=tmp_path / "r", tta="buffered", image_score="cls", progress=False, figures=False)
    with pytest.raises(BufferedTTAError, match="bottle.*no refresh ran"):
        run_eval(settings, index, opts)


# --- (2) a candidate shifting every patch towards "normal" passed with 0 confident patches -------------
def test_gate_does_not_pass_a_shift_towards_normal_unchecked_when_no_patch_is_confident(line: Line) -> None:
    val = TokenSet.from_frames(line.frames(12))  # clean held-out frames: no confidently abnormal patch
    tn = line.text.class_embeddings[0]

    def towards_normal(x: torch.Tensor) -> torch.Tensor:  # every token pulled towards the normal prompt
        return x + 1.5 * x.norm(dim=-1, keepdim=True) * tn

    base, cand = patch_scores(val.tokens, line.text), patch_scores(val.tokens, line.text, towards_normal)
    assert float(cand.median()) < float(base.median())  # the shift the incident showed (p50 went down)
    result = validate_adapter(towards_normal, val, line.text)
    assert result.figures["confident_abnormal"] < GateRule().min_confident
    assert not result.accepted
    assert any("nothing abnormal to validate" in r for r in result.reasons), result.reasons


# --- (3a) the holdout was a random split of near-duplicate consecutive frames --------------------------
def test_holdout_is_the_newest_frames(line: Line) -> None:
    # 48 older clean frames, then 12 newest frames with a defect the base model flags
    frames = line.frames(48) + [line.frame(defect_patches=12) for _ in range(12)]
    _, report = refresh_adapter(TokenSet.from_frames(frames), line.text, "linear",
                                TTAParams(seed=0), BufferedBudget(max_steps=2, batch_tokens=256),
                                GateRule(), holdout=0.2, min_frames=10)
    assert report.frames_val == 12
    # all 12 x 12 defect patches are held out (a random split would hold out about a fifth of them)
    assert report.validation["confident_abnormal"] >= 144, report.validation


# --- (3b) the image-score history behind admission included refused frames -----------------------------
def test_a_persistent_defect_never_raises_the_admission_median_until_it_passes(line: Line) -> None:
    buf = TokenBuffer("x", AdmissionRule(max_image_score=None, image_z=2.0))
    g = torch.Generator().manual_seed(0)
    for i in range(30):
        f = line.frame()
        assert buf.offer(f"n{i}", f, 0.5 + 0.002 * float(torch.randn(1, generator=g)), patch_scores(f, line.text))
    admitted = []
    for i in range(60):  # the defect raises the image score only (its patches look normal)
        f = line.frame()
        admitted.append(buf.offer(f"d{i}", f, 0.56, patch_scores(f, line.text)).admitted)
    assert not any(admitted), f"defect frames admitted from #{admitted.index(True)} on"
    assert buf.counts["refused:image_z"] == 60


# --- (3c) patches masked at admission still entered the loss --------------------------------------------
def test_masked_patches_take_no_part_in_any_term_of_the_loss() -> None:
    clean = torch.randn(1, 6, 2, requires_grad=True)
    noisy = torch.randn(1, 6, 2, requires_grad=True)
    mask = torch.tensor([[True, False, True, True, False, True]])
    loss, _ = tta_loss(clean, noisy, clean_mask=mask)
    loss.sum().backward()
    assert clean.grad[~mask].abs().max() == 0 and noisy.grad[~mask].abs().max() == 0
    assert clean.grad[mask].abs().max() > 0 and noisy.grad[mask].abs().max() > 0


def test_buffered_training_never_reads_masked_tokens(line: Line) -> None:
    frames = line.frames(20)
    masks = [torch.ones(P, dtype=torch.bool) for _ in frames]
    for f, m in zip(frames, masks, strict=True):
        f[:3] = float("nan")  # masked at admission: any use of them would poison the loss
        m[:3] = False
    ts = TokenSet.from_frames(frames, masks)
    _, log = train_buffered(ts, line.text, "linear", TTAParams(lr=1e-2), BufferedBudget(max_steps=20, batch_tokens=256))
    assert log.stopped_by == "steps" and log.steps == 20, log.stopped_by


# --- (3d) the adapter's init and its noise came from the same seed -------------------------------------
@pytest.mark.parametrize("kind", ["text", "linear"])
def test_per_frame_init_and_noise_are_independent(line: Line, kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    drawn: list[torch.Tensor] = []
    randn = torch.randn

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        out = randn(*args, **kwargs)
        drawn.append(out)
        return out

    tokens = torch.stack(line.frames(1))
    monkeypatch.setattr(tta_per_frame.torch, "randn", spy)
    result = adapt_per_frame(tokens, line.text, kind, TTAParams(steps=2, seed=0, lr=1e-12, weight_decay=0.0))
    monkeypatch.undo()
    assert drawn, "per-frame TTA drew no noise"
    w = result.adapter.weight.detach().flatten()  # lr 1e-12: still the init
    e = torch.cat([d.flatten() for d in drawn])[: w.numel()]
    corr = float(F.cosine_similarity(w - w.mean(), e - e.mean(), dim=0))
    assert abs(corr) < 0.1, f"init and noise correlated: {corr:.3f} (independent draws give about ±0.03)"
