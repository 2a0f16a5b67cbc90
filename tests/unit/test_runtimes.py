"""CPU runtimes: precision per CPU, fp32 text, the exported encoder on ONNX Runtime and OpenVINO."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.errors import ConfigError
from pipeline.inspection.runtimes import (
    META_FILE,
    CpuInfo,
    RuntimeEncoder,
    attach_runtime,
    build_model,
    export_encoder,
    read_cpu_info,
)
from pipeline.inspection.text_cache import TextFeatureCache
from pipeline.model import build_prompt_set, create_anoclip
from pipeline.model.factory import resolve_precision
from pipeline.settings import ModelSettings
from pipeline.verdicts.inspector import Inspector
from tests.conftest import make_tiny_settings

AVX2_ONLY = CpuInfo("AMD EPYC 7B12", frozenset({"sse4_2", "avx", "avx2", "fma"}))
AMX = CpuInfo("Intel Xeon Platinum 8481C", frozenset({"avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"}))
CPU = torch.device("cpu")


def tiny(**kw: object) -> ModelSettings:
    return ModelSettings(arch="anoclip-tiny", pretrained="none", device="cpu", **kw)


# --- precision per CPU ------------------------------------------------------------------------------


def test_cpuinfo_flags_decide_native_bf16(tmp_path: Path) -> None:
    f = tmp_path / "cpuinfo"
    f.write_text("processor\t: 0\nmodel name\t: AMD EPYC 7B12\nflags\t\t: fpu sse4_2 avx avx2 fma\n\n"
                 "processor\t: 1\nmodel name\t: AMD EPYC 7B12\nflags\t\t: fpu sse4_2 avx avx2 fma\n")
    info = read_cpu_info(f)
    assert info.model == "AMD EPYC 7B12" and not info.native_bf16
    assert info.isa == ["sse4_2", "avx", "avx2", "fma"]
    f.write_text("model name\t: Xeon\nflags\t\t: avx2 avx512f avx512_bf16\n")
    assert read_cpu_info(f).native_bf16
    assert AMX.native_bf16 and "amx_tile" in AMX.describe()


def test_auto_picks_bf16_only_with_native_bf16() -> None:
    assert resolve_precision("auto", CPU, native_bf16=True)[0] == "bf16"
    prec, why = resolve_precision("auto", CPU, native_bf16=False)
    assert prec == "fp32" and "no native bf16" in why
    assert resolve_precision("auto", torch.device("cuda"), native_bf16=True)[0] == "fp32"  # CUDA: as before
    assert resolve_precision("bf16", CPU, native_bf16=False)[0] == "bf16"  # asked for: honoured
    with pytest.raises(ConfigError, match="fp16"):
        resolve_precision("fp16", CPU)
    with pytest.raises(ConfigError, match="model.precision: int8"):
        resolve_precision("int8", CPU)


def test_build_model_logs_why(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO):
        assert build_model(tiny(), cpu=AVX2_ONLY).precision == "fp32"
    assert "no native bf16" in caplog.text and "AMD EPYC 7B12" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert build_model(tiny(), cpu=AMX).precision == "bf16"
    assert "native bf16" in caplog.text


def test_default_precision_is_auto_and_bad_combinations_name_the_key(tmp_path: Path) -> None:
    assert ModelSettings().precision == "auto" and ModelSettings().runtime == "torch"
    with pytest.raises(ConfigError, match=r"model.*int8 needs runtime onnxruntime or openvino"):
        make_tiny_settings(tmp_path, model={"precision": "int8"})
    with pytest.raises(ConfigError, match=r"model.*bf16 with runtime onnxruntime"):
        make_tiny_settings(tmp_path, model={"precision": "bf16", "runtime": "onnxruntime"})
    with pytest.raises(ConfigError, match=r"model.runtime"):
        make_tiny_settings(tmp_path, model={"runtime": "tensorrt"})


def test_text_features_are_fp32_whatever_the_precision() -> None:
    ps = build_prompt_set("bottle")
    fp32, bf16 = create_anoclip(tiny(precision="fp32")), create_anoclip(tiny(precision="bf16"))
    a, b = fp32.encode_prompts(ps), bf16.encode_prompts(ps)
    assert b.class_embeddings.dtype == torch.float32
    assert torch.equal(a.class_embeddings, b.class_embeddings)  # not merely close: no autocast at all
    assert TextFeatureCache.key(fp32, ps) == TextFeatureCache.key(bf16, ps)  # one cache entry serves both


# --- exported encoder -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, one_torch_thread: None) -> Path:
    model = create_anoclip(tiny(precision="fp32"))
    return export_encoder(model, tmp_path_factory.mktemp("export"), ["onnx", "openvino"], int8=True)


@pytest.fixture(scope="module")
def reference(one_torch_thread: None):
    model = create_anoclip(tiny(precision="fp32"))
    text = model.encode_prompts(build_prompt_set("bottle"))
    x = torch.randn(3, 3, 64, 96, generator=torch.Generator().manual_seed(3))  # 2 tiles each
    return model, text, x, model(x, text)


def test_export_folder_names_the_model(exported: Path) -> None:
    meta = json.loads((exported / META_FILE).read_text())
    assert meta["arch"] == "anoclip-tiny" and meta["weights_id"] == "anoclip-tiny/random-seed0"
    assert set(meta["files"]) == {"onnx", "onnx-int8", "openvino"}
    for name in ("encoder.onnx", "encoder.int8.onnx", "encoder.xml", "encoder.bin"):
        assert (exported / name).stat().st_size > 0


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_fp32_runtimes_equal_torch_fp32(runtime: str, exported: Path, reference) -> None:
    _, text, x, ref = reference
    model = create_anoclip(tiny(precision="fp32"))
    enc = attach_runtime(model, runtime, "fp32", exported)
    assert isinstance(model.encoder, RuntimeEncoder) and enc.folder == exported
    out = model(x, text)
    assert (out.anomaly_maps - ref.anomaly_maps).abs().max() < 1e-4
    assert (out.image_scores - ref.image_scores).abs().max() < 1e-4
    assert (out.tokens - ref.tokens).abs().max() < 1e-3
    one = model(x[:1], text)  # another batch size through the same session
    assert (one.anomaly_maps[0] - ref.anomaly_maps[0]).abs().max() < 1e-4


def test_int8_is_close_but_not_equal(exported: Path, reference) -> None:
    _, text, x, ref = reference
    model = create_anoclip(tiny(precision="fp32"))
    attach_runtime(model, "onnxruntime", "int8", exported)
    delta = (model(x, text).anomaly_maps - ref.anomaly_maps).abs().max()
    assert 0 < delta < 0.05


def test_export_from_another_model_is_refused(exported: Path) -> None:
    other = create_anoclip(tiny(precision="fp32", seed=5))
    with pytest.raises(ConfigError, match=r"model.runtime_dir: .*another model.*weights_id"):
        attach_runtime(other, "onnxruntime", "fp32", exported)


def test_inspector_scores_the_same_through_a_runtime(exported: Path, tmp_path: Path) -> None:
    base = make_tiny_settings(tmp_path)
    onnx = make_tiny_settings(tmp_path, model={"runtime": "onnxruntime", "runtime_dir": str(exported)})
    images = [np.random.default_rng(i).integers(0, 255, (48, 80, 3), dtype=np.uint8) for i in range(3)]
    a = Inspector.from_settings(base, follow="never").inspect("bottle", images)
    b = Inspector.from_settings(onnx, follow="never").inspect("bottle", images)
    for x, y in zip(a, b, strict=True):
        assert abs(x.score - y.score) < 1e-4 and x.verdict == y.verdict
        assert np.abs(x.anomaly_map - y.anomaly_map).max() < 1e-4


def test_runtime_exports_into_its_cache_on_first_use(tmp_path: Path) -> None:
    s = make_tiny_settings(tmp_path, model={"runtime": "onnxruntime", "runtime_dir": str(tmp_path / "cache")})
    model = build_model(s.model, cpu=AVX2_ONLY)
    assert isinstance(model.encoder, RuntimeEncoder) and model.precision == "fp32"
    assert (model.encoder.folder / META_FILE).is_file() and model.encoder.folder.parent == tmp_path / "cache"


def test_export_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from workers.cli import main

    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("model: {arch: anoclip-tiny, pretrained: none, device: cpu}\nlines: []\n")
    out = tmp_path / "enc"
    assert main(["export", "--config", str(cfg), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "encoder.onnx" in printed and f"ANOCLIP_MODEL__RUNTIME_DIR={out}" in printed
    assert json.loads((out / META_FILE).read_text())["files"] == {"onnx": "encoder.onnx"}
    cfg.write_text("model: {arch: anoclip-tiny, pretrained: none, device: cpu, seed: 3}\nlines: []\n")
    assert main(["export", "--config", str(cfg), "--out", str(out)]) == 2  # another model: refused
    assert "exported from another model" in capsys.readouterr().err
