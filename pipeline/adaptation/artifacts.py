"""The one artifact format of what a line learns: safetensors bytes (tensors, never pickles) whose header carries
the artifact's JSON metadata under a kind's key, with a format name and version. Adapters (`tta/files.py`) and
memory banks (`memory/files.py`) both write it; the registry stores the bytes and the same metadata as JSON."""

from __future__ import annotations

import json
import struct
from typing import Any

import torch
from safetensors.torch import load as st_load

MAX_HEADER = 1 << 24
"""The largest safetensors header read (16 MiB): a bigger one is refused before it is parsed."""


def read_header_meta(
    data: bytes, *, meta_key: str, fmt: str, version: int, error: type[Exception], noun: str, article: str = "a",
    max_header: int = MAX_HEADER,
) -> dict[str, Any]:
    """The JSON metadata under `meta_key` in a safetensors header (parses only the header, loads no tensors).

    Shared by adapter files (`tta/files.py`) and memory banks (`memory/files.py`): anything that is not
    safetensors, lacks the metadata, or has another format or format version raises `error`, whose message
    names the `noun` ("adapter file", "memory bank").
    """
    if len(data) < 8:
        raise error(f"not {article} {noun}: too short to be safetensors")
    (n,) = struct.unpack("<Q", data[:8])
    if n > max_header or 8 + n > len(data):
        raise error(f"not {article} {noun}: invalid safetensors header")
    try:
        header = json.loads(data[8 : 8 + n])
        meta = json.loads(header["__metadata__"][meta_key])
    except (ValueError, KeyError, TypeError, RecursionError) as e:  # nested JSON too deep: not ours either
        raise error(f"not an anoclip {noun}: no {meta_key} metadata in its safetensors header") from e
    if not isinstance(meta, dict) or meta.get("format") != fmt:
        raise error(f"not an anoclip {noun}: unknown format")
    if meta.get("format_version") != version:
        raise error(f"{noun} format version {meta.get('format_version')} is not supported (this build reads {version})")
    return meta


def load_tensors(data: bytes, names: tuple[str, ...], *, error: type[Exception], noun: str) -> dict[str, torch.Tensor]:
    """The artifact's tensors, which must be exactly `names`; `error` naming the `noun` otherwise (safetensors
    raises its own error types for damaged data)."""
    try:
        tensors = st_load(data)
    except Exception as e:
        raise error(f"{noun} tensors unreadable: {e}") from e
    if set(tensors) != set(names):
        raise error(f"{noun} holds tensors {sorted(tensors)}, expected {' and '.join(names)}")
    return tensors
