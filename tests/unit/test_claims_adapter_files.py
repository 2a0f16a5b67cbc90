"""Adapter-file details added after mutation testing: every refusal names both sides, atomic saves leave
nothing behind, `load_adapter` serves at the asked precision, and the `training` block mirrors the report."""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pipeline.adaptation.adapter_files import (
    AdapterTarget,
    TrainingMeta,
    build_meta,
    check_meta,
    load_adapter,
    save_adapter,
    target_dict,
)
from pipeline.errors import AdapterMismatchError
from pipeline.model.adapters import create_adapter
from pipeline.model.self_training import BufferedBudget, TokenSet, TTAParams, refresh_adapter
from pipeline.model.text import TextFeatures

C = 16
TARGET = AdapterTarget("anoclip-tiny", "w-1", C, "p-1", "bottle", "text")


@pytest.fixture(scope="module")
def text() -> TextFeatures:
    g = torch.Generator().manual_seed(0)
    tn, ta = (F.normalize(torch.randn(C, generator=g), dim=-1) for _ in range(2))
    return TextFeatures(torch.stack([tn, ta]), F.normalize(torch.randn(6, C, generator=g), dim=-1),
                        F.normalize(torch.randn(6, C, generator=g), dim=-1))


@pytest.fixture(scope="module")
def adapter(text: TextFeatures):
    return create_adapter("text", text, 0.5, generator=torch.Generator().manual_seed(1))


def test_every_mismatch_is_named_with_both_sides(adapter) -> None:
    meta = build_meta(adapter, TARGET)
    other = AdapterTarget("ViT-B-16", "w-2", C + 1, "p-2", "wood", "linear")
    with pytest.raises(AdapterMismatchError) as e:
        check_meta(meta, other)
    assert str(e.value) == "adapter does not fit: " + "; ".join([
        "it is a text adapter but line 'wood' uses linear adapters",
        "it was trained for line 'bottle', not 'wood'",
        "it was trained on model 'anoclip-tiny', not 'ViT-B-16'",
        "it was trained with weights 'w-1', the model has 'w-2'",
        f"its token width is {C}, the model's is {C + 1}",
        "its prompt set p-1 differs from the line's p-2 (class name, domain or extra states changed)",
    ])
    with pytest.raises(AdapterMismatchError, match=r"^adapter does not fit: unknown adapter kind 'conv'$"):
        check_meta({**meta, "kind": "conv"}, TARGET)
    check_meta(meta, dataclasses.replace(TARGET, kind=None))  # a line that takes either kind


def test_save_creates_folders_writes_atomically_and_cleans_up(adapter, text, tmp_path: Path) -> None:
    path = tmp_path / "new" / "nested" / "a.safetensors"
    assert save_adapter(path, adapter, build_meta(adapter, TARGET)) == path
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.safetensors"], "no temp file left behind"
    loaded, _ = load_adapter(path, TARGET, text, torch.bfloat16)
    assert loaded.compute_dtype == torch.bfloat16 and torch.equal(loaded.weight, adapter.weight)
    assert load_adapter(path, TARGET, text)[0].compute_dtype is None
    stacked = create_adapter("text", text, 0.5, stack=2)
    with pytest.raises(ValueError, match="one adapter at a time"):
        save_adapter(tmp_path / "new" / "b.safetensors", stacked, build_meta(adapter, TARGET))
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["nested"], "a failed save leaves nothing"
    with pytest.raises(AdapterMismatchError, match=r"cannot read adapter file .*missing\.safetensors: No such file"):
        load_adapter(tmp_path / "missing.safetensors", TARGET, text)


def test_training_block_mirrors_the_report(text) -> None:
    g = torch.Generator().manual_seed(2)
    frames = [torch.randn(16, C, generator=g) for _ in range(6)]
    _, report = refresh_adapter(TokenSet.from_frames(frames), text, "text", TTAParams(),
                                BufferedBudget(max_steps=4, max_seconds=math.inf, batch_tokens=32), min_frames=4)
    tm = TrainingMeta.from_report(report)
    assert (tm.steps, tm.stopped_by, tm.frames_train, tm.frames_val) == (4, "steps", report.frames_train,
                                                                         report.frames_val)
    assert tm.seconds == round(report.seconds, 3)
    assert (tm.loss_first, tm.loss_last) == (report.losses[0], report.losses[-1])
    assert tm.params == report.to_dict()["params"] and tm.budget["max_seconds"] is None and tm.budget["max_steps"] == 4
    assert tm.to_dict() == dataclasses.asdict(tm) and tm.to_dict()["steps"] == 4
    empty = dataclasses.replace(report, losses=[], steps=0)
    assert (TrainingMeta.from_report(empty).loss_first, TrainingMeta.from_report(empty).loss_last) == (None, None)
    assert target_dict(TARGET) == {"arch": "anoclip-tiny", "weights_id": "w-1", "embed_dim": C, "prompt_hash": "p-1",
                                   "line": "bottle", "kind": "text", "precision": "fp32"}


def test_the_temp_file_is_renamed_within_the_target_folder(adapter, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Added after mutation testing: the rename is atomic only within one file system, so the temp file is
    made next to the target (a temp file in /tmp would fail, or copy, across mounts), named `*.tmp` so a
    crash leaves a file an operator recognises; and when the rename fails, its error is the one raised."""
    renamed: list[tuple[Path, Path]] = []
    real_replace = os.replace

    def spy(src: str, dst: str) -> None:
        renamed.append((Path(src), Path(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    path = save_adapter(tmp_path / "sub" / "a.safetensors", adapter, build_meta(adapter, TARGET))
    (src, dst), = renamed
    assert dst == path and src.parent == path.parent and src.name.endswith(".tmp") and src != path

    def vanish_then_fail(src: str, dst: str) -> None:
        Path(src).unlink()  # e.g. removed by a cleaner between the write and the rename
        raise OSError("rename failed: disk gone")

    monkeypatch.setattr(os, "replace", vanish_then_fail)
    with pytest.raises(OSError, match="disk gone"):
        save_adapter(tmp_path / "sub" / "b.safetensors", adapter, build_meta(adapter, TARGET))
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["a.safetensors"]
