"""Adapter-file details added after mutation testing: every refusal names both sides, atomic saves leave
nothing behind, `load_adapter` serves at the asked precision, and the `training` block mirrors the report."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
from datetime import UTC, date, datetime
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save as st_save

from pipeline.adaptation.tta.files import (
    AdapterTarget,
    TrainingMeta,
    build_meta,
    check_meta,
    from_bytes,
    load_adapter,
    read_header_meta,
    read_meta,
    save_adapter,
    target_dict,
    target_for,
    to_bytes,
)
from pipeline.errors import AdapterMismatchError
from pipeline.model.adapters import create_adapter
from pipeline.model.text import TextFeatures
from pipeline.model.tta_params import BufferedBudget, TTAParams
from pipeline.model.tta_train import TokenSet, refresh_adapter

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


def _raw(header: bytes, n: int | None = None, tail: bytes = b"") -> bytes:
    """Safetensors-shaped bytes: an 8-byte little-endian header length (`n`, default the header's), header, tail."""
    return struct.pack("<Q", len(header) if n is None else n) + header + tail


def _header(meta: object) -> bytes:
    return json.dumps({"__metadata__": {"anoclip_adapter": json.dumps(meta)}}).encode()


def test_header_refusals_name_the_problem_exactly() -> None:
    """Added after mutation testing: each refusal of `read_meta` is told apart by its message, and the size
    checks sit exactly at their limits (8 bytes is long enough to hold a header length; a header may end at
    the last byte; a header length of 2**63 or more is not read as negative)."""
    good = {"format": "anoclip-adapter", "format_version": 1}
    cases = {
        b"1234567": "not an adapter file: too short to be safetensors",
        _raw(b""): "not an anoclip adapter file: no anoclip_adapter metadata in its safetensors header",
        b"\xff" * 8: "not an adapter file: invalid safetensors header",
        _raw(b"{}", n=100, tail=b" " * 20): "not an adapter file: invalid safetensors header",
        _raw(_header(good))[:-1]: "not an adapter file: invalid safetensors header",
        _raw(_header(["format"])): "not an anoclip adapter file: unknown format",
        _raw(_header({**good, "format": "other"})): "not an anoclip adapter file: unknown format",
        _raw(_header({**good, "format_version": 2})):
            "adapter file format version 2 is not supported (this build reads 1)",
    }
    for blob, message in cases.items():
        with pytest.raises(AdapterMismatchError) as e:
            read_meta(blob)
        assert str(e.value) == message, blob[:40]
    assert read_meta(_raw(_header(good))) == good  # the header may end exactly at the last byte
    bank = dict(meta_key="anoclip_adapter", fmt="anoclip-adapter", version=1, error=ValueError, noun="thing")
    assert read_header_meta(_raw(_header(good)), **bank, max_header=len(_header(good))) == good  # at the limit
    with pytest.raises(ValueError, match=r"^not a thing: invalid safetensors header$"):
        read_header_meta(_raw(_header(good)), **bank, max_header=len(_header(good)) - 1)
    with pytest.raises(ValueError, match=r"^not a thing: too short to be safetensors$"):  # the default article
        read_header_meta(b"", **bank)


def test_stacked_adapters_are_refused_by_name(text) -> None:
    stacked = create_adapter("text", text, 0.5, stack=2)
    for call in (lambda: build_meta(stacked, TARGET), lambda: to_bytes(stacked, {})):
        with pytest.raises(ValueError) as e:
            call()
        assert str(e.value) == "save one adapter at a time (use adapter.unstack(i))"


def test_bytes_are_canonical_and_carry_any_metadata_value(adapter) -> None:
    """The same adapter and metadata give the same bytes whatever the dict order (the registry compares and
    stores bytes); values JSON lacks (paths, dates) are written as text rather than refused."""
    meta = build_meta(adapter, TARGET, created="2026-12-02T00:00:00+00:00")
    assert meta["precision"] == TARGET.precision and build_meta(
        adapter, dataclasses.replace(TARGET, precision="bf16"))["precision"] == "bf16"
    assert to_bytes(adapter, meta) == to_bytes(adapter, dict(reversed(list(meta.items()))))
    odd = {**meta, "training_window": {"source": Path("/data/line-3"), "since": date(2026, 12, 1)}}
    assert read_meta(to_bytes(adapter, odd))["training_window"] == {"source": "/data/line-3", "since": "2026-12-01"}


def test_loading_refusals_name_the_problem(adapter, text) -> None:
    meta = build_meta(adapter, TARGET)
    tensors = {"weight": adapter.weight.detach(), "bias": adapter.bias.detach()}
    blob = st_save({**tensors, "extra": torch.zeros(1)}, metadata={"anoclip_adapter": json.dumps(meta)})
    with pytest.raises(AdapterMismatchError, match=r"^adapter holds tensors \['bias', 'extra', 'weight'\], "
                                                   r"expected weight and bias$"):
        from_bytes(blob, TARGET, text)
    good = to_bytes(adapter, meta)
    n = struct.unpack("<Q", good[:8])[0]
    with pytest.raises(AdapterMismatchError, match=r"^adapter tensors unreadable: \S"):
        from_bytes(good[: 8 + n] + good[8 + n :][:-4], TARGET, text)  # tensor bytes cut short
    with pytest.raises(AdapterMismatchError, match=r"^adapter metadata invalid: \S"):
        from_bytes(st_save(tensors, metadata={"anoclip_adapter": json.dumps({**meta, "residual": "half"})}),
                   TARGET, text)
    wrong = {"weight": tensors["weight"], "bias": torch.zeros(5)}  # one wrong tensor: the order of checks is moot
    with pytest.raises(AdapterMismatchError) as e:
        from_bytes(st_save(wrong, metadata={"anoclip_adapter": json.dumps(meta)}), TARGET, text)
    assert str(e.value) == ("adapter bias has shape (5,) (torch.float32) but this line needs (12,) "
                            "(the line's prompt sentences or the model width differ)")
    nan = {"weight": torch.full_like(tensors["weight"], math.nan), "bias": tensors["bias"]}
    with pytest.raises(AdapterMismatchError) as e:
        from_bytes(st_save(nan, metadata={"anoclip_adapter": json.dumps(meta)}), TARGET, text)
    assert str(e.value) == "adapter tensors hold non-finite values"


def test_a_loaded_adapter_keeps_its_residual_is_frozen_and_touches_no_rng(text) -> None:
    """The residual comes from the file, not the default; a served adapter takes no gradients; and loading
    draws nothing from the global RNG (a seeded run stays the same whether or not an adapter was loaded)."""
    quarter = create_adapter("linear", text, 0.25, generator=torch.Generator().manual_seed(3))
    target = dataclasses.replace(TARGET, kind="linear")
    data = to_bytes(quarter, build_meta(quarter, target))
    torch.manual_seed(7)
    want = torch.rand(3)
    torch.manual_seed(7)
    loaded, _ = from_bytes(data, target, text)
    assert torch.equal(torch.rand(3), want)
    assert loaded.residual == 0.25 and not any(p.requires_grad for p in loaded.parameters())
    assert torch.equal(loaded.weight, quarter.weight)


def test_metadata_holds_every_block_under_its_name(adapter) -> None:
    """Readers (the registry's audit, `anoclip adapters show`, the gate report) look blocks up by name; the
    creation time is UTC, so workers in different time zones order versions the same way."""
    tm = TrainingMeta(steps=3, seconds=0.5, stopped_by="steps", frames_train=4, frames_val=2, loss_first=1.0,
                      loss_last=0.5, params={"lr": 0.01}, budget={"max_steps": 3})
    meta = build_meta(adapter, TARGET, training_window={"frames": 6}, validation={"auroc": 0.9}, training=tm)
    assert set(meta) == {"format", "format_version", "id", "kind", "embed_dim", "out_dim", "residual", "arch",
                         "weights_id", "precision", "prompt_hash", "line", "created", "training_window",
                         "validation", "training", "thresholds"}
    assert (meta["training_window"], meta["validation"], meta["training"]) == ({"frames": 6}, {"auroc": 0.9},
                                                                               tm.to_dict())
    assert meta["created"].endswith("+00:00") and abs(
        datetime.fromisoformat(meta["created"]) - datetime.now(UTC)).total_seconds() < 60
    bare = build_meta(adapter, TARGET, created="2026-01-01T00:00:00+00:00")
    assert bare["created"] == "2026-01-01T00:00:00+00:00"
    assert (bare["training_window"], bare["validation"], bare["training"], bare["thresholds"]) == ({}, {}, {}, {})


def test_a_lines_target_is_what_the_inspector_serves() -> None:
    """Every field of the target comes from the serving model and the line (a bf16 model: adapters trained
    under another precision are told apart)."""
    model = SimpleNamespace(arch="ViT-B-16", weights_id="w-9", embed_dim=512, precision="bf16")
    inspector = SimpleNamespace(model=model, prompt_hash=lambda line: f"hash-of-{line}",
                                line=lambda line: SimpleNamespace(adapter_kind="linear"))
    assert target_for(inspector, "pcb1") == AdapterTarget("ViT-B-16", "w-9", 512, "hash-of-pcb1", "pcb1", "linear",
                                                          "bf16")


def test_a_header_nested_past_the_parsers_depth_is_refused_by_name_not_a_crash() -> None:
    """A crafted registry blob (200 KB of nested `[`) once raised RecursionError and crash-looped every worker."""
    import struct

    from pipeline.errors import AdapterMismatchError

    header = b"[" * 200_000
    blob = struct.pack("<Q", len(header)) + header
    with pytest.raises(AdapterMismatchError, match="no anoclip_adapter metadata|not an anoclip adapter"):
        read_meta(blob)
