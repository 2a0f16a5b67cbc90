"""TTA: the loss, per-frame adaptation, buffered training, admission, the gate, the token buffer, replay.

Most tests use synthetic tokens with known structure (a planted "defect" direction that the text
features call abnormal); the FrameScorer-level ones use the tiny random-init model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.adaptation.tta.buffered import BufferedTTA, replay_buffered
from pipeline.adaptation.tta.eval_scorers import eval_scorer
from pipeline.adaptation.tta.token_buffer import TokenBuffer
from pipeline.inspection.frame_scorer import FrameScorer
from pipeline.model.text import TextFeatures
from pipeline.model.tta_admission import admit
from pipeline.model.tta_gate import GateFrame, validate_adapter
from pipeline.model.tta_params import AdmissionRule, BufferedBudget, GateRule, TTAParams
from pipeline.model.tta_per_frame import adapt_per_frame
from pipeline.model.tta_scoring import patch_scores, token_logits, tta_loss
from pipeline.model.tta_train import TokenSet, refresh_adapter, train_buffered
from tests.conftest import make_tiny_settings

C, P = 64, 64


class Line:
    """Synthetic line: text features, normal tokens around a mean, a defect pattern the text calls abnormal."""

    def __init__(self, seed: int = 0) -> None:
        self.g = torch.Generator().manual_seed(seed)
        g = self.g
        tn, ta = (F.normalize(torch.randn(C, generator=g), dim=-1) for _ in range(2))

        def sentences(t: torch.Tensor) -> torch.Tensor:
            return F.normalize(t + 0.5 * torch.randn(30, C, generator=g) / C**0.5, dim=-1)

        self.text = TextFeatures(torch.stack([tn, ta]), sentences(tn), sentences(ta))
        self.mean = 3 * F.normalize(torch.randn(C, generator=g), dim=-1)
        self.defect = 3 * F.normalize(ta - tn, dim=-1)

    def frame(self, defect_patches: int = 0) -> torch.Tensor:
        x = self.mean + 0.3 * torch.randn(P, C, generator=self.g)
        if defect_patches:
            x[:defect_patches] += self.defect + 0.1 * torch.randn(defect_patches, C, generator=self.g)
        return x

    def frames(self, n: int, defect_share: float = 0.0, defect_patches: int = 12) -> list[torch.Tensor]:
        """n frames; the first `defect_share` of them carry the defect pattern on `defect_patches` patches."""
        n_def = round(defect_share * n)
        return [self.frame(defect_patches if i < n_def else 0) for i in range(n)]

    def positives(self, n: int, defect_patches: int = 12) -> list[GateFrame]:
        """n labelled frames for the gate: the defect planted on the first patches, the mask on the 8x8 grid."""
        g = int(P**0.5)
        mask = torch.zeros(P, dtype=torch.bool)
        mask[:defect_patches] = True
        return [GateFrame(self.frame(defect_patches), mask.reshape(g, g)) for _ in range(n)]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def line() -> Line:
    return Line()


@pytest.fixture(scope="module")
def inspector(text_cache_dir: Path) -> FrameScorer:
    settings = make_tiny_settings(
        text_cache_dir,
        tta={"min_frames": 6, "refresh_every": 10, "train_steps": 20, "holdout": 0.25},
    )
    return FrameScorer.from_settings(settings)


def _images(n: int, seed: int = 0, shape: tuple[int, int] = (64, 64)) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(110 + rng.integers(0, 30, (*shape, 3))).astype(np.uint8) for _ in range(n)]


# ------------------------------------------------------------------------------------------------
# the loss
# ------------------------------------------------------------------------------------------------
def test_loss_is_entropy_plus_half_the_two_cross_entropies() -> None:
    clean = torch.tensor([[[0.0, 0.0], [1.0, -1.0]]])  # p = (0.5, 0.5) and (0.88, 0.12)
    noisy = torch.tensor([[[2.0, 0.0], [0.0, 0.0]]])
    loss, parts = tta_loss(clean, noisy, entropy_weight=1.0, hard_weight=0.5)
    pc, pz = clean.softmax(-1), noisy.softmax(-1)
    entropy = -(pc * pc.log()).sum(-1).mean()
    hard = (-pc[..., 0].log()).mean() + (-pz[..., 1].log()).mean()
    torch.testing.assert_close(loss, (entropy + 0.5 * hard).reshape(1))
    torch.testing.assert_close(parts["entropy"], entropy.reshape(1))


def test_clean_mask_keeps_patches_out_of_every_term() -> None:
    clean = torch.randn(1, 4, 2)
    noisy = torch.randn(1, 4, 2)
    mask = torch.tensor([[True, False, True, False]])
    _, masked = tta_loss(clean, noisy, clean_mask=mask)
    _, kept_only = tta_loss(clean[:, mask[0]], noisy[:, mask[0]])  # the same as dropping those positions
    for k in ("clean_normal", "entropy", "noisy_abnormal"):
        torch.testing.assert_close(masked[k], kept_only[k])


# ------------------------------------------------------------------------------------------------
# per-frame TTA
# ------------------------------------------------------------------------------------------------
def _expected_loss(adapter: torch.nn.Module, tokens: torch.Tensor, text: TextFeatures, std: float) -> torch.Tensor:
    """The TTA loss per frame averaged over 32 fixed noise draws: what the noisy per-step losses estimate."""
    g = torch.Generator().manual_seed(123)
    emb = text.class_embeddings
    total = torch.zeros(tokens.shape[0])
    with torch.no_grad():
        for _ in range(32):
            noisy = tokens + std * torch.randn(tokens.shape, generator=g)
            total += tta_loss(token_logits(adapter(tokens), emb), token_logits(adapter(noisy), emb))[0]
    return total / 32


def test_per_frame_loss_goes_down_with_the_official_constants(line: Line) -> None:
    tokens = torch.stack(line.frames(2))  # (2, P, C): two frames, trained as two independent adapters
    params = TTAParams(seed=3)  # 5 steps, lr 1e-3, noise 0.055, weights 1.0 / 0.5
    init = adapt_per_frame(tokens, line.text, "text", TTAParams(steps=0, seed=3)).adapter  # the same init
    result = adapt_per_frame(tokens, line.text, "text", params)
    assert result.losses.shape == (5, 2)
    before = _expected_loss(init, tokens, line.text, params.noise_std)
    after = _expected_loss(result.adapter, tokens, line.text, params.noise_std)
    assert (after < before).all(), (before, after)


@pytest.mark.parametrize("kind", ["text", "linear"])
def test_after_adaptation_noisy_tokens_score_more_abnormal_than_their_clean_originals(line: Line, kind: str) -> None:
    tokens = torch.stack(line.frames(4))
    params = TTAParams(steps=100, lr=1e-2, seed=3)
    before = adapt_per_frame(tokens, line.text, kind, TTAParams(steps=0, seed=3)).adapter
    after = adapt_per_frame(tokens, line.text, kind, params).adapter
    g = torch.Generator().manual_seed(99)  # noise the adapter never saw
    noisy = tokens + params.noise_std * torch.randn(tokens.shape, generator=g)

    def gap(adapter: torch.nn.Module) -> torch.Tensor:
        return patch_scores(noisy, line.text, adapter).mean(1) - patch_scores(tokens, line.text, adapter).mean(1)

    assert (gap(after) > 0).all()
    assert (gap(after) > gap(before) + 1e-3).all(), (gap(before), gap(after))


def test_per_frame_frames_of_a_batch_train_independently(line: Line) -> None:
    tokens = torch.stack(line.frames(3))
    params = TTAParams(steps=5, seed=0)
    batch = adapt_per_frame(tokens, line.text, "linear", params, seeds=[1, 2, 3])
    for i, seed in enumerate([1, 2, 3]):
        alone = adapt_per_frame(tokens[i : i + 1], line.text, "linear", params, seeds=[seed])
        torch.testing.assert_close(batch.adapter.weight[i], alone.adapter.weight[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(batch.losses[:, i], alone.losses[:, 0], rtol=1e-5, atol=1e-6)


def test_per_frame_in_bf16_matches_fp32_closely(line: Line) -> None:
    tokens = torch.stack(line.frames(2))
    fp32 = adapt_per_frame(tokens, line.text, "text", TTAParams(seed=1)).adapter
    bf16 = adapt_per_frame(tokens, line.text, "text", TTAParams(seed=1, precision="bf16")).adapter
    assert bf16.compute_dtype == torch.bfloat16
    s32, s16 = patch_scores(tokens, line.text, fp32), patch_scores(tokens, line.text, bf16)
    assert not torch.equal(s32, s16)
    assert (s32 - s16).abs().max() < 0.05 * float(s32.std())  # differences far below the map's contrast


def test_per_frame_keeps_no_state_between_calls(line: Line) -> None:
    a, b = (torch.stack(line.frames(1)) for _ in range(2))
    first = adapt_per_frame(a, line.text, "text")
    adapt_per_frame(b, line.text, "text")
    again = adapt_per_frame(a, line.text, "text")
    assert torch.equal(first.adapter.weight, again.adapter.weight)
    assert torch.equal(first.losses, again.losses)
    assert not first.adapter.weight.requires_grad


def test_inspector_per_frame_scores_frame_a_the_same_before_and_after_b(inspector: FrameScorer) -> None:
    a, b = _images(2, seed=1)
    b = _images(1, seed=2, shape=(64, 96))[0]  # a tiled frame in between
    zero_shot = inspector.score_raw("bottle", [a])[0]
    first = inspector.score_raw("bottle", [a], tta="per_frame")[0]
    middle = inspector.score_raw("bottle", [b], tta="per_frame")[0]
    with torch.inference_mode():  # callers may score under inference mode; TTA still trains
        again = inspector.score_raw("bottle", [a], tta="per_frame")[0]
    assert torch.equal(first.anomaly_map, again.anomaly_map)
    assert middle.anomaly_map.shape == (64, 96)
    assert first.score == zero_shot.score  # TTA never touches the image score
    assert (first.anomaly_map - zero_shot.anomaly_map).abs().max() > 1e-4  # ...but it does change the map
    assert "tta" in first.timings
    with pytest.raises(ValueError, match="per-frame"):
        inspector.score_raw("bottle", [a], adapter=lambda t: t, tta="per_frame")


# ------------------------------------------------------------------------------------------------
# admission and the token buffer
# ------------------------------------------------------------------------------------------------
def test_admission_refuses_confidently_abnormal_frames_and_masks_abnormal_patches(line: Line) -> None:
    rule = AdmissionRule(max_image_score=0.6, image_z=2.0, patch_z=3.0, max_abnormal_share=0.05)
    clean = line.frame()
    small = line.frame(defect_patches=2)
    big = line.frame(defect_patches=8)
    recent = torch.full((50,), 0.5) + 0.01 * torch.randn(50, generator=torch.Generator().manual_seed(0))

    ok = admit(0.5, patch_scores(clean, line.text), rule, recent)
    assert ok.admitted and ok.clean is not None and ok.clean.float().mean() > 0.95
    masked = admit(0.5, patch_scores(small, line.text), rule, recent)
    assert masked.admitted and masked.clean is not None
    assert not masked.clean[:2].any() and masked.clean[2:].float().mean() > 0.95  # defect patches never "normal"
    refused = admit(0.5, patch_scores(big, line.text), rule, recent)
    assert not refused.admitted and refused.rule == "abnormal_patches" and "look abnormal" in refused.reason
    assert admit(0.61, patch_scores(clean, line.text), rule, recent).rule == "image_score"
    assert admit(0.56, patch_scores(clean, line.text), rule, recent).rule == "image_z"
    assert admit(float("nan"), patch_scores(clean, line.text), rule).rule == "non_finite"


def test_token_buffer_is_bounded_by_count_and_bytes_and_stores_fp16(line: Line) -> None:
    buf = TokenBuffer("x", AdmissionRule(image_z=None), max_frames=3, max_bytes=10 << 20)
    for i in range(5):
        f = line.frame()
        assert buf.offer(f"f{i}", f, 0.5, patch_scores(f, line.text)).admitted
    assert len(buf) == 3 and buf.window()["first_frame"] == "f2" and buf.stats()["evicted"] == 2
    snap = buf.snapshot()
    assert snap.tokens.dtype == torch.float16 and snap.n_frames == 3 and snap.tokens.shape == (3 * P, C)
    per_frame = P * C * 2 + P
    small = TokenBuffer("y", AdmissionRule(image_z=None), max_frames=100, max_bytes=2 * per_frame + 10)
    for i in range(4):
        f = line.frame()
        small.offer(f"f{i}", f, 0.5, patch_scores(f, line.text))
    assert len(small) == 2 and small.nbytes <= 2 * per_frame + 10
    big = line.frame(defect_patches=8)
    assert not small.offer("bad", big, 0.5, patch_scores(big, line.text)).admitted
    assert small.stats()["refused:abnormal_patches"] == 1 and len(small) == 2


# ------------------------------------------------------------------------------------------------
# buffered training and the validation gate
# ------------------------------------------------------------------------------------------------
STRONG = TTAParams(lr=1e-2, seed=0)  # trains hard enough on synthetic tokens to learn (or mislearn) patterns
BUDGET = BufferedBudget(max_steps=100, max_seconds=60.0, batch_tokens=1024)


def test_buffered_loss_goes_down_and_training_is_deterministic(line: Line) -> None:
    ts = TokenSet.from_frames(line.frames(40))
    budget = BufferedBudget(max_steps=60, batch_tokens=1024)
    a1, log1 = train_buffered(ts, line.text, "text", STRONG, budget, generator=torch.Generator().manual_seed(1))
    a2, log2 = train_buffered(ts, line.text, "text", STRONG, budget, generator=torch.Generator().manual_seed(1))
    assert log1.steps == 60 and log1.stopped_by == "steps" and log1.tokens_seen == 60 * 1024
    assert np.mean(log1.losses[-10:]) < np.mean(log1.losses[:10])
    assert torch.equal(a1.weight, a2.weight) and log1.losses == log2.losses
    _, timed = train_buffered(ts, line.text, "text", STRONG, BufferedBudget(max_steps=10**6, max_seconds=0.2))
    assert timed.stopped_by == "time" and timed.steps > 0


@pytest.mark.parametrize("kind", ["text", "linear"])
def test_gate_refuses_an_adapter_that_learned_a_dominant_defect_as_normal(line: Line, kind: str) -> None:
    # 4 frames in 5 carry the same defect; admission is bypassed (every patch labelled normal)
    frames = [line.frame(12 if i % 5 else 0) for i in range(60)]
    defective = TokenSet.from_frames(frames)
    base = patch_scores(defective.tokens, line.text).view(60, P)
    has = torch.tensor([i % 5 != 0 for i in range(60)])
    assert (base[has, :12].min(1).values > base[has, 12:].max(1).values).all()  # the base model sees it
    _, report = refresh_adapter(defective, line.text, kind, STRONG, BUDGET, GateRule(), min_frames=10)
    assert not report.accepted
    assert any("confidently abnormal" in r and "learned them as normal" in r for r in report.reasons)
    assert report.validation["abnormal_flip_share"] > 0.4 and report.validation["confident_abnormal"] >= 50

    # control: the same training on a clean buffer is accepted, so the refusal above is about the defect
    clean = TokenSet.from_frames(line.frames(60))
    adapter, ok = refresh_adapter(clean, line.text, kind, STRONG, BUDGET, GateRule(), min_frames=10,
                                  positives=line.positives(4))
    assert ok.accepted and adapter is not None, ok.reasons
    assert ok.frames_val == 12 and ok.frames_train == 48 and ok.steps == 100
    assert ok.validation["pixel_auroc_candidate"] > 0.9 and ok.validation["labelled_frames"] == 4


def test_admission_keeps_the_defect_frames_out_of_the_buffer() -> None:
    line = Line()  # its own draws: the gate's outcome must not depend on which tests ran before
    buf = TokenBuffer("x", AdmissionRule())
    frames = line.frames(60, defect_share=0.8)
    for i, f in enumerate(frames):
        buf.offer(f"f{i}", f, 0.5, patch_scores(f, line.text))
    assert len(buf) == 12 and buf.stats()["refused:abnormal_patches"] == 48  # only the 12 clean frames got in
    assert buf.window()["first_frame"] == "f48"
    adapter, report = refresh_adapter(buf.snapshot(), line.text, "text", STRONG, BUDGET, min_frames=10,
                                      positives=line.positives(8))
    assert report.accepted and adapter is not None, report.reasons


def test_gate_refuses_non_finite_and_collapsed_candidates(line: Line) -> None:
    val = TokenSet.from_frames(line.frames(10, defect_share=0.5))
    nan = validate_adapter(lambda x: x * float("nan"), val, line.text)
    assert not nan.accepted and "non-finite" in nan.reasons[0]
    const = line.mean.clone()
    flat = validate_adapter(lambda x: const.expand_as(x) + 1e-6 * x, val, line.text)
    assert not flat.accepted and any("spread collapsed" in r for r in flat.reasons)
    same = validate_adapter(lambda x: x, val, line.text)
    assert same.accepted and same.figures["abnormal_flip_share"] == 0.0


def test_refresh_with_too_few_frames_trains_nothing(line: Line) -> None:
    adapter, report = refresh_adapter(TokenSet.from_frames(line.frames(3)), line.text, "linear", min_frames=10)
    assert adapter is None and not report.accepted and "only 3 admitted frames" in report.reasons[0]


# ------------------------------------------------------------------------------------------------
# stream replay and the eval harness hook (tiny model)
# ------------------------------------------------------------------------------------------------
PERMISSIVE = GateRule(max_flip_share=1.0, min_spread_ratio=0.0, auroc_margin=1.0, min_contrast_ratio=0.0)
"""A gate no trained, finite candidate with labelled positives can fail: the promotion path runs for certain."""
REFUSING = GateRule(min_spread_ratio=1e6)
"""A gate every candidate fails ("score spread collapsed"): the refusal path runs for certain."""


def _replay(inspector: FrameScorer, images: list[np.ndarray], gate: GateRule) -> list:
    st = BufferedTTA.for_line(inspector, "bottle")
    st.gate = gate
    return list(replay_buffered(inspector, "bottle", images, refresh_every=10, state=st))


def test_replay_is_causal_and_refreshes_on_schedule(inspector: FrameScorer) -> None:
    images = _images(25, seed=5)
    steps = _replay(inspector, images, PERMISSIVE)
    assert len(steps) == 25
    refreshed = [i for i, s in enumerate(steps) if s.refresh is not None]
    assert refreshed == [9, 19]
    assert all(s.adapter_version is None for s in steps[:10])  # nothing trained before frame 10
    zero_shot = inspector.score_raw("bottle", images)
    for s, z in zip(steps[:10], zero_shot[:10], strict=True):
        assert torch.equal(s.raw.anomaly_map, z.anomaly_map)
    first, second = steps[9].refresh, steps[19].refresh
    assert first is not None and first.extra["training_window"]["last_frame"] == "replay-9"
    assert first.accepted, first.reasons
    version = first.extra["version"]
    # frames after an accepted refresh are served by the new adapter, and only until the next refresh
    assert all(s.adapter_version == version for s in steps[10:20])
    assert not torch.equal(steps[10].raw.anomaly_map, zero_shot[10].anomaly_map)
    assert steps[10].raw.score == zero_shot[10].score  # the adapter changes maps, never the image score
    assert second is not None and second.accepted, second.reasons
    assert second.extra["training_window"]["last_frame"] == "replay-19"
    assert second.extra["base_version"] == version  # the second candidate was judged against the serving one
    assert second.extra["version"] != version
    assert all(s.adapter_version == second.extra["version"] for s in steps[20:])


def test_replay_never_serves_a_refused_candidate(inspector: FrameScorer) -> None:
    images = _images(25, seed=5)
    steps = _replay(inspector, images, REFUSING)
    reports = [s.refresh for s in steps if s.refresh is not None]
    assert len(reports) == 2
    for r in reports:
        assert not r.accepted and "version" not in r.extra
        assert any("score spread collapsed" in reason for reason in r.reasons), r.reasons
    assert all(s.adapter_version is None for s in steps)
    zero_shot = inspector.score_raw("bottle", images)
    for s, z in zip(steps, zero_shot, strict=True):  # every frame, before and after the refusals: the base model
        assert torch.equal(s.raw.anomaly_map, z.anomaly_map)


def test_eval_scorers(inspector: FrameScorer) -> None:
    images = _images(12, seed=7)
    per_frame = eval_scorer("per_frame", inspector)
    per_frame.begin_class("bottle")
    out = per_frame.score("bottle", images[:2])
    direct = inspector.score_raw("bottle", images[:2], tta="per_frame")
    assert np.array_equal(out[1][1], direct[1].anomaly_map.numpy()) and out[1][0] == direct[1].score

    buffered = eval_scorer("buffered", inspector)
    buffered.begin_class("bottle")
    for k in range(0, 12, 4):
        res = buffered.score("bottle", images[k : k + 4])
        assert len(res) == 4 and res[0][1].shape == (64, 64)
    buffered.end_class("bottle")
    assert len(buffered.reports["bottle"]) == 1  # refresh_every=10: one refresh after the third batch
    with pytest.raises(ValueError):
        eval_scorer("off", inspector)


def test_buffered_state_for_a_linear_line_and_its_time_budget(inspector: FrameScorer) -> None:
    st = BufferedTTA.for_line(inspector, "pcb1")
    for i, raw in enumerate(inspector.score_raw("pcb1", _images(8, seed=9))):
        st.observe(str(i), raw.tokens, raw.score, score_seconds=0.5)
    # a live refresh may train at most train_share (5%) of the 4 s spent scoring; replay/eval: no time limit
    assert st.refresh_budget().max_seconds == pytest.approx(0.2)
    assert st.refresh_budget(timed=False).max_seconds == float("inf")
    adapter, report = st.train_candidate(timed=False)
    assert report.kind == "linear" and adapter is not None and adapter.weight.shape == (64, 64)
    assert report.extra["admission"]["offered"] == 8 and report.extra["line"] == "pcb1"
    assert report.steps == 20 and report.to_dict()["budget"]["max_seconds"] is None
    assert st.refresh_budget().max_seconds == 20.0  # the scoring time is counted afresh after a refresh
