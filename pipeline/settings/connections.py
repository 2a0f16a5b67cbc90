"""How the pipeline reaches its services and runs its workers: Kafka, Redis and the inspection worker."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from pipeline.settings.section import _Section


class KafkaSettings(_Section):
    """Client settings. Defaults suit Apache Kafka; the local Tansu broker needs the overrides in config.yaml."""

    bootstrap_servers: str = "127.0.0.1:19092"
    frames_topic: str = "frames"
    dlq_topic: str = "frames.dlq"
    group_id: str = "anoclip-workers"
    partitions: int = Field(4, ge=1)
    replication_factor: int = Field(1, ge=1)
    client_id: str = "anoclip"
    session_timeout_ms: int = Field(45000, ge=1000)
    heartbeat_interval_ms: int = Field(3000, ge=100)
    max_poll_records: int = Field(50, ge=1)
    max_poll_interval_ms: int = Field(300000, ge=1000)
    auto_offset_reset: Literal["earliest", "latest"] = "earliest"
    enable_idempotence: bool = True
    acks: Literal["all", "1", "0"] = "all"
    linger_ms: int = Field(5, ge=0)
    max_request_size: int = Field(16 << 20, ge=1 << 20)
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: str | None = Field(None, repr=False)
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    batch_size: int = Field(1 << 20, ge=0)
    """Producer batch bytes; frames are tens of KB, so the 16 KB client default would send them one by one."""
    max_partition_fetch_bytes: int = Field(8 << 20, ge=1 << 16)
    """Consumer fetch bytes per partition; a few frames per fetch."""
    fetch_max_wait_ms: int = Field(500, ge=0)
    """How long the broker may hold a fetch waiting for data (Tansu holds it the full time: set it low)."""
    request_timeout_ms: int = Field(30000, ge=1000)
    local_dir: str = ".kafka"
    """Local stack only: cache of the pinned Tansu broker binary, its pid file and log."""
    local_storage: str = "memory://tansu/"
    partition_key: Literal["frame", "camera", "line"] = "frame"
    """Record key of a frame, which picks its partition: `frame` (its id) spreads every line over all partitions,
    so up to `partitions` workers share one line; `camera` keeps each camera's frames in order on one partition;
    `line` puts a whole line on one partition, scored by one worker at a time."""
    """Local stack only: Tansu storage URL (`memory://` forgets everything on restart)."""

    @model_validator(mode="after")
    def _sasl_complete(self) -> KafkaSettings:
        if self.security_protocol.startswith("SASL") and not (
            self.sasl_mechanism and self.sasl_username and self.sasl_password
        ):
            raise ValueError("SASL needs sasl_mechanism, sasl_username and sasl_password")
        return self


class RedisSettings(_Section):
    """Where results, alerts, masks and the adapter registry live."""

    url: str = "redis://127.0.0.1:6379/0"
    prefix: str = "anoclip"
    username: str | None = None
    password: str | None = Field(None, repr=False)
    ssl_ca_certs: str | None = None
    results_maxlen: int = Field(100_000, ge=100)
    alerts_maxlen: int = Field(100_000, ge=100)
    frame_ttl_s: int = Field(24 * 3600, ge=1)
    socket_timeout_s: float = Field(5.0, gt=0)
    done_ttl_s: int = Field(24 * 3600, ge=60)
    """How long a frame's done marker is kept (expired by the publisher, never evicted): a replay older than
    this would publish twice."""
    stream_max_age_s: int | None = Field(None, ge=60)
    """Also trim the results and alerts streams to entries younger than this (MINID); None: MAXLEN only."""
    store_heatmaps: Literal["all", "alerts", "none"] = "alerts"
    """Per-frame heatmap PNGs kept: for every frame, for alerts only, or none (the line's latest is always kept)."""
    store_masks: Literal["all", "alerts"] = "all"
    """Per-frame mask PNGs kept: for every frame (a normal frame's empty mask is ~100 bytes) or alerts only."""
    local_maxmemory: str = Field("1gb", pattern=r"^[0-9]+(b|kb|mb|gb)?$")
    """Local stack only: `maxmemory` of the redis-server it starts, with eviction `volatile-lru` (only keys with
    a TTL, the per-frame blobs, are ever evicted; docs/operations.md)."""
    heartbeat_ttl_s: int = Field(30, ge=2)
    """A worker's heartbeat hash expires this long after its last beat."""
    local_dir: str = ".stack/redis"
    """Local stack only: data, pid file and log of a redis-server the stack starts itself."""


class WorkerSettings(_Section):
    """Inspection worker behaviour."""

    max_batch: int = Field(8, ge=1)
    max_wait_ms: int = Field(50, ge=0)
    max_frame_bytes: int = Field(32 << 20, ge=1024)
    max_pixels: int = Field(50_000_000, ge=1024)
    max_side: int = Field(16384, ge=64)
    """Longest side in pixels a frame may have; checked from the image header, before decoding."""
    max_aspect_ratio: float = Field(8.0, ge=1)
    """Long side / short side a frame may have (a 1 x 6000 strip is 6000 model tiles); checked before decoding."""
    max_tiles: int = Field(8, ge=1)
    """Model tiles a frame may need (`model.resize: tile` cuts about long/short square tiles); checked before
    decoding."""
    render_max_side: int = Field(1024, ge=64)
    """Masks and heatmaps are rendered and stored with at most this long side; regions stay in frame pixels."""
    metrics_host: str = "127.0.0.1"
    metrics_port: int = Field(9400, ge=0, le=65535)
    retry_backoff_s: float = Field(0.5, gt=0)
    retry_backoff_max_s: float = Field(10.0, gt=0)
    max_in_flight: int = Field(64, ge=1)
    """Frames polled but not yet published; above this the worker pauses its partitions (backpressure)."""
    commit_interval_ms: int = Field(0, ge=0)
    """Commit at most this often (0 = after every published batch); larger values mean more replays."""
    drain_timeout_s: float = Field(30.0, gt=0)
    """On SIGTERM, how long to wait for the batch in hand to be published before leaving anyway."""
    heartbeat_interval_s: float = Field(5.0, gt=0)
    """How often the worker writes its heartbeat hash and re-reads run-time threshold overrides."""
    worker_id: str | None = None
    """Name in heartbeats and logs; default host-pid."""
