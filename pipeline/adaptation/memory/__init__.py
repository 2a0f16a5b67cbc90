"""A line's normal patch memory around the FrameScorer (docs/memory.md).

* `params` — `MemoryParams` (the `memory:` settings), `BankTarget` (what a bank must fit), `MemoryBankError`.
* `records` — `FrameRecord`: a scored frame's patch features as the memory sees them; `score_frames`.
* `bank` — `MemoryBank`, its scales, and `build_bank` (greedy coreset to the byte budget, calibrated scales).
* `files` — `to_bytes` / `from_bytes`: banks as safetensors bytes, checked against a `BankTarget` on load.
* `scoring` — `BankScorer`: a frame's fused map and image score from a bank, or from mutual scoring.
* `stream` — `StreamMemory`: cold start, patch admission, doubling refreshes; `replay_stream`, `bank_thresholds`.
* `gate` — `gate_bank`: a candidate bank checked on held-out frames with pasted defects (`make_positives`).
* `service` — `MemoryService`, the worker-side owner: per-line streams, builds, gate, registry and thresholds.

Pure-torch math lives in `pipeline.model.memory`; this package wires it to lines, frames and settings.
"""
