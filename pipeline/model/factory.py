"""One factory for every AnoCLIP model, from named configs (as open_clip does).

Weights come from an open_clip pretrained tag, a local checkpoint file, or nowhere (`none`: random
init, explicitly chosen, for tests and smoke runs). A missing download never falls back silently.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.model import CLIP

from pipeline.errors import ConfigError, WeightsError
from pipeline.model.anoclip import AnoCLIP

log = logging.getLogger(__name__)

# Small architectures of our own, registered like timm's models; open_clip's names work as well.
MODEL_CONFIGS: dict[str, dict[str, Any]] = {
    "anoclip-tiny": {
        "embed_dim": 64,
        "vision_cfg": {"image_size": 64, "layers": 3, "width": 64, "patch_size": 8, "head_width": 32},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    },
    "anoclip-small": {
        "embed_dim": 128,
        "vision_cfg": {"image_size": 112, "layers": 4, "width": 128, "patch_size": 16, "head_width": 32},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 2},
    },
}


def list_models() -> list[str]:
    """Every architecture name the factory accepts."""
    return sorted(MODEL_CONFIGS) + open_clip.list_models()


def _is_random(pretrained: str) -> bool:
    return pretrained.lower() in ("none", "random")


def _looks_like_path(pretrained: str) -> bool:
    return os.sep in pretrained or pretrained.startswith((".", "~")) or pretrained.endswith(
        (".pt", ".pth", ".bin", ".safetensors")
    )


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def _checkpoint_path(pretrained: str, arch: str) -> Path:
    path = Path(pretrained).expanduser()
    if not path.is_file():
        raise WeightsError(f"model.pretrained: checkpoint file {path} for {arch} does not exist")
    return path


def resolve_device(device: str) -> torch.device:
    """`auto` picks CUDA when present; asking for CUDA without one is a config error, not a fallback."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("model.device: 'cuda' requested but no CUDA device is available")
    return torch.device(device)


def torch_native_bf16() -> bool:
    """Whether torch's own CPU probe (CPUID) finds native bf16: AVX512-BF16 or AMX tiles."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # a torch without the probe: assume none, fp32 is never slow
        return False


def resolve_precision(requested: str, device: torch.device, native_bf16: bool | None = None) -> tuple[str, str]:
    """(precision the torch model runs in, why). `auto` picks bf16 only where the CPU computes it natively.

    Without native bf16 (AVX2-only CPUs) bf16 autocast is emulated: measured 8x slower than fp32 for
    scoring, and minutes for text features. `native_bf16` is the caller's finding (e.g. /proc/cpuinfo
    flags, read outside this pure-torch wing); None asks torch's probe. On CUDA `auto` stays fp32.
    """
    if requested == "fp16" and device.type == "cpu":
        raise ConfigError("model.precision: fp16 autocast is for CUDA; use bf16 or fp32 on CPU")
    if requested == "int8":
        raise ConfigError("model.precision: int8 runs only in an exported runtime (model.runtime onnxruntime|openvino)")
    if requested != "auto":
        return requested, f"model.precision is {requested}"
    if device.type != "cpu":
        return "fp32", f"model.precision auto on {device.type}: fp32"
    native = torch_native_bf16() if native_bf16 is None else native_bf16
    if native:
        return "bf16", "model.precision auto: the CPU has native bf16 (AVX512-BF16 or AMX), so bf16 autocast"
    return "fp32", ("model.precision auto: the CPU has no native bf16 (neither AVX512-BF16 nor AMX), so fp32 "
                    "(emulated bf16 is several times slower)")


def _build_clip(arch: str, pretrained: str, seed: int) -> tuple[torch.nn.Module, str]:
    """The open_clip model with its weights, and an id of those weights for cache keys."""
    if arch in MODEL_CONFIGS:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = CLIP(**MODEL_CONFIGS[arch])
        if _is_random(pretrained):
            return model, f"{arch}/random-seed{seed}"
        path = _checkpoint_path(pretrained, arch)
        try:
            open_clip.load_checkpoint(model, str(path), weights_only=True)
        except Exception as e:
            raise WeightsError(f"could not load checkpoint {path} into {arch}: {e}") from e
        return model, f"{arch}/file-{_file_digest(path)}"
    if arch not in open_clip.list_models():
        raise ConfigError(f"model.arch: unknown architecture {arch!r} (see pipeline.model.list_models())")
    if _is_random(pretrained):
        log.warning("model %s with RANDOM weights (pretrained: none): scores are meaningless", arch)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = open_clip.create_model(arch, pretrained=None)
        return model, f"{arch}/random-seed{seed}"
    if _looks_like_path(pretrained) or Path(pretrained).expanduser().exists():
        path = _checkpoint_path(pretrained, arch)
        try:
            model = open_clip.create_model(arch, pretrained=str(path), require_pretrained=True)
        except Exception as e:  # open_clip raises many kinds; the message is what matters
            raise WeightsError(f"could not load checkpoint {path} into {arch}: {e}") from e
        return model, f"{arch}/file-{_file_digest(path)}"
    tags = open_clip.list_pretrained_tags_by_model(arch)
    if pretrained not in tags:
        raise ConfigError(f"model.pretrained: {pretrained!r} is not an open_clip tag of {arch} (known: {tags})")
    try:
        model = open_clip.create_model(arch, pretrained=pretrained, require_pretrained=True)
    except Exception as e:
        raise WeightsError(
            f"could not fetch pretrained weights {arch}/{pretrained}: {e}. Without internet, download the "
            f"checkpoint elsewhere and set model.pretrained (or ANOCLIP_MODEL__PRETRAINED) to its local file path."
        ) from e
    return model, f"{arch}/{pretrained}"


def _tokenizer(arch: str) -> Any:
    if arch in MODEL_CONFIGS:
        return open_clip.tokenizer.SimpleTokenizer(context_length=MODEL_CONFIGS[arch]["text_cfg"]["context_length"])
    return open_clip.get_tokenizer(arch)


def create_anoclip(settings: Any, *, native_bf16: bool | None = None, precision: str | None = None) -> AnoCLIP:
    """Build the scorer from `ModelSettings` (or anything with the same attributes).

    `precision` overrides `settings.precision` (an exported runtime runs the torch side in fp32);
    `native_bf16` is the caller's finding for `auto` (see `resolve_precision`).
    """
    device = resolve_device(settings.device)
    requested = precision or settings.precision
    precision, why = resolve_precision(requested, device, native_bf16)
    (log.info if requested == "auto" else log.debug)("%s", why)
    clip, weights_id = _build_clip(settings.arch, settings.pretrained, settings.seed)
    clip = clip.to(device)
    try:
        return AnoCLIP(
            clip,
            _tokenizer(settings.arch),
            arch=settings.arch,
            weights_id=weights_id,
            vv_start_block=settings.vv_start_block,
            feature_layers=list(settings.feature_layers) or None,
            temperature=settings.temperature,
            image_score=settings.image_score,
            precision=precision,
        )
    except ValueError as e:
        raise ConfigError(f"model: {e}") from e
