"""`anoclip export`: write the dual-path image encoder for CPU runtimes (ONNX, OpenVINO IR).

Point `model.runtime_dir` at the folder and set `model.runtime` to onnxruntime or openvino to score
with it (docs/runtimes.md).
"""

from __future__ import annotations

import argparse

from pipeline.inspection.runtimes import export_encoder
from pipeline.model import create_anoclip
from pipeline.settings import load_settings


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `anoclip export`."""
    p.add_argument("--format", nargs="+", choices=["onnx", "openvino"], default=["onnx"],
                   help="what to write (default onnx; openvino also writes the ONNX it converts from)")
    p.add_argument("--out", required=True, help="folder to write encoder.onnx / encoder.xml and anoclip-export.json")
    p.add_argument("--int8", action="store_true", help="also write a dynamically quantised int8 ONNX (opt-in)")
    p.add_argument("--config", default=None, help="config file (default: $ANOCLIP_CONFIG or ./config.yaml)")


def run(args: argparse.Namespace) -> int:
    """Export the configured model's encoder (fp32 weights) and print what was written."""
    settings = load_settings(args.config)
    model = create_anoclip(settings.model, precision="fp32")
    folder = export_encoder(model, args.out, args.format, int8=args.int8)
    files = sorted(p.name for p in folder.iterdir() if p.is_file())
    print(f"exported {settings.model.arch} ({model.weights_id}) to {folder}: {', '.join(files)}")
    print(f"score with it: ANOCLIP_MODEL__RUNTIME={'openvino' if 'openvino' in args.format else 'onnxruntime'} "
          f"ANOCLIP_MODEL__RUNTIME_DIR={folder}")
    return 0
