"""The Redis key layout, in one place, so the worker, the CLI and the dashboard never disagree.

Every key starts with the configured prefix. Frame-scoped keys carry the producer's frame id, which
is what makes replays idempotent.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

FRAME_ID_MAX_LEN = 200
FRAME_ID_RE = re.compile(rf"^(?!.*\.\.)[A-Za-z0-9._:\-]{{1,{FRAME_ID_MAX_LEN}}}$")
"""The one frame-id rule, shared by the envelope (which dead-letters other ids) and the dashboard (which
refuses them in URLs): ASCII letters, digits and `. _ : -`, no `..`, at most 200 characters. Ids become
Redis keys and URL path segments, so nothing that could split, escape or glob either is allowed."""


def frame_id_problem(frame_id: str) -> str | None:
    """Why `frame_id` breaks the frame-id rule, in words; None if it keeps it."""
    if FRAME_ID_RE.match(frame_id):
        return None
    if not frame_id:
        return "it is empty"
    if len(frame_id) > FRAME_ID_MAX_LEN:
        return f"it has {len(frame_id)} characters (at most {FRAME_ID_MAX_LEN})"
    if not frame_id.isascii():
        return "it is not ASCII"
    if ".." in frame_id:
        return "it contains '..'"
    bad = sorted({c for c in frame_id if not re.match(r"[A-Za-z0-9._:\-]", c)})
    return f"it contains {''.join(bad)!r} (allowed: letters, digits and . _ : -)"


@dataclass(frozen=True)
class RedisKeys:
    prefix: str = "anoclip"

    # --- results and alerts ------------------------------------------------------------------
    def results_stream(self, line: str) -> str:
        """Stream: one entry per scored frame of the line (trimmed with MAXLEN ~)."""
        return f"{self.prefix}:results:{line}"

    @property
    def alerts_stream(self) -> str:
        """Stream: anomalous frames of every line."""
        return f"{self.prefix}:alerts"

    def done_marker(self, frame_id: str) -> str:
        """String, no TTL (never evicted): the content digest a frame was published with. A replay finds it
        and skips; a reused id with other content finds it and is dead-lettered. Expired by the publisher
        through `done_index`."""
        return f"{self.prefix}:done:{frame_id}"

    @property
    def done_index(self) -> str:
        """Sorted set, no TTL: frame ids by publish time (ms), so done markers older than `redis.done_ttl_s` are
        deleted by the publish script itself (a TTL would make them evictable)."""
        return f"{self.prefix}:done_index"

    def frame(self, frame_id: str, kind: str) -> str:
        """Per-frame blobs with a TTL; kind is result (JSON), mask (PNG), heatmap (PNG) or image."""
        return f"{self.prefix}:frame:{frame_id}:{kind}"

    def latest(self, line: str, kind: str) -> str:
        """The line's most recent result (JSON), mask, heatmap or image."""
        return f"{self.prefix}:latest:{line}:{kind}"

    @property
    def live_channel(self) -> str:
        """Pub/sub channel for dashboards; streams remain the reliable path."""
        return f"{self.prefix}:live"

    # --- thresholds and workers --------------------------------------------------------------
    def threshold(self, line: str) -> str:
        """Hash: image, pixel, source (config|calibrated|manual), updated, normal-score statistics."""
        return f"{self.prefix}:threshold:{line}"

    def worker(self, worker_id: str) -> str:
        """Hash with a TTL: a worker's heartbeat (lines, frames/s, lag, last seen)."""
        return f"{self.prefix}:worker:{worker_id}"

    @property
    def workers_pattern(self) -> str:
        return f"{self.prefix}:worker:*"

    # --- adapter registry (and the memory-bank registry: the same layout under `kind="banks"`) ---------
    def registry_versions(self, line: str, *, kind: str = "adapters") -> str:
        """Sorted set of the line's immutable adapter versions, scored by creation time."""
        return f"{self.prefix}:{kind}:{line}:versions"

    def registry_version(self, line: str, version: str, *, kind: str = "adapters") -> str:
        """Hash: `tensors` (safetensors bytes) and `meta` (JSON)."""
        return f"{self.prefix}:{kind}:{line}:v:{version}"

    def registry_seq(self, line: str, *, kind: str = "adapters") -> str:
        """Counter naming the line's versions v1, v2, ..."""
        return f"{self.prefix}:{kind}:{line}:seq"

    def registry_current(self, line: str, *, kind: str = "adapters") -> str:
        """String: the version workers serve; moved atomically."""
        return f"{self.prefix}:{kind}:{line}:current"

    def registry_paused(self, line: str, *, kind: str = "adapters") -> str:
        return f"{self.prefix}:{kind}:{line}:paused"

    def registry_audit(self, line: str, *, kind: str = "adapters") -> str:
        """Stream: who/what/when/why for every promotion, refusal, rollback, pause and resume."""
        return f"{self.prefix}:{kind}:{line}:audit"

    def registry_lock(self, line: str, *, kind: str = "adapters") -> str:
        """Lock with expiry electing the line's single trainer."""
        return f"{self.prefix}:{kind}:{line}:lock"

    def registry_refresh_requests(self, line: str, *, kind: str = "adapters") -> str:
        """Stream of on-demand refresh requests; outcomes are answered on the audit stream."""
        return f"{self.prefix}:{kind}:{line}:refresh"

    REGISTRY_KINDS = ("adapters", "banks")
    """`kind` of the registry keys above: TTA adapters, or the per-line patch-memory banks (docs/memory.md)."""

    # --- operator labels on alerts (pipeline/operators/labels.py) ----------------------------------------
    def label(self, frame_id: str) -> str:
        """Hash: an alert's acknowledgement, label (confirmed / false_alarm / unsure), defect type, comment,
        who and when. No TTL: labels outlive the frame's own keys."""
        return f"{self.prefix}:labels:frame:{frame_id}"

    def label_blob(self, frame_id: str, kind: str) -> str:
        """String, no TTL: the labelled frame's image or mask, copied when it is labelled (for exports)."""
        return f"{self.prefix}:labels:blob:{frame_id}:{kind}"

    def labels_index(self, line: str) -> str:
        """Sorted set: the line's labelled or acknowledged frame ids, scored by alert time (ms)."""
        return f"{self.prefix}:labels:line:{line}"

    def label_counts(self, line: str) -> str:
        """Hash: the line's current count per label, per confirmed defect type (`type:<name>`), acknowledged."""
        return f"{self.prefix}:labels:counts:{line}"

    @property
    def labels_audit(self) -> str:
        """Stream: who acknowledged, labelled or commented which alert, when, and what it was before."""
        return f"{self.prefix}:labels:audit"
