"""The one settings model: `config.yaml`, overridden by `ANOCLIP_...` environment variables.

Nested keys use `__` (`ANOCLIP_MODEL__PRETRAINED=none`); lists take JSON
(`ANOCLIP_LINES='[{"id": "bottle", "class_name": "bottle"}]'`). Every error names its key, and
`load_settings` is called at start-up so a bad config never reaches a running worker. The layering is
pydantic-settings' own (`settings_customise_sources`: its environment and YAML sources, first wins):
`load_settings` overrides > `ANOCLIP_...` variables > the YAML file > defaults.
"""

from __future__ import annotations

import json
import os
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from pipeline.errors import ConfigError, UnknownLineError

DEFAULT_CONFIG = "config.yaml"
CONFIG_ENV = "ANOCLIP_CONFIG"

AdapterKind = Literal["text", "linear"]
"""The TTA adapter kinds (`pipeline.model.adapters.create_adapter` builds each)."""
ADAPTER_KINDS: tuple[str, ...] = get_args(AdapterKind)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSettings(_Section):
    """Backbone, weights and scoring choices shared by every line."""

    arch: str = "ViT-B-16-plus-240"
    pretrained: str = "laion400m_e32"
    """open_clip pretrained tag, a local checkpoint path, or `none` (random init: tests and smoke runs)."""
    seed: int = 0
    """Seed for random init (`pretrained: none`) so text caches and tests are reproducible."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16", "int8"] = "auto"
    """`auto`: bf16 on CPUs with native bf16 (AVX512-BF16 or AMX), else fp32 (fp32 on CUDA and in exported
    runtimes, whose reduced precisions are opt-in). `int8`: dynamic quantisation, exported runtimes only."""
    runtime: Literal["torch", "onnxruntime", "openvino"] = "torch"
    """What runs the image encoder: torch, or the encoder exported by `anoclip export` (docs/runtimes.md)."""
    runtime_dir: str = "~/.cache/anoclip/runtimes"
    """A folder written by `anoclip export`, or a cache where the encoder is exported on first use."""
    vv_start_block: int = Field(1, ge=1)
    """First block (1-based) of the value-wise path; the official code uses 1 (all blocks)."""
    feature_layers: list[int] = Field(default_factory=list)
    """Blocks whose V-V tokens are fused (1-based). Empty = the last block only, as the official code."""
    temperature: float = Field(1.0, gt=0)
    """Multiplier on cosine similarities before the softmax; the official code uses 1 (none)."""
    image_score: Literal["cls", "multiview"] = "cls"
    resize: Literal["tile", "squash"] = "tile"
    """`tile`: keep aspect, score overlapping square tiles along the long side. `squash`: resize to a square."""
    batch_size: int = Field(8, ge=1)
    text_cache_dir: str = "~/.cache/anoclip/text"

    @field_validator("pretrained")
    @classmethod
    def _pretrained_not_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must be an open_clip tag, a checkpoint path or 'none'")
        return v.strip()

    @field_validator("feature_layers")
    @classmethod
    def _layers_positive(cls, v: list[int]) -> list[int]:
        if any(i < 1 for i in v):
            raise ValueError("block numbers are 1-based")
        return sorted(set(v))

    @model_validator(mode="after")
    def _runtime_precision(self) -> ModelSettings:
        """Combinations no runtime can run fail at start-up, naming the keys."""
        if self.precision == "int8" and self.runtime == "torch":
            raise ValueError("precision int8 needs runtime onnxruntime or openvino (exported encoder)")
        if self.runtime != "torch" and self.device == "cuda":
            raise ValueError(f"runtime {self.runtime} runs on the CPU; use device cpu (or auto) or runtime torch")
        if self.runtime != "torch" and self.precision == "fp16":
            raise ValueError(f"precision fp16 is for CUDA with runtime torch, not runtime {self.runtime}")
        if self.runtime == "onnxruntime" and self.precision == "bf16":
            raise ValueError("precision bf16 with runtime onnxruntime: it has no bf16 CPU kernels; use openvino")
        return self


class ThresholdSettings(_Section):
    """How a line turns scores into verdicts and masks."""

    image: float | None = None
    """Fixed image-score threshold; overrides calibration."""
    pixel: float | None = None
    """Fixed pixel threshold for masks; overrides calibration."""
    quantile: float = Field(0.99, gt=0, lt=1)
    """Quantile of the warm-up image scores used as the calibrated image threshold."""
    pixel_quantile: float = Field(0.999, gt=0, lt=1)
    """Quantile of the warm-up pixel scores used as the calibrated pixel (mask) threshold."""
    warmup_frames: int = Field(100, ge=0)
    """Frames scored before calibration; 0 = never calibrate (use the fixed or default threshold)."""
    default_image: float = 0.5
    """Threshold before calibration: p(abnormal) = 0.5 is where the abnormal prompt wins."""
    default_pixel: float = 0.5
    heatmap_span: float = Field(0.02, gt=0)
    """Heatmap colour range around the pixel threshold until the line has its own statistics."""


class LineSettings(_Section):
    """One product line: what it makes and how it is judged."""

    id: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$")
    class_name: str = Field(min_length=1)
    domain: Literal["object", "texture"] = "object"
    extra_normal_states: list[str] = Field(default_factory=list)
    extra_abnormal_states: list[str] = Field(default_factory=list)
    adapter_kind: AdapterKind = "text"
    threshold: ThresholdSettings = Field(default_factory=ThresholdSettings)
    memory: Literal["off", "stream"] = "off"
    """The line's patch memory in the worker (docs/memory.md): `stream` scores each frame by the memory fused
    with the zero-shot map (mutual scoring until the line has a bank, then banks built from its admitted
    frames, versioned in the registry); `off` is zero-shot AnoCLIP, nothing learned. Default `off` although
    the memory is what makes detection work without trained weights (pixel AUROC 0.61 zero-shot vs 0.88
    streamed, random weights) at 1.01-1.17x the cost per frame: `stream` changes a line's scores from
    p(abnormal) to z units of its normal frames, so fixed `threshold` values and calibrations already in
    Redis would be silently misread, and the line starts learning from its frames; both are a line's
    explicit choice. New lines should say `stream` (and leave `threshold.image`/`pixel` unset)."""

    @field_validator("extra_normal_states", "extra_abnormal_states")
    @classmethod
    def _has_slot(cls, v: list[str]) -> list[str]:
        for s in v:
            if s.count("{}") != 1:
                raise ValueError(f"state phrase {s!r} must contain exactly one '{{}}' for the class name")
        return v


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


class TTASettings(_Section):
    """Test-time adaptation (docs/tta.md); the optimisation defaults are the official code's constants.

    The adapter kind (text | linear) is chosen per line (`LineSettings.adapter_kind`). `steps` is the
    per-frame step count; buffered refreshes use the same optimiser constants with their own budget.
    """

    mode: Literal["off", "per_frame", "buffered"] = "off"
    steps: int = Field(5, ge=0)
    """Per-frame mode: AdamW steps per frame (official: 5; 0 = a random, untrained adapter, as the official code)."""
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    noise_std: float = Field(0.055, ge=0)
    """SD of the Gaussian noise added to raw tokens to make the "abnormal" copies (official: 0.05 * 1.1)."""
    entropy_weight: float = Field(1.0, ge=0)
    hard_weight: float = Field(0.5, ge=0)
    residual: float = Field(0.5, ge=0, le=1)
    """Weight of the raw token in the adapter output; the adapter branch gets 1 - residual (official: 0.5/0.5)."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """Adapter matmuls in fp32 (official) or under bf16 autocast: ~2.5x faster per-frame TTA on CPUs with
    AMX, p(abnormal) within ~2e-4 of fp32. Adapters loaded from files follow this too."""
    seed: int = 0
    """Seeds adapter init and noise. Per-frame: every frame uses this seed, so a frame's result never
    depends on the frames before it. Buffered: also seeds the hold-out split and the minibatches."""

    # --- buffered mode: the per-line token buffer and the refresh budget ---------------------------
    buffer_frames: int = Field(1000, ge=2)
    """Most frames a line's token buffer keeps (oldest evicted first)."""
    buffer_bytes: int = Field(512 << 20, ge=1 << 20)
    """Most bytes of fp16 tokens a line's buffer keeps (ViT-B-16-plus-240: ~288 KB per 240x240 frame)."""
    refresh_every: int = Field(500, ge=1)
    """Frames offered to the buffer between two refreshes (stream and replay)."""
    min_frames: int = Field(50, ge=2)
    """Admitted frames needed before a refresh trains anything."""
    refresh_interval_s: float | None = Field(None, gt=0)
    """Stream: also refresh when this many seconds passed since the last one (None: by frame count only)."""
    lock_ttl_s: float = Field(60.0, ge=1)
    """Stream: lease of the per-line trainer lock; renewed while training, expires if the trainer dies."""
    trainer_poll_s: float = Field(1.0, gt=0)
    """Stream: how often the trainer thread looks for due refreshes, requests and new adapter versions."""
    request_grace_s: float = Field(3.0, ge=0)
    """Stream: a worker without enough buffered frames waits this long for a better-fed one to answer a
    refresh request before answering it with a refusal itself."""
    holdout: float = Field(0.2, gt=0, lt=1)
    """Share of buffered frames held out to validate the candidate adapter (never trained on)."""
    train_steps: int = Field(100, ge=1)
    """Step budget of one refresh."""
    train_seconds: float = Field(20.0, gt=0)
    """Time budget of one refresh; whichever budget ends first stops training."""
    train_share: float = Field(0.05, gt=0, le=1)
    """In a stream, a refresh also trains at most this share of the time spent scoring the frames offered
    since the last refresh, so refreshes never starve inference (offline `anoclip adapt` ignores it)."""
    batch_tokens: int = Field(2048, ge=1)
    """Clean tokens per minibatch (each also gets a noisy copy), drawn from all training frames."""

    # --- buffered mode: admission (judged with the base model, never with the adapter being refreshed) --
    admit_max_image_score: float | None = None
    """Frames scoring at or above this are not admitted. None: the line's image threshold once it is
    configured or calibrated (frames the line would call anomalous never enter)."""
    admit_image_z: float | None = Field(2.0, gt=0)
    """Frames whose image score is this many robust SDs above the recent frames' median are not admitted."""
    admit_patch_z: float = Field(3.0, gt=0)
    """Patches this many robust SDs above their frame's median look abnormal and are not labelled normal."""
    admit_max_abnormal_share: float = Field(0.05, ge=0, le=1)
    """Frames with a larger share of abnormal-looking patches are not admitted at all."""

    # --- buffered mode: the validation gate -------------------------------------------------------
    gate_confident_z: float = Field(3.0, gt=0)
    """A validation patch is confidently abnormal at this robust z of its model's own scores."""
    gate_normal_z: float = 1.0
    """...and confidently normal at or below this z; an abnormal one falling below it has flipped."""
    gate_max_flip_share: float = Field(0.2, ge=0, le=1)
    """Refuse a candidate flipping more than this share of confident abnormal (or normal) patches."""
    gate_min_spread_ratio: float = Field(0.25, ge=0)
    """Refuse a candidate whose SD of p(abnormal) falls below this multiple of the base model's."""
    gate_min_confident: int = Field(10, ge=1)
    """Flip shares are judged only over at least this many confident patches; a candidate with neither that many
    confidently abnormal patches nor that many labelled abnormal pixels to judge it on is refused, never passed."""
    gate_positives: int = Field(16, ge=0)
    """Held-out frames (the newest) that get a synthetic defect pasted in (CutPaste / Perlin-masked foreign
    texture) as labelled positives of the gate; each costs one extra base-model forward per refresh. 0 = none."""
    gate_max_labelled: int = Field(16, ge=0)
    """Operator labels in each refresh's gate (the worker reads them from Redis): the newest this many confirmed
    defects whose mask the operator endorsed (labelled positives) and as many false alarms (normal frames);
    each costs one extra base-model forward per refresh. 0 = none."""
    gate_auroc_margin: float = Field(0.02, ge=0, le=1)
    """Refuse a candidate whose pixel AUROC on the labelled positives is below the serving version's minus this."""
    gate_min_contrast_ratio: float = Field(0.5, ge=0)
    """Refuse a candidate whose contrast on the labelled positives (median p(abnormal) of defect pixels minus that
    of the others) is below this multiple of the serving version's: every pixel shifted towards one side. 0 = off."""

    @model_validator(mode="after")
    def _gate_order(self) -> TTASettings:
        if self.gate_normal_z >= self.gate_confident_z:
            raise ValueError("gate_normal_z must be below gate_confident_z")
        return self

    @field_validator("mode", mode="before")
    @classmethod
    def _yaml_off(cls, v: Any) -> Any:
        return "off" if v is False else v  # YAML 1.1 reads a bare `off` as false


class MemorySettings(_Section):
    """Per-line patch memory (docs/memory.md): which features, how big, how scored and fused, cold start, admission.

    Defaults are the choices measured in docs/memory.md. The memory's cost per frame is set by the byte
    budget alone (every stored value is compared with every patch of a frame once).
    """

    layers: list[int] = Field(default_factory=lambda: [6])
    """Blocks (1-based) of the original CLIP path whose patch tokens the memory compares (concatenated)."""
    neighbourhood: int = Field(1, ge=1)
    """Odd side of the patch neighbourhood averaged into each feature (PatchCore uses 3; 1 measured best here)."""
    budget_bytes: int = Field(16 << 20, ge=1 << 16)
    """Most bytes of fp16 features a line's bank holds; the greedy coreset subsamples to fit."""
    image_top_k: int = Field(5, ge=1)
    """Patches averaged (the highest ones) into the memory's image score."""
    fusion_weight: float = Field(0.8, ge=0, le=1)
    """Weight of the memory in the fused map and image score; 1 - weight goes to the zero-shot map and CLS
    score. Both are in robust z units of normal frames before they are mixed."""
    mutual_share: float = Field(0.5, gt=0, le=1)
    """Mutual scoring averages a patch's distances to the closest `share` of the other frames; a defect
    in fewer than this share of the window's frames still scores high."""
    window_frames: int = Field(16, ge=2)
    """Cold start: recent frames of the line a new frame is mutually scored against."""
    min_bank_frames: int = Field(4, ge=1)
    """Admitted frames the first bank is built from; until then frames are scored by mutual scoring."""
    refresh_max_frames: int = Field(1000, ge=1)
    """Admitted frames between bank refreshes once the line is warm. Before that the gap doubles from
    `min_bank_frames` (4, 8, 16, ...), so a new line, or a 20-image evaluation class, gets banks early."""
    admit_patch_z: float = Field(2.5, gt=0)
    """A patch enters the bank only below this robust z against the line's normal patches (and away from
    any patch above it); a recurring defect is never close enough to enter."""
    admit_min_window: int = Field(8, ge=1)
    """Cold start: a frame mutually scored against fewer frames than this adds nothing to the bank. Against
    one to three frames a defect can find its look-alike by chance (a stain elsewhere); it takes a window
    whose majority is normal for mutual scores to mean anything."""
    admit_max_abnormal_share: float = Field(0.25, ge=0, le=1)
    """Frames with a larger share of patches above `admit_patch_z` add nothing to the bank (a frame that is
    broadly off: another product, a moved camera). Parts with much normal variation show 5-25% such patches
    against a young bank, so the patch rule, not this one, is what keeps defects out."""
    calibration_frames: int = Field(8, ge=1)
    """Admitted frames whose leave-own-frame-out distances set a new bank's z scale."""
    gate_holdout_frames: int = Field(8, ge=0)
    """The bank gate (docs/memory.md, *The bank gate*): at most this many of a build's newest admitted frames
    (a quarter of the build at most) are kept out of the candidate bank and its calibration, and each gets a
    synthetic defect pasted in as a labelled positive (one extra forward per frame on the builder thread).
    0 = no gate: every built bank is published unchecked."""
    gate_auroc_margin: float = Field(0.05, ge=0, le=1)
    """Refuse a candidate bank whose pixel AUROC on the pasted positives is below the serving reference's (the
    serving bank, or mutual scoring before the line has one) minus this. Wider than the adapters' 0.02: a build
    holds out 1-8 frames, one positive each, and healthy consecutive banks differed by up to 0.033 (docs/memory.md)."""
    gate_max_normal_z: float = Field(1.0, gt=0)
    """Refuse a candidate bank under which the held-out normal frames' median memory z lies farther than this from
    0 (the normal median a bank's scales promise): up, it calls normal frames abnormal; down, everything looks
    normal."""
    projection_dim: int = Field(128, ge=8)
    """Random projection width the greedy coreset measures distances in."""
    seed: int = 0

    @field_validator("layers")
    @classmethod
    def _layers(cls, v: list[int]) -> list[int]:
        if not v or any(i < 1 for i in v):
            raise ValueError("give at least one block number; block numbers are 1-based")
        return sorted(set(v))

    @field_validator("neighbourhood")
    @classmethod
    def _odd(cls, v: int) -> int:
        if v % 2 == 0:
            raise ValueError("must be odd (a centred square of patches)")
        return v


class DashboardSettings(_Section):
    """The live dashboard (`anoclip dashboard`); its access tokens come from the environment or a file, never here."""

    stale_after_s: float = Field(60.0, gt=0)
    """A line whose worker is alive but whose newest frame is older than this shows as "stale"."""
    allowed_hosts: list[str] = Field(default_factory=list)
    """Host names the dashboard answers besides IP addresses and `localhost` (a guard against DNS rebinding):
    the name browsers use, e.g. the ingress host. `.example.com` also allows its sub-domains."""
    guess_limit: int = Field(5, ge=1)
    """Wrong access tokens one client may present per `guess_window_s` before it is refused unchecked (429)."""
    guess_window_s: float = Field(60.0, gt=0)
    defect_types: list[str] = Field(default_factory=lambda: ["scratch", "dent", "crack", "contamination",
                                                             "missing part", "other"])
    """Defect types offered when an operator confirms an alert (any other short name is accepted too)."""


class Settings(BaseSettings):
    """Root of the configuration. Build it with `load_settings`."""

    model_config = SettingsConfigDict(env_prefix="ANOCLIP_", env_nested_delimiter="__", extra="forbid")

    model: ModelSettings = Field(default_factory=ModelSettings)
    lines: list[LineSettings] = Field(default_factory=list)
    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    redis: RedisSettings = Field(default_factory=RedisSettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    tta: TTASettings = Field(default_factory=TTASettings)
    memory: MemorySettings = Field(default_factory=MemorySettings)
    dashboard: DashboardSettings = Field(default_factory=DashboardSettings)

    @model_validator(mode="after")
    def _unique_lines(self) -> Settings:
        seen: set[str] = set()
        for line in self.lines:
            if line.id in seen:
                raise ValueError(f"line id {line.id!r} is declared twice")
            seen.add(line.id)
        if self.tta.mode == "buffered":
            both = [f"lines.{i}.memory ({line.id})" for i, line in enumerate(self.lines) if line.memory == "stream"]
            if both:
                # The TTA buffer admits frames against the line's p(abnormal) threshold while a memory line is
                # judged in z units of its normal frames: together, admission would read the wrong scale.
                raise ValueError(f"{', '.join(both)}: 'stream' does not combine with tta.mode 'buffered' yet; "
                                 "set memory to 'off' or tta.mode to 'off' or 'per_frame'")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # First wins: `load_settings` overrides (init kwargs) > ANOCLIP_... variables > the YAML file > defaults.
        sources: list[PydanticBaseSettingsSource] = [init_settings, _EnvSource(settings_cls)]
        yaml_file = _YAML_FILE.get()
        if yaml_file is not None:
            sources.append(_YamlSource(settings_cls, yaml_file=yaml_file))
        return (*sources, file_secret_settings)

    def line(self, line_id: str) -> LineSettings:
        """The line's settings, or UnknownLineError naming the known lines."""
        for line in self.lines:
            if line.id == line_id:
                return line
        known = ", ".join(sorted(x.id for x in self.lines)) or "none"
        raise UnknownLineError(f"unknown line {line_id!r} (configured lines: {known})")


_YAML_FILE: ContextVar[Path | None] = ContextVar("anoclip_yaml_file", default=None)
"""The file `load_settings` is reading; `Settings()` built directly reads no file."""


class _YamlSource(YamlConfigSettingsSource):
    """pydantic-settings' YAML source, failing with the file's name on bad YAML or a non-mapping top level."""

    def _read_file(self, file_path: Any) -> dict[str, Any]:
        try:
            data = super()._read_file(file_path)
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {file_path} is not valid YAML: {e}") from e
        except UnicodeDecodeError as e:
            raise ConfigError(f"config file {file_path} is not UTF-8 text: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"config file {file_path} must hold a mapping at the top level")
        return data


class _EnvSource(EnvSettingsSource):
    """pydantic-settings' environment source; a value that is not valid JSON where JSON is needed (a list, a
    section) raises ConfigError naming the key and the variable instead of the library's bare SettingsError."""

    def prepare_field_value(self, field_name: str, field: FieldInfo, value: Any, value_is_complex: bool) -> Any:
        try:
            return super().prepare_field_value(field_name, field, value, value_is_complex)
        except ValueError as e:
            raise ConfigError(_env_json_error(field_name, e)) from e


def _env_json_error(field_name: str, err: ValueError) -> str:
    """`lines: not valid JSON (...) (from environment variable ANOCLIP_LINES)`, naming the failing variable."""
    top = f"ANOCLIP_{field_name}".upper()
    candidates = sorted(k for k in os.environ if k.upper() == top or k.upper().startswith(top + "__"))
    culprits = []
    for var in candidates:
        path = var[len("ANOCLIP_"):].lower().split("__")
        if not _expects_json(path):
            continue
        try:
            json.loads(os.environ[var])
        except ValueError:
            culprits.append((".".join(path), var))
    if not culprits:  # cannot tell which one: name them all
        culprits = [(field_name, ", ".join(candidates) or top)]
    return "invalid configuration (environment): " + "; ".join(
        f"{key}: not valid JSON ({err.__cause__ or err}) (from environment variable {var})" for key, var in culprits
    )


def _expects_json(path: list[str]) -> bool:
    """Whether the settings field at `path` is a list, tuple, dict or section (the environment gives it JSON)."""
    model: Any = Settings
    annotation: Any = None
    for part in path:
        fields = getattr(model, "model_fields", None)
        if not fields or part not in fields:
            return False
        annotation = fields[part].annotation
        model = annotation
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return True
    return get_origin(annotation) in (list, tuple, dict)


def _env_source(loc: tuple[Any, ...]) -> str | None:
    """The `ANOCLIP_...` variable that set the value at `loc` (or a section above it), if one did."""
    env = {k.upper() for k in os.environ}
    names = [str(p) for p in loc]
    for n in range(len(names), 0, -1):
        var = "ANOCLIP_" + "__".join(names[:n]).upper()
        if var in env:
            return var
    return None


def _format_validation_error(err: ValidationError, source: str) -> str:
    parts, from_file = [], False
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(root)"
        var = _env_source(e["loc"])
        from_file = from_file or var is None
        parts.append(f"{key}: {e['msg']}" + (f" (from environment variable {var})" if var else ""))
    where = source if from_file else "environment"
    return f"invalid configuration ({where}): " + "; ".join(parts)


def resolve_config_path(path: str | os.PathLike[str] | None = None) -> Path | None:
    """The config file to read: the argument, else $ANOCLIP_CONFIG, else ./config.yaml if it exists."""
    if path is not None:
        return Path(path)
    if os.environ.get(CONFIG_ENV):
        return Path(os.environ[CONFIG_ENV])
    default = Path(DEFAULT_CONFIG)
    return default if default.exists() else None


def load_settings(path: str | os.PathLike[str] | None = None, **overrides: Any) -> Settings:
    """Read YAML, apply environment overrides and `overrides`, validate; raise ConfigError on any problem.

    First wins: `overrides` (deep-merged per section) > `ANOCLIP_...` variables > the YAML file > defaults.
    """
    cfg_path = resolve_config_path(path)
    source = "defaults"
    if cfg_path is not None:
        source = str(cfg_path)
        if not cfg_path.expanduser().is_file():  # pydantic-settings skips a missing file silently
            raise ConfigError(f"config file not found: {cfg_path}")
    token = _YAML_FILE.set(cfg_path)
    try:
        return Settings(**overrides)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, source)) from e
    finally:
        _YAML_FILE.reset(token)
