"""Patch memories: coreset, nearest-neighbour maps, mutual scoring, bank files and the causal stream."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.adaptation.memory.bank import build_bank
from pipeline.adaptation.memory.files import from_bytes, to_bytes
from pipeline.adaptation.memory.params import BankTarget, MemoryBankError, MemoryParams, bank_target
from pipeline.adaptation.memory.records import FrameRecord, frame_record, score_frames
from pipeline.adaptation.memory.scoring import BankScorer, bank_from_images
from pipeline.adaptation.memory.stream import StreamMemory, admit_patches, replay_stream
from pipeline.errors import ConfigError
from pipeline.inspection.frame_scorer import FrameScorer, RawScore
from pipeline.model.memory import (
    greedy_coreset,
    mutual_scores,
    nearest_distances,
    neighbourhood_mean,
    patch_features,
    robust_stats,
)
from pipeline.settings import Settings


def _unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1)


# --------------------------------------------------------------------------------------------------
# pure math


def test_coreset_respects_its_size_and_covers_the_data_better_than_a_random_subsample() -> None:
    g = torch.Generator().manual_seed(0)
    # a dense cluster and a few far, rare modes: random subsamples follow the density and miss the rare ones
    dense = torch.randn(3000, 32, generator=g) * 0.1
    rare = torch.randn(12, 32, generator=g) * 3.0 + 5.0
    x = torch.cat([dense, rare])
    idx, radius = greedy_coreset(x, 60, projection_dim=16, seed=1)
    assert idx.shape == (60,) and idx.unique().numel() == 60
    cover = nearest_distances(x, x[idx], 1)[:, 0].max()
    rand = torch.randperm(x.shape[0], generator=g)[:60]
    random_cover = nearest_distances(x, x[rand], 1)[:, 0].max()
    assert cover < 0.5 * random_cover
    assert radius > 0
    assert torch.equal(greedy_coreset(x, 60, projection_dim=16, seed=1)[0], idx)  # deterministic
    all_rows, r0 = greedy_coreset(x[:10], 50)
    assert torch.equal(all_rows, torch.arange(10)) and r0 == 0.0
    kept, _ = greedy_coreset(x, 30, keep=5)
    assert torch.equal(kept[:5], torch.arange(5))  # a grown bank keeps its seed rows


def test_nearest_distances_match_brute_force_across_chunks() -> None:
    g = torch.Generator().manual_seed(1)
    q, b = torch.randn(40, 16, generator=g), torch.randn(300, 16, generator=g)
    want = torch.cdist(q, b).topk(3, dim=1, largest=False).values
    got = nearest_distances(q, b.half().float(), 3, chunk=64)
    assert torch.allclose(got, torch.cdist(q, b.half().float()).topk(3, dim=1, largest=False).values, atol=1e-4)
    assert torch.allclose(nearest_distances(q, b, 3, chunk=7), want, atol=1e-4)
    with pytest.raises(ValueError, match="empty"):
        nearest_distances(q, b[:0])
    with pytest.raises(ValueError, match="width"):
        nearest_distances(q, torch.randn(5, 8))


def test_knn_map_scores_a_planted_outlier_patch_highest() -> None:
    g = torch.Generator().manual_seed(2)
    protos = _unit(torch.randn(8, 24, generator=g))  # a line's 8 kinds of normal patch
    normal = lambda n: _unit(protos[torch.randint(0, 8, (n,), generator=g)] + 0.05 * torch.randn(n, 24, generator=g))  # noqa: E731
    bank = normal(400)
    frame = normal(64)
    frame[37] = _unit(torch.randn(24, generator=g))  # one patch unlike anything normal
    d = nearest_distances(frame, bank)[:, 0]
    assert int(d.argmax()) == 37
    assert d[37] > 3 * d[torch.arange(64) != 37].max()


def test_mutual_scoring_flags_a_patch_seen_once_and_not_one_every_frame_shares() -> None:
    g = torch.Generator().manual_seed(3)
    protos = _unit(torch.randn(16, 32, generator=g))
    frames = _unit(protos[None].repeat(10, 1, 1) + 0.03 * torch.randn(10, 16, 32, generator=g))
    odd = _unit(torch.randn(32, generator=g))
    frames[4, 9] = odd  # only frame 4 has it
    s = mutual_scores(frames, share=0.5)
    assert s.shape == (10, 16)
    assert int(s.flatten().argmax()) == 4 * 16 + 9
    shared = s[:, 3]  # prototype 3 is in every frame
    assert shared.max() < 0.3 * s[4, 9]
    # a defect in 3 of 10 frames (at the same place) stays high with share 0.5, but looks normal with share 0.2
    rec = frames.clone()
    rec[[1, 5, 8], 2] = odd
    high = mutual_scores(rec, share=0.5)[[1, 5, 8], 2]
    low = mutual_scores(rec, share=0.2)[[1, 5, 8], 2]
    assert high.min() > 5 * low.max()
    ref = mutual_scores(frames[:1], reference=list(frames[1:]), share=0.5)
    assert ref.shape == (1, 16)
    with pytest.raises(ValueError, match="other frame"):
        mutual_scores(frames[:1])


def test_features_neighbourhood_and_robust_stats() -> None:
    x = torch.zeros(1, 9, 2)
    x[0, 4] = torch.tensor([9.0, 0.0])  # the centre of a 3x3 grid
    agg = neighbourhood_mean(x, 3, 3)
    assert torch.allclose(agg[0, :, 0], torch.full((9,), 1.0))  # every neighbourhood holds the centre once
    with pytest.raises(ValueError, match="odd"):
        neighbourhood_mean(x, 3, 2)
    h = torch.randn(2, 3, 16, 8)
    f = patch_features(h, 4)
    assert f.shape == (2, 16, 24) and torch.allclose(f.norm(dim=-1), torch.ones(2, 16))
    g = torch.Generator().manual_seed(0)
    v = torch.cat([torch.randn(10000, generator=g), torch.full((200,), 50.0)])  # 2% outliers barely move them
    med, sd = robust_stats(v)
    assert abs(med) < 0.1 and 0.9 < sd < 1.15
    assert robust_stats(torch.zeros(5))[1] == 1e-6


# --------------------------------------------------------------------------------------------------
# banks around the FrameScorer (tiny model)


@pytest.fixture(scope="module")
def inspector(text_cache_dir) -> FrameScorer:
    from tests.conftest import make_tiny_settings

    return FrameScorer.from_settings(make_tiny_settings(text_cache_dir, memory={"layers": [2]}))


def _images(n: int, seed: int) -> list[np.ndarray]:
    from pipeline.evaluation.synth import render_part

    return [render_part("wood", 64, seed + i, None)[0] for i in range(n)]


def _params(**kw: object) -> MemoryParams:
    return MemoryParams(**{"layers": (2,), **kw})


def test_bank_round_trips_through_bytes_with_its_metadata(inspector: FrameScorer) -> None:
    params = _params()
    bank = bank_from_images(inspector, "wood", _images(3, 0), params, ids=["a", "b", "c"])
    data = to_bytes(bank)
    target = bank_target(inspector, "wood", params)
    back = from_bytes(data, target)
    assert torch.equal(back.features, bank.features) and torch.equal(back.origin, bank.origin)
    assert back.frames == ["a", "b", "c"] and back.version == bank.version and back.scales == bank.scales
    meta = back.meta
    assert meta["line"] == "wood" and meta["arch"] == "anoclip-tiny" and meta["layers"] == [2]
    assert meta["patches"] == bank.patches == 3 * 64 and meta["bytes"] == bank.nbytes == 3 * 64 * 64 * 2
    assert meta["feature_dim"] == 64 and meta["dtype"] == "float16" and meta["parent"] is None
    assert meta["weights_id"] == inspector.model.weights_id and meta["created"]
    # wrong line, wrong layers, damaged content, not a bank at all
    with pytest.raises(MemoryBankError, match="line"):
        from_bytes(data, BankTarget(**{**target.__dict__, "line": "bottle"}))
    with pytest.raises(MemoryBankError, match="layers"):
        from_bytes(data, BankTarget(**{**target.__dict__, "layers": (1,)}))
    damaged = bytearray(data)
    damaged[-3] ^= 0x55
    with pytest.raises(MemoryBankError, match="does not match its id"):
        from_bytes(bytes(damaged), target)
    with pytest.raises(MemoryBankError, match="not"):
        from_bytes(b"\x00" * 4)


def test_bank_respects_the_byte_budget(inspector: FrameScorer) -> None:
    params = _params(budget_bytes=100 * 64 * 2)  # room for 100 rows of 64 fp16 values
    bank = bank_from_images(inspector, "wood", _images(4, 10), params)
    assert bank.patches == 100 and bank.nbytes <= params.budget_bytes
    assert bank.meta["coreset_radius"] > 0
    assert bank.origin.max() < len(bank.frames)


def test_layers_beyond_the_model_fail_naming_the_key(inspector: FrameScorer) -> None:
    with pytest.raises(ConfigError, match="memory.layers"):
        bank_target(inspector, "wood", _params(layers=(6,)))


def test_stream_never_scores_a_frame_with_itself_or_a_later_frame(inspector: FrameScorer) -> None:
    params = _params(window_frames=4, min_bank_frames=2, admit_min_window=2)
    images = _images(14, 20)
    steps = list(replay_stream(inspector, "wood", images, params, ids=[f"{i}" for i in range(14)], batch=5))
    assert [s.frame_id for s in steps] == [str(i) for i in range(14)]
    banks = {s.refreshed.version: s.refreshed for s in steps if s.refreshed is not None}
    assert len(banks) >= 2  # refreshed more than once: 2, then 4 more admitted frames
    kinds = []
    for i, s in enumerate(steps):
        kind, _, rest = s.result.source.partition(":")
        kinds.append(kind)
        if kind == "bank":
            assert all(int(f) < i for f in banks[rest].frames), f"frame {i} scored with a bank holding it or later"
        assert all(int(f) < i for f in s.window_ids)
        assert len(s.window_ids) <= 4
        if s.refreshed is not None:
            assert all(int(f) <= i for f in s.refreshed.frames)
    assert kinds[0] == "none" and "mutual" in kinds and kinds[-1] == "bank"
    st = StreamMemory(inspector, "wood", params)
    assert st.bank is None and not st.due


def _raw_with(hidden: torch.Tensor, model) -> RawScore:
    s = model.image_size
    return RawScore(anomaly_map=torch.full((s, s), 0.5), score=0.5, tokens=torch.zeros(1, 1, 64, 64),
                    frame_hw=(s, s), hidden=hidden)


def test_a_recurring_defect_never_enters_the_stream_bank(inspector: FrameScorer) -> None:
    """30% of the frames carry the same foreign patch at the same place; it must keep scoring as abnormal."""
    g = torch.Generator().manual_seed(5)
    model = inspector.model
    params = _params(window_frames=8, min_bank_frames=3)
    protos = torch.randn(64, 64, generator=g)  # the normal part: patch k looks like prototype k
    defect = torch.randn(64, generator=g) * 3
    st = StreamMemory(inspector, "wood", params)
    defect_z = []
    for i in range(40):
        h = protos + 0.05 * torch.randn(64, 64, generator=g)
        recurring = i % 10 in (2, 5, 8)
        if recurring:
            h[20] = defect
        step = st.step(_raw_with(h[None, None], model), str(i))
        if recurring and step.result.patch_z is not None:
            defect_z.append(float(step.result.patch_z[0, 20]))
            assert float(step.result.patch_z[0, 20]) >= 3.0, f"frame {i}: the recurring defect looks normal"
    assert len(defect_z) >= 10
    assert st.bank is not None and st.refreshes >= 3
    defect_feat = patch_features(defect[None, None, None], 1)[0, 0]
    assert nearest_distances(defect_feat[None], st.bank.features)[0, 0] > 0.5  # nothing like it was learned


def test_admission_drops_abnormal_patches_their_neighbours_and_abnormal_frames() -> None:
    params = _params()
    z = torch.zeros(1, 64)
    z[0, 27] = 10.0  # row 3, column 3 of an 8x8 grid
    keep, adm = admit_patches(z, params)
    assert adm.admitted and keep is not None
    dropped = (~keep[0]).nonzero().flatten().tolist()
    assert dropped == [18, 19, 20, 26, 27, 28, 34, 35, 36]
    z[0, :20] = 10.0  # 21 of 64 abnormal: above 25%
    keep, adm = admit_patches(z, params)
    assert keep is None and not adm.admitted and "abnormal" in adm.reason
    keep, adm = admit_patches(None, params)
    assert keep is None and adm.reason == "no reference yet"


def test_fused_scores_put_memory_and_zero_shot_in_z_units(inspector: FrameScorer) -> None:
    params = _params(fusion_weight=1.0)
    bank = bank_from_images(inspector, "wood", _images(4, 40), params)
    raws = score_frames(inspector, "wood", _images(2, 60), params)
    assert raws[0].hidden is not None and raws[0].hidden.shape == (1, 1, 64, 64)
    scorer = BankScorer(inspector.model, params)
    rec = frame_record(raws[0], "x", params, inspector.model.grid_size)
    out = scorer.with_bank(raws[0], rec, bank)
    assert out.anomaly_map.shape == raws[0].anomaly_map.shape and out.source == f"bank:{bank.version}"
    assert torch.allclose(out.patch_z, bank.scales.memory.z(bank.distances(rec.features)))
    # weight 0: the zero-shot map in z units, whatever the memory says
    zs_only = BankScorer(inspector.model, _params(fusion_weight=0.0)).with_bank(raws[0], rec, bank)
    assert torch.allclose(zs_only.anomaly_map, bank.scales.zero_shot.z(raws[0].anomaly_map), atol=1e-6)
    with pytest.raises(ValueError, match="hidden"):
        frame_record(inspector.score_raw("wood", _images(1, 0))[0], "y", params, 8)


def test_build_bank_grows_on_its_parent(inspector: FrameScorer) -> None:
    params = _params()
    target = bank_target(inspector, "wood", params)
    grid = inspector.model.grid_size
    recs = [frame_record(r, f"f{i}", params, grid) for i, r in enumerate(score_frames(inspector, "wood",
                                                                                       _images(4, 80), params))]
    first = build_bank("wood", recs[:2], params, target)
    second = build_bank("wood", recs[2:], params, target, parent=first)
    assert second.meta["parent"] == first.version and second.frames == ["f0", "f1", "f2", "f3"]
    assert second.patches == 4 * 64 and second.version != first.version


def test_settings_validate_memory_keys(tiny_settings: Settings) -> None:
    from tests.conftest import make_tiny_settings

    assert tiny_settings.memory.layers == [6] and tiny_settings.memory.fusion_weight == 0.8
    with pytest.raises(ConfigError, match="memory.neighbourhood"):
        make_tiny_settings(tiny_settings.model.text_cache_dir, memory={"neighbourhood": 2})
    with pytest.raises(ConfigError, match="memory.fusion_weight"):
        make_tiny_settings(tiny_settings.model.text_cache_dir, memory={"fusion_weight": 1.5})


def test_stream_reduces_pending_patches_block_by_block(inspector: FrameScorer, monkeypatch: pytest.MonkeyPatch) -> None:
    """A refresh covering many frames never holds all their patches: full blocks are cut as they fill."""
    monkeypatch.setattr(StreamMemory, "BLOCK_ROWS", 256)
    params = _params(budget_bytes=200 * 64 * 2, min_bank_frames=40, refresh_max_frames=40)  # 200 rows
    st = StreamMemory(inspector, "wood", params)
    g = torch.Generator().manual_seed(9)
    peak = 0
    for i in range(40):  # 40 frames x 64 rows = 2560 rows arrive before the first refresh
        st.add_rows(str(i), F.normalize(torch.randn(64, 64, generator=g), dim=-1))
        peak = max(peak, st.pending.rows)
    assert st.pending_frames == 40 and st.due
    # quota per block: 2 x 200 rows x (frames in the block / 40 frames); a block is 4 frames = 256 rows
    assert peak < 256 + 2 * 200 + 64 and st.pending.rows < 2 * 200 + 64
    assert st.pending.origin.max() < len(st.pending.frames)
    st.calibration.extend(FrameRecord(str(i), F.normalize(torch.randn(1, 64, 64, generator=g), dim=-1),
                                      torch.rand(16, generator=g), 0.5) for i in range(38, 40))
    bank = st.refresh()
    assert bank.patches == 200 and bank.nbytes == params.budget_bytes
    assert set(bank.frames) <= {str(i) for i in range(40)} and len(bank.frames) > 20  # drawn from across the stream
    assert st.pending.rows == 0 and st.next_refresh == 40 and st.refreshes == 1


def test_hidden_layers_are_the_original_paths_block_outputs_and_change_nothing_else() -> None:
    from pipeline.model import create_anoclip
    from pipeline.settings import ModelSettings

    model = create_anoclip(ModelSettings(arch="anoclip-tiny", pretrained="none", device="cpu", precision="fp32"))
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 64, 64, generator=g)
    enc = model.encoder
    plain = enc(x)
    both = enc(x, hidden_layers=[3, 1])
    assert plain.hidden is None and both.hidden.shape == (2, 2, 64, 64)
    assert torch.equal(plain.patch_tokens, both.patch_tokens) and torch.equal(plain.cls_embedding, both.cls_embedding)
    o = enc.embed(x)
    want = {}
    with torch.no_grad():
        for k, blk in enumerate(enc.blocks, start=1):
            o = blk(o)  # open_clip's own block
            want[k] = o[:, 1:]
    assert torch.allclose(both.hidden[:, 0], want[1], atol=1e-5)
    assert torch.allclose(both.hidden[:, 1], want[3], atol=1e-5)
    with pytest.raises(ValueError, match="hidden layers"):
        enc(x, hidden_layers=[4])
