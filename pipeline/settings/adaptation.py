"""Adapting to a line as it runs: test-time adaptation (TTA) and the per-line patch memory."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from pipeline.settings.section import _Section


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
