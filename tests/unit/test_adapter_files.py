"""Adapter files: exact round trips through disk and bytes, metadata, and refusal of anything that does not fit."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save as st_save

from pipeline.adaptation.tta.files import (
    AdapterTarget,
    build_meta,
    from_bytes,
    load_adapter,
    read_meta,
    save_adapter,
    target_for,
    to_bytes,
)
from pipeline.errors import AdapterMismatchError
from pipeline.inspection.frame_scorer import FrameScorer
from pipeline.model.adapters import ResidualAdapter
from pipeline.model.tta_params import BufferedBudget, TTAParams
from pipeline.model.tta_train import TokenSet, train_buffered
from tests.conftest import make_tiny_settings

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def inspector(text_cache_dir: Path) -> FrameScorer:
    return FrameScorer.from_settings(make_tiny_settings(text_cache_dir))


def _images(n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(100 + rng.integers(0, 40, (64, 64, 3))).astype(np.uint8) for _ in range(n)]


def _trained(inspector: FrameScorer, line: str) -> ResidualAdapter:
    raws = inspector.score_raw(line, _images(6, seed=1))
    text = inspector.prepare_line(line)
    ts = TokenSet.from_frames([r.tokens for r in raws])
    adapter, _ = train_buffered(ts, text, inspector.line(line).adapter_kind, TTAParams(lr=1e-2),
                                BufferedBudget(max_steps=20, batch_tokens=256))
    return adapter


@pytest.mark.parametrize("line", ["bottle", "pcb1"])  # text and linear adapters
def test_round_trip_reproduces_scores_exactly(inspector: FrameScorer, tmp_path: Path, line: str) -> None:
    adapter = _trained(inspector, line)
    target = target_for(inspector, line)
    meta = build_meta(adapter, target, training_window={"frames": 6}, validation={"spread_ratio": 1.5})
    path = save_adapter(tmp_path / "a.safetensors", adapter, meta)
    text = inspector.prepare_line(line)
    loaded, meta2 = load_adapter(path, target, text)
    images = _images(3, seed=2)
    want = inspector.score_raw(line, images, adapter=adapter)
    got = inspector.score_raw(line, images, adapter=loaded)
    for w, g in zip(want, got, strict=True):
        assert torch.equal(w.anomaly_map, g.anomaly_map)
    zero_shot = inspector.score_raw(line, images)
    assert not torch.equal(zero_shot[0].anomaly_map, got[0].anomaly_map)  # the adapter does change maps
    assert meta2 == meta and meta2["kind"] == inspector.line(line).adapter_kind
    via_bytes, _ = from_bytes(to_bytes(adapter, meta), target, text)
    assert torch.equal(via_bytes.weight, adapter.weight) and torch.equal(via_bytes.bias, adapter.bias)
    assert to_bytes(adapter, meta) == path.read_bytes()  # the registry stores exactly the file's bytes


def test_metadata_describes_the_adapter(inspector: FrameScorer) -> None:
    adapter = _trained(inspector, "bottle")
    meta = read_meta(to_bytes(adapter, build_meta(adapter, target_for(inspector, "bottle"),
                                                  training_window={"first_frame": "a.png"})))
    text = inspector.prepare_line("bottle")
    assert meta["kind"] == "text" and meta["embed_dim"] == 64
    assert meta["out_dim"] == text.normal_sentences.shape[0] + text.abnormal_sentences.shape[0]
    assert meta["arch"] == "anoclip-tiny" and meta["weights_id"] == inspector.model.weights_id
    assert meta["prompt_hash"] == inspector.prompt_hash("bottle") and meta["line"] == "bottle"
    assert meta["created"] and meta["training_window"] == {"first_frame": "a.png"} and len(meta["id"]) == 12


def test_mismatched_adapters_are_refused_with_the_reason(inspector: FrameScorer, tmp_path: Path) -> None:
    adapter = _trained(inspector, "bottle")
    target = target_for(inspector, "bottle")
    data = to_bytes(adapter, build_meta(adapter, target))
    text = inspector.prepare_line("bottle")
    cases = {
        "trained for line 'bottle', not 'wood'": dataclasses.replace(target, line="wood"),
        "weights": dataclasses.replace(target, weights_id="anoclip-tiny/random-seed1"),
        "token width": dataclasses.replace(target, embed_dim=128),
        "prompt set": dataclasses.replace(target, prompt_hash="0" * 16),
        "uses linear adapters": dataclasses.replace(target, kind="linear"),
        "not 'ViT-B-16'": dataclasses.replace(target, arch="ViT-B-16"),
    }
    for needle, bad in cases.items():
        with pytest.raises(AdapterMismatchError, match=needle):
            from_bytes(data, bad, text)
    # a line whose prompts differ (here: another class) is refused through the FrameScorer's own target
    path = save_adapter(tmp_path / "bottle.safetensors", adapter, build_meta(adapter, target))
    with pytest.raises(AdapterMismatchError, match=r"bottle\.safetensors: adapter does not fit"):
        load_adapter(path, target_for(inspector, "wood"), inspector.prepare_line("wood"))
    # even with matching metadata, tensors that do not fit the line's text features are refused
    wrong = {"weight": torch.zeros(5, 64), "bias": torch.zeros(5)}
    forged = st_save(wrong, metadata={"anoclip_adapter": json.dumps(read_meta(data))})
    with pytest.raises(AdapterMismatchError, match="shape"):
        from_bytes(forged, target, text)


class _Boom:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("touch /tmp/anoclip-adapter-unpickled",))


def test_non_adapter_files_are_refused_and_never_unpickled(inspector: FrameScorer, tmp_path: Path) -> None:
    target = target_for(inspector, "bottle")
    text = inspector.prepare_line("bottle")
    marker = Path("/tmp/anoclip-adapter-unpickled")
    marker.unlink(missing_ok=True)
    evil = tmp_path / "evil.safetensors"
    evil.write_bytes(pickle.dumps({"weight": _Boom()}))
    adapter = _trained(inspector, "bottle")
    bad_files = {
        "evil": evil.read_bytes(),
        "empty": b"",
        "truncated": to_bytes(adapter, build_meta(adapter, target))[:40],
        "plain safetensors": st_save({"weight": torch.zeros(2, 2)}),
    }
    for name, blob in bad_files.items():
        p = tmp_path / f"{name}.safetensors"
        p.write_bytes(blob)
        with pytest.raises(AdapterMismatchError):
            load_adapter(p, target, text)
    assert not marker.exists()
    with pytest.raises(AdapterMismatchError, match="cannot read"):
        load_adapter(tmp_path / "missing.safetensors", target, text)


def test_targets_compare_all_fields() -> None:
    t = AdapterTarget("a", "w", 8, "h", "line", "text")
    assert dataclasses.replace(t, kind=None).kind is None and t != dataclasses.replace(t, line="other")


def test_an_adapter_carries_its_own_thresholds(inspector: FrameScorer) -> None:
    adapter = _trained(inspector, "bottle")
    target = target_for(inspector, "bottle")
    th = {"pixel": 0.457, "pixel_median": 0.452, "image": None, "image_heldout": float("nan"), "frames": 8}
    _, meta = from_bytes(to_bytes(adapter, build_meta(adapter, target, thresholds=th)), target,
                         inspector.prepare_line("bottle"))
    assert meta["thresholds"] == {**th, "image_heldout": None}  # JSON has no NaN
    assert build_meta(adapter, target)["thresholds"] == {}  # none given: the line's thresholds apply
