"""The image encoder on CPU runtimes (ONNX Runtime, OpenVINO), and which precision a CPU gets.

What is exported is the dual-path encoder only: square tiles (N, 3, S, S) -> CLIP's image embedding
(N, C) and the V-V patch tokens (N, n_layers, P, C), exactly what `AnoCLIP.forward` takes from
`DualPathViT`. Everything after it (probabilities, maps, tiling, adapters, TTA) stays in torch, so every
runtime scores, calibrates and adapts the same way. Text features are always torch fp32 (once per line).

An export folder holds `encoder.onnx` (fp32), optionally `encoder.int8.onnx` (dynamic quantisation) and
`encoder.xml`/`.bin` (OpenVINO IR, fp32 weights), plus `anoclip-export.json` naming the model it was
made from; loading refuses a folder made from another model. docs/runtimes.md has the measurements.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import platform
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.errors import ConfigError
from pipeline.model import AnoCLIP, VisualFeatures, create_anoclip
from pipeline.model.factory import resolve_device
from pipeline.settings import ModelSettings

log = logging.getLogger(__name__)

RUNTIMES = ("torch", "onnxruntime", "openvino")
EXPORT_FORMATS = ("onnx", "openvino")
META_FILE = "anoclip-export.json"
FORMAT = "anoclip-encoder"
FORMAT_VERSION = 1
FILES = {"onnx": "encoder.onnx", "onnx-int8": "encoder.int8.onnx", "openvino": "encoder.xml"}
NATIVE_BF16_FLAGS = ("amx_bf16", "amx_tile", "avx512_bf16")
ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
             "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8", "amx_fp16", "asimd", "sve", "bf16")
"""The instruction sets that decide CPU inference speed (x86 and Arm names as /proc/cpuinfo spells them)."""


# --- the CPU ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CpuInfo:
    """The CPU's model name and feature flags, as /proc/cpuinfo reports them."""

    model: str
    flags: frozenset[str]
    source: str = "/proc/cpuinfo"

    @property
    def native_bf16(self) -> bool:
        """AMX or AVX512-BF16: bf16 matmuls run natively instead of being emulated in fp32."""
        return any(f in self.flags for f in NATIVE_BF16_FLAGS)

    @property
    def isa(self) -> list[str]:
        """The flags that matter for inference speed, in a fixed order."""
        return [f for f in ISA_FLAGS if f in self.flags]

    def describe(self) -> str:
        return f"{self.model} [{' '.join(self.isa) or 'no SIMD flags found'}]"


def read_cpu_info(path: str | os.PathLike[str] = "/proc/cpuinfo") -> CpuInfo:
    """Model name and flags from /proc/cpuinfo; elsewhere torch's probe stands in for the flags."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        text = ""
    model, flags = "", set()
    for raw in text.splitlines():
        key, _, value = raw.partition(":")
        key = key.strip().lower()
        if key in ("model name", "cpu model") and not model:
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
    if flags:
        return CpuInfo(model or platform.processor() or "unknown CPU", frozenset(flags), str(path))
    probe = {"avx2": torch.cpu._is_avx2_supported, "avx512f": torch.cpu._is_avx512_supported,
             "avx512_bf16": torch.cpu._is_avx512_bf16_supported, "amx_tile": torch.cpu._is_amx_tile_supported}
    found = {name for name, fn in probe.items() if _safe_probe(fn)}
    return CpuInfo(model or platform.processor() or "unknown CPU", frozenset(found), "torch probe")


def _safe_probe(fn: Callable[[], bool]) -> bool:
    try:
        return bool(fn())
    except Exception:  # a probe missing from this torch build
        return False


# --- export ----------------------------------------------------------------------------------------


class EncoderGraph(nn.Module):
    """The traceable entry point: images -> (cls_embedding, patch_tokens), the tensors the scorer needs."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.encoder(images)
        return feats.cls_embedding, feats.patch_tokens


def model_identity(model: AnoCLIP) -> dict[str, Any]:
    """What an exported encoder must match: the architecture, the exact weights and the V-V choices."""
    enc = _torch_encoder(model)
    return {"arch": model.arch, "weights_id": model.weights_id, "vv_start_block": enc.vv_start + 1,
            "feature_layers": list(enc.feature_layers), "image_size": model.image_size,
            "grid_size": model.grid_size, "embed_dim": model.embed_dim}


def _torch_encoder(model: AnoCLIP) -> nn.Module:
    enc = model.encoder
    return enc.torch_encoder if isinstance(enc, RuntimeEncoder) else enc


def _atomic_move(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    os.replace(src, dst)


def _export_onnx(model: AnoCLIP, dst: Path) -> None:
    graph = EncoderGraph(_torch_encoder(model)).eval()
    s = model.image_size
    example = torch.zeros(2, 3, s, s, device=model.device)
    batch = torch.export.Dim("batch", min=1, max=4096)
    with tempfile.TemporaryDirectory(dir=dst.parent) as tmp, torch.no_grad(), \
            contextlib.redirect_stdout(io.StringIO()):  # the exporter prints progress lines
        out = Path(tmp) / dst.name
        torch.onnx.export(graph, (example,), str(out), input_names=["images"],
                          output_names=["cls_embedding", "patch_tokens"], dynamic_shapes=({0: batch},),
                          dynamo=True, external_data=False, opset_version=18, verbose=False)
        _atomic_move(out, dst)


def _quantize_int8(src: Path, dst: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(dir=dst.parent) as tmp:
        out = Path(tmp) / dst.name
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)  # quantize_dynamic logs a pre-processing hint on the root logger
        try:
            quantize_dynamic(str(src), str(out), weight_type=QuantType.QInt8)
        finally:
            root.setLevel(level)
        _atomic_move(out, dst)


def _export_openvino(src: Path, dst: Path) -> None:
    import openvino as ov

    with tempfile.TemporaryDirectory(dir=dst.parent) as tmp:
        out = Path(tmp) / dst.name
        ov.save_model(ov.convert_model(str(src)), str(out), compress_to_fp16=False)  # keep fp32 weights
        _atomic_move(out.with_suffix(".bin"), dst.with_suffix(".bin"))
        _atomic_move(out, dst)


def read_meta(directory: Path) -> dict[str, Any] | None:
    path = directory / META_FILE
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.runtime_dir: {path} is unreadable: {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ConfigError(f"model.runtime_dir: {path} is not an anoclip encoder export")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ConfigError(f"model.runtime_dir: {path} has export format {meta.get('format_version')}, "
                          f"this version reads {FORMAT_VERSION}: export again with `anoclip export`")
    return meta


def check_meta(meta: dict[str, Any], model: AnoCLIP, directory: Path) -> None:
    """Refuse an export made from another model: its tokens would not match the text features."""
    ours = model_identity(model)
    diff = [k for k in ("arch", "weights_id", "vv_start_block", "feature_layers") if meta.get(k) != ours[k]]
    if diff:
        theirs = ", ".join(f"{k}={meta.get(k)!r}" for k in diff)
        mine = ", ".join(f"{k}={ours[k]!r}" for k in diff)
        raise ConfigError(f"model.runtime_dir: {directory} holds an encoder exported from another model ({theirs}); "
                          f"the configured model has {mine}. Export it again: anoclip export --out DIR")


def export_encoder(model: AnoCLIP, out_dir: str | os.PathLike[str], formats: Sequence[str] = ("onnx",),
                   *, int8: bool = False) -> Path:
    """Write the encoder in `formats` (onnx, openvino; int8 adds a quantised ONNX) into `out_dir`.

    Files already there for the same model are kept; the metadata file is written last, so a folder
    with metadata is complete. Returns the folder.
    """
    bad = [f for f in formats if f not in EXPORT_FORMATS]
    if bad:
        raise ConfigError(f"unknown export format(s) {bad} (known: {', '.join(EXPORT_FORMATS)})")
    directory = Path(out_dir).expanduser()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create the export folder {directory}: {e.strerror or e}") from e
    meta = read_meta(directory)
    if meta is not None:
        check_meta(meta, model, directory)
    files = dict(meta.get("files", {})) if meta else {}
    wanted = ["onnx"] + (["onnx-int8"] if int8 else []) + (["openvino"] if "openvino" in formats else [])
    try:
        for kind in wanted:
            path = directory / FILES[kind]
            if kind in files and path.is_file():
                continue
            t0 = time.perf_counter()
            if kind == "onnx":
                _export_onnx(model, path)
            elif kind == "onnx-int8":
                _quantize_int8(directory / FILES["onnx"], path)
            else:
                _export_openvino(directory / FILES["onnx"], path)
            files[kind] = FILES[kind]
            log.info("exported the %s encoder of %s to %s in %.1f s", kind, model.arch, path,
                     time.perf_counter() - t0)
    except OSError as e:
        raise ConfigError(f"cannot write the exported encoder into {directory}: {e.strerror or e}") from e
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, **model_identity(model), "files": files,
            "inputs": {"images": ["batch", 3, model.image_size, model.image_size]},
            "outputs": {"cls_embedding": ["batch", model.embed_dim],
                        "patch_tokens": ["batch", len(_torch_encoder(model).feature_layers),
                                         model.grid_size ** 2, model.embed_dim]},
            "torch": torch.__version__, "created": datetime.now(UTC).isoformat(timespec="seconds")}
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(meta, f, indent=2)
    os.replace(tmp, directory / META_FILE)
    return directory


def runtime_folder(model: AnoCLIP, runtime_dir: str | os.PathLike[str]) -> Path:
    """The export folder itself when `runtime_dir` holds one, else the model's own cache sub-folder."""
    root = Path(runtime_dir).expanduser()
    if (root / META_FILE).is_file():
        return root
    ident = model_identity(model)
    key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    return root / f"{model.arch.replace('/', '_')}-{key}"


# --- running it ------------------------------------------------------------------------------------


def runtime_precision(runtime: str, requested: str, cpu: CpuInfo) -> tuple[str, str]:
    """(precision, why) of an exported runtime. Reduced precision is opt-in: `auto` is fp32."""
    if requested == "auto":
        return "fp32", f"model.precision auto with runtime {runtime}: fp32 (bf16 and int8 are opt-in)"
    if runtime == "onnxruntime" and requested not in ("fp32", "int8"):
        raise ConfigError(f"model.precision: {requested} is not available with runtime onnxruntime (fp32 or int8)")
    if runtime == "openvino" and requested not in ("fp32", "bf16", "int8"):
        raise ConfigError(f"model.precision: {requested} is not available with runtime openvino (fp32, bf16, int8)")
    if requested == "bf16" and not cpu.native_bf16:
        log.warning("model.precision bf16 on a CPU without native bf16 (%s): OpenVINO may run it in fp32",
                    cpu.describe())
    return requested, f"model.precision {requested} with runtime {runtime}"


class RuntimeEncoder(nn.Module):
    """Stands in for `DualPathViT` inside `AnoCLIP`: same call, same outputs, computed by a runtime.

    Requests the exported graph cannot answer (intermediate `hidden_layers`) go to the torch encoder,
    which is kept (it shares the weights with the text side; nothing is copied).
    """

    def __init__(self, torch_encoder: nn.Module, run: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
                 runtime: str, precision: str, folder: Path) -> None:
        super().__init__()
        self.torch_encoder = torch_encoder
        self._run = run
        self.runtime = runtime
        self.precision = precision
        self.folder = folder

    # DualPathViT's attributes the scorer and its callers read
    @property
    def visual(self) -> nn.Module:
        return self.torch_encoder.visual

    @property
    def blocks(self) -> nn.Module:
        return self.torch_encoder.blocks

    @property
    def image_size(self) -> int:
        return int(self.torch_encoder.image_size)

    @property
    def grid_size(self) -> int:
        return int(self.torch_encoder.grid_size)

    @property
    def feature_layers(self) -> list[int]:
        return list(self.torch_encoder.feature_layers)

    @property
    def vv_start(self) -> int:
        return int(self.torch_encoder.vv_start)

    def check_hidden_layers(self, hidden_layers: Sequence[int]) -> list[int]:
        return self.torch_encoder.check_hidden_layers(hidden_layers)

    def forward(self, images: torch.Tensor, with_patches: bool = True,
                hidden_layers: Sequence[int] = ()) -> VisualFeatures:
        if hidden_layers:
            return self.torch_encoder(images, with_patches=with_patches, hidden_layers=hidden_layers)
        x = np.ascontiguousarray(images.detach().float().cpu().numpy())
        cls, tokens = self._run(x)
        cls_t = torch.from_numpy(np.asarray(cls, dtype=np.float32))
        if not with_patches:
            return VisualFeatures(cls_t, cls_t.new_zeros((cls_t.shape[0], 0, 0, cls_t.shape[-1])))
        return VisualFeatures(cls_t, torch.from_numpy(np.asarray(tokens, dtype=np.float32)))


def _onnxruntime_runner(path: Path, threads: int) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])

    def run(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        cls, tokens = sess.run(["cls_embedding", "patch_tokens"], {"images": x})
        return cls, tokens

    return run


def _openvino_runner(path: Path, precision: str, threads: int) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
    import openvino as ov

    core = ov.Core()
    config = {"INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
              "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads}
    compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
    request = compiled.create_infer_request()
    lock = threading.Lock()  # one infer request: one call at a time

    def run(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with lock:
            res = request.infer({"images": x})
            return (np.array(res[compiled.output("cls_embedding")]),
                    np.array(res[compiled.output("patch_tokens")]))

    return run


def attach_runtime(model: AnoCLIP, runtime: str, precision: str, runtime_dir: str | os.PathLike[str],
                   *, threads: int | None = None) -> RuntimeEncoder:
    """Swap the model's encoder for `runtime` at `precision` (fp32 | bf16 | int8), exporting if needed."""
    if runtime not in ("onnxruntime", "openvino"):
        raise ConfigError(f"model.runtime: {runtime!r} is not an exported runtime (onnxruntime, openvino)")
    folder = runtime_folder(model, runtime_dir)
    meta = read_meta(folder)
    if meta is not None:
        check_meta(meta, model, folder)
    need = "onnx-int8" if precision == "int8" else ("openvino" if runtime == "openvino" else "onnx")
    present = meta is not None and need in meta.get("files", {}) and (folder / FILES[need]).is_file()
    if not present:
        formats = ["onnx"] + (["openvino"] if need == "openvino" else [])
        log.info("exporting the encoder for runtime %s into %s (once)", runtime, folder)
        export_encoder(model, folder, formats, int8=precision == "int8")
    n = threads or torch.get_num_threads()
    path = folder / FILES[need]
    try:
        run = _onnxruntime_runner(path, n) if runtime == "onnxruntime" else _openvino_runner(path, precision, n)
    except ImportError as e:
        raise ConfigError(f"model.runtime {runtime}: the package is not installed ({e}); "
                          "pip install 'anoclip[runtimes]'") from e
    enc = RuntimeEncoder(_torch_encoder(model), run, runtime, precision, folder)
    model.encoder = enc
    return enc


def build_model(settings: ModelSettings, cpu: CpuInfo | None = None) -> AnoCLIP:
    """The scorer as configured: precision resolved for this CPU (logged with why), runtime attached."""
    cpu = cpu or read_cpu_info()
    device = resolve_device(settings.device)
    if settings.runtime == "torch":
        if settings.precision == "auto" and device.type == "cpu":
            log.info("CPU: %s", cpu.describe())
        return create_anoclip(settings, native_bf16=cpu.native_bf16)
    precision, why = runtime_precision(settings.runtime, settings.precision, cpu)
    model = create_anoclip(settings, precision="fp32")  # the torch side (text, maps) stays fp32
    attach_runtime(model, settings.runtime, precision, settings.runtime_dir)
    log.info("%s; CPU: %s", why, cpu.describe())
    return model
