"""Bank files: safetensors bytes with `features` (fp16), `origin` (int64) and JSON metadata in the header (what a
registry stores, like adapters; never pickles). Loading checks the bank fits the model, the line and the feature
choice (`BankTarget`)."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

import torch
from safetensors.torch import save as st_save

from pipeline.adaptation.artifacts import load_tensors, read_header_meta
from pipeline.adaptation.memory.bank import BankScales, MemoryBank, content_id
from pipeline.adaptation.memory.params import FORMAT, FORMAT_VERSION, BankTarget, MemoryBankError

META_KEY = "anoclip_memory"
_MAX_HEADER = 1 << 26


def to_bytes(bank: MemoryBank) -> bytes:
    """safetensors bytes: `features` (fp16), `origin` (int64), metadata (with the frame ids) in the header."""
    meta = dict(bank.meta, frame_ids=bank.frames)
    tensors = {"features": bank.features.to(torch.float16).contiguous(), "origin": bank.origin.contiguous()}
    return st_save(tensors, metadata={META_KEY: json.dumps(meta, sort_keys=True)})


def read_meta(data: bytes) -> dict[str, Any]:
    """The bank's metadata from safetensors bytes (parses only the JSON header)."""
    return read_header_meta(data, meta_key=META_KEY, fmt=FORMAT, version=FORMAT_VERSION, error=MemoryBankError,
                            noun="memory bank", max_header=_MAX_HEADER)


def check_meta(meta: dict[str, Any], target: BankTarget) -> None:
    """Raise MemoryBankError naming every way the bank does not fit `target`."""
    want = asdict(target)
    want["layers"] = list(target.layers)
    problems = [f"its {k} is {meta.get(k)!r}, expected {v!r}" for k, v in want.items() if meta.get(k) != v]
    if problems:
        raise MemoryBankError("memory bank does not fit: " + "; ".join(problems))


def from_bytes(data: bytes, target: BankTarget | None = None) -> MemoryBank:
    """Read (and, given a target, check) a bank; MemoryBankError on anything that is not a sound bank."""
    meta = read_meta(data)
    if target is not None:
        check_meta(meta, target)
    tensors = load_tensors(data, ("features", "origin"), error=MemoryBankError, noun="memory bank")
    feats, origin = tensors["features"], tensors["origin"]
    frames = meta.pop("frame_ids", None)
    if not isinstance(frames, list):
        raise MemoryBankError("memory bank metadata lacks its frame ids")
    m = feats.shape[0] if feats.ndim == 2 else -1
    if feats.dtype != torch.float16 or feats.ndim != 2 or feats.shape[1] != meta.get("feature_dim"):
        raise MemoryBankError(f"memory bank features are {tuple(feats.shape)} {feats.dtype}, "
                              f"expected (M, {meta.get('feature_dim')}) float16")
    if origin.dtype != torch.int64 or tuple(origin.shape) != (m,) or (
        m and (int(origin.min()) < 0 or int(origin.max()) >= len(frames))
    ):
        raise MemoryBankError("memory bank origins do not match its rows and frames")
    if not bool(torch.isfinite(feats).all()):
        raise MemoryBankError("memory bank features hold non-finite values")
    try:
        scales = BankScales.from_dict(meta["scales"])
    except (KeyError, TypeError, ValueError) as e:
        raise MemoryBankError(f"memory bank scales invalid: {e}") from e
    essentials = {"line": meta["line"], **{k: meta[k] for k in ("arch", "weights_id", "layers", "neighbourhood",
                                                               "feature_dim")}, "scales": scales.to_dict()}
    if content_id(feats, origin, essentials) != meta.get("id"):
        raise MemoryBankError("memory bank content does not match its id (damaged or altered)")
    return MemoryBank(feats, origin, frames, scales, meta)
