"""The Redis key layout, in one place, so the worker, the CLI and the dashboard never disagree.

Every key starts with the configured prefix. Frame-scoped keys carry the producer's frame id, which
is what makes replays idempotent.
"""

from __future__ import annotations

from dataclasses import dataclass


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
        """String set with NX when a frame's stream entries are written: a replay finds it and skips."""
        return f"{self.prefix}:done:{frame_id}"

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

    # --- adapter registry --------------------------------------------------------------------
    def adapter_versions(self, line: str) -> str:
        """Sorted set of the line's immutable adapter versions, scored by creation time."""
        return f"{self.prefix}:adapters:{line}:versions"

    def adapter_version(self, line: str, version: str) -> str:
        """Hash: `tensors` (safetensors bytes) and `meta` (JSON)."""
        return f"{self.prefix}:adapters:{line}:v:{version}"

    def adapter_seq(self, line: str) -> str:
        """Counter naming the line's versions v1, v2, ..."""
        return f"{self.prefix}:adapters:{line}:seq"

    def adapter_current(self, line: str) -> str:
        """String: the version workers serve; moved atomically."""
        return f"{self.prefix}:adapters:{line}:current"

    def adapter_paused(self, line: str) -> str:
        return f"{self.prefix}:adapters:{line}:paused"

    def adapter_audit(self, line: str) -> str:
        """Stream: who/what/when/why for every promotion, refusal, rollback, pause and resume."""
        return f"{self.prefix}:adapters:{line}:audit"

    def adapter_lock(self, line: str) -> str:
        """Lock with expiry electing the line's single trainer."""
        return f"{self.prefix}:adapters:{line}:lock"

    def adapter_refresh_requests(self, line: str) -> str:
        """Stream of on-demand refresh requests; outcomes are answered on the audit stream."""
        return f"{self.prefix}:adapters:{line}:refresh"
