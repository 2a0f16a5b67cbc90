"""Adapter files: the one artifact format (`pipeline.adaptation.artifacts`: safetensors tensors plus JSON metadata
in the header; never pickles) with an adapter's metadata.

The same bytes (`to_bytes` / `from_bytes`) go to disk and into the version registry in Redis
(`pipeline.adaptation.registry`). An adapter only means something for the exact model weights, prompt
sentences and line it was trained with, so loading checks all of them against an `AdapterTarget` and raises
`AdapterMismatchError` naming the difference.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save as st_save

from pipeline.adaptation.artifacts import load_tensors, read_header_meta
from pipeline.errors import AdapterMismatchError
from pipeline.model.adapters import ResidualAdapter, create_adapter
from pipeline.model.text import TextFeatures
from pipeline.model.tta_train import TrainingReport
from pipeline.settings import ADAPTER_KINDS

if TYPE_CHECKING:
    from pipeline.inspection.frame_scorer import FrameScorer

FORMAT = "anoclip-adapter"
FORMAT_VERSION = 1
META_KEY = "anoclip_adapter"


@dataclass(frozen=True)
class AdapterTarget:
    """What an adapter must fit: the model (arch, exact weights, width), the line and its prompts."""

    arch: str
    weights_id: str
    embed_dim: int
    prompt_hash: str
    line: str
    kind: str | None = None
    """The line's adapter kind; None accepts either."""
    precision: str = "fp32"


def target_for(inspector: FrameScorer, line_id: str) -> AdapterTarget:
    """The target of a line as the FrameScorer serves it."""
    m = inspector.model
    return AdapterTarget(m.arch, m.weights_id, m.embed_dim, inspector.prompt_hash(line_id), line_id,
                         inspector.line(line_id).adapter_kind, m.precision)


def adapter_id(adapter: ResidualAdapter) -> str:
    """Content id of the trained tensors (and what they mean): equal ids, equal adapters."""
    h = hashlib.sha256(f"{adapter.kind}|{adapter.residual}|{adapter.embed_dim}|{adapter.out_dim}".encode())
    for t in (adapter.weight, adapter.bias):
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:12]


@dataclass(frozen=True)
class TrainingMeta:
    """The `training` block of an adapter's metadata: one schema for `anoclip adapt` and streaming refreshes."""

    steps: int
    seconds: float
    stopped_by: str
    frames_train: int
    frames_val: int
    loss_first: float | None
    loss_last: float | None
    params: dict[str, Any]
    budget: dict[str, Any]

    @classmethod
    def from_report(cls, report: TrainingReport) -> TrainingMeta:
        d = report.to_dict()  # JSON-ready params and budget (an unlimited budget is None)
        return cls(steps=report.steps, seconds=round(report.seconds, 3), stopped_by=report.stopped_by,
                   frames_train=report.frames_train, frames_val=report.frames_val,
                   loss_first=report.losses[0] if report.losses else None,
                   loss_last=report.losses[-1] if report.losses else None, params=d["params"], budget=d["budget"])

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def build_meta(
    adapter: ResidualAdapter,
    target: AdapterTarget,
    *,
    training_window: dict[str, Any] | None = None,
    validation: dict[str, Any] | None = None,
    training: TrainingMeta | None = None,
    created: str | None = None,
    thresholds: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The metadata stored with an adapter (JSON-ready). `thresholds`: the adapter's own image/pixel thresholds,
    calibrated on its held-out frames (`TrainingReport.thresholds`); whoever serves it judges with them."""
    if adapter.stack is not None:
        raise ValueError("save one adapter at a time (use adapter.unstack(i))")
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "id": adapter_id(adapter),
        "kind": adapter.kind,
        "embed_dim": adapter.embed_dim,
        "out_dim": adapter.out_dim,
        "residual": adapter.residual,
        "arch": target.arch,
        "weights_id": target.weights_id,
        "precision": target.precision,
        "prompt_hash": target.prompt_hash,
        "line": target.line,
        "created": created or datetime.now(UTC).isoformat(timespec="seconds"),
        "training_window": training_window or {},
        "validation": validation or {},
        "training": training.to_dict() if training is not None else {},
        "thresholds": _json_ready(thresholds or {}),
    }


def _json_ready(d: dict[str, Any]) -> dict[str, Any]:
    """Non-finite floats become None (JSON has no NaN)."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in d.items()}


def to_bytes(adapter: ResidualAdapter, meta: dict[str, Any]) -> bytes:
    """safetensors bytes of the adapter's weight and bias with `meta` in the header."""
    if adapter.stack is not None:
        raise ValueError("save one adapter at a time (use adapter.unstack(i))")
    tensors = {"weight": adapter.weight.detach().float().cpu().contiguous(),
               "bias": adapter.bias.detach().float().cpu().contiguous()}
    return st_save(tensors, metadata={META_KEY: json.dumps(meta, sort_keys=True, default=str)})




def read_meta(data: bytes) -> dict[str, Any]:
    """The adapter metadata from safetensors bytes (parses only the JSON header; loads no tensors)."""
    return read_header_meta(data, meta_key=META_KEY, fmt=FORMAT, version=FORMAT_VERSION, error=AdapterMismatchError,
                            noun="adapter file", article="an")


def check_meta(meta: dict[str, Any], target: AdapterTarget) -> None:
    """Raise AdapterMismatchError with every way `meta` does not fit `target`."""
    problems = []
    if meta.get("kind") not in ADAPTER_KINDS:
        problems.append(f"unknown adapter kind {meta.get('kind')!r}")
    elif target.kind is not None and meta["kind"] != target.kind:
        problems.append(f"it is a {meta['kind']} adapter but line {target.line!r} uses {target.kind} adapters")
    if meta.get("line") != target.line:
        problems.append(f"it was trained for line {meta.get('line')!r}, not {target.line!r}")
    if meta.get("arch") != target.arch:
        problems.append(f"it was trained on model {meta.get('arch')!r}, not {target.arch!r}")
    if meta.get("weights_id") != target.weights_id:
        problems.append(f"it was trained with weights {meta.get('weights_id')!r}, the model has {target.weights_id!r}")
    if meta.get("embed_dim") != target.embed_dim:
        problems.append(f"its token width is {meta.get('embed_dim')}, the model's is {target.embed_dim}")
    if meta.get("prompt_hash") != target.prompt_hash:
        problems.append(
            f"its prompt set {meta.get('prompt_hash')} differs from the line's {target.prompt_hash} "
            "(class name, domain or extra states changed)"
        )
    if problems:
        raise AdapterMismatchError("adapter does not fit: " + "; ".join(problems))


def from_bytes(
    data: bytes, target: AdapterTarget, text: TextFeatures, compute_dtype: torch.dtype | None = None
) -> tuple[ResidualAdapter, dict[str, Any]]:
    """Check and load an adapter for `target`; `text` is the line's text features (the text adapter's basis).

    `compute_dtype`: serve it under autocast (`TTAParams(precision=...).compute_dtype`); None = fp32.
    """
    meta = read_meta(data)
    check_meta(meta, target)
    tensors = load_tensors(data, ("weight", "bias"), error=AdapterMismatchError, noun="adapter")
    try:
        residual = float(meta["residual"])
        adapter = create_adapter(meta["kind"], text, residual, init=False)
    except (KeyError, TypeError, ValueError) as e:
        raise AdapterMismatchError(f"adapter metadata invalid: {e}") from e
    for name, t in tensors.items():
        want = tuple(getattr(adapter, name).shape)
        if tuple(t.shape) != want or not t.is_floating_point():
            raise AdapterMismatchError(
                f"adapter {name} has shape {tuple(t.shape)} ({t.dtype}) but this line needs {want} "
                "(the line's prompt sentences or the model width differ)"
            )
    with torch.no_grad():
        adapter.weight.copy_(tensors["weight"])
        adapter.bias.copy_(tensors["bias"])
    if not (torch.isfinite(adapter.weight).all() and torch.isfinite(adapter.bias).all()):
        raise AdapterMismatchError("adapter tensors hold non-finite values")
    adapter.requires_grad_(False)
    adapter.compute_dtype = compute_dtype
    return adapter, meta


def save_adapter(path: str | os.PathLike[str], adapter: ResidualAdapter, meta: dict[str, Any]) -> Path:
    """Write atomically (temp file + rename) so a reader never sees half a file."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(to_bytes(adapter, meta))
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return p


def load_adapter(
    path: str | os.PathLike[str], target: AdapterTarget, text: TextFeatures, compute_dtype: torch.dtype | None = None
) -> tuple[ResidualAdapter, dict[str, Any]]:
    """Read, check and load an adapter file; AdapterMismatchError (with the file name) if it does not fit."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise AdapterMismatchError(f"cannot read adapter file {p}: {e.strerror or e}") from e
    try:
        return from_bytes(data, target, text, compute_dtype)
    except AdapterMismatchError as e:
        raise AdapterMismatchError(f"{p}: {e}") from e


def target_dict(target: AdapterTarget) -> dict[str, Any]:
    return asdict(target)
