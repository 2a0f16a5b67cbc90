"""What a line is inspected with: the shared model choices, the thresholds and the product lines."""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import Field, field_validator, model_validator

from pipeline.settings.section import _Section

AdapterKind = Literal["text", "linear"]
"""The TTA adapter kinds (`pipeline.model.adapters.create_adapter` builds each)."""
ADAPTER_KINDS: tuple[str, ...] = get_args(AdapterKind)


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
    """Fixed image-score threshold; overrides calibration. An anomaly score from 0 to 1 on every line (above 1:
    never an alert). A memory line's threshold used to be in z units: z converts to 1 / (1 + exp(-(z - 3) / 2))
    (docs/streaming.md, *One score scale*); a value above 1 on a memory line is refused, not reread."""
    pixel: float | None = None
    """Fixed pixel threshold for masks; overrides calibration. An anomaly score, as `image`."""
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
    streamed, random weights) at 1.01-1.17x the cost per frame: `stream` judges the line by the memory's
    fused score (still an anomaly score from 0 to 1, but a different quantity: each bank brings thresholds
    calibrated on the line's own normal frames, which a fixed `threshold` would override) and the line starts
    learning from its frames; both are a line's explicit choice. New lines should say `stream` (and leave
    `threshold.image`/`pixel` unset). It combines with `tta.mode: buffered`: the adapter refines the zero-shot
    half of the fused map, the bank's thresholds judge."""

    @model_validator(mode="after")
    def _thresholds_on_the_anomaly_scale(self) -> LineSettings:
        if self.memory == "stream":
            for name in ("image", "pixel"):
                v = getattr(self.threshold, name)
                if v is not None and not 0.0 <= v <= 1.0:
                    raise ValueError(f"threshold.{name}: {v} is not an anomaly score (0 to 1); a memory line's "
                                     "threshold in z units converts to 1 / (1 + exp(-(z - 3) / 2))")
        return self

    @field_validator("extra_normal_states", "extra_abnormal_states")
    @classmethod
    def _has_slot(cls, v: list[str]) -> list[str]:
        for s in v:
            if s.count("{}") != 1:
                raise ValueError(f"state phrase {s!r} must contain exactly one '{{}}' for the class name")
        return v
