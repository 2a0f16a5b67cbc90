"""OpenCV against PIL for what frames go through: JPEG decode/encode, PNG encode, resize to the model size.

    python bench/bench_codecs.py                # 256 px parts and 1920x1080 frames

Both libraries are timed interleaved on the same images in one process (medians), one thread each
(`cv2.setNumThreads(1)`; PIL is single-threaded), so the ratio is what a worker thread sees. Resizing
compares PIL's antialiased bilinear (what `pipeline.inspection.imaging.preprocess` uses, and what the
scores were validated with) to OpenCV's INTER_AREA (the closest antialiased filter); their pixels differ
slightly, so a switch there changes scores and needs re-validation, while codecs are drop-in.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.evaluation import synth  # noqa: E402
from pipeline.inspection.runtimes import read_cpu_info  # noqa: E402


def cases(rgb: np.ndarray, model_size: int) -> dict[str, tuple[Callable[[], object], Callable[[], object]]]:
    """name -> (PIL, OpenCV) doing the same job on `rgb`."""
    bgr = np.ascontiguousarray(rgb[..., ::-1])
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=90)
    jpg = buf.getvalue()
    mask = (rgb[..., 0] > 128).astype(np.uint8) * 255

    def pil_jpeg_enc() -> bytes:
        b = io.BytesIO()
        Image.fromarray(rgb).save(b, "JPEG", quality=90)
        return b.getvalue()

    def pil_png_enc() -> bytes:
        b = io.BytesIO()
        Image.fromarray(rgb).save(b, "PNG", compress_level=1)
        return b.getvalue()

    def pil_mask_png() -> bytes:
        b = io.BytesIO()
        Image.fromarray(mask > 0).save(b, "PNG", optimize=False)
        return b.getvalue()

    h, w = rgb.shape[:2]
    th, tw = (model_size, round(w * model_size / h)) if h <= w else (round(h * model_size / w), model_size)
    return {
        "jpeg decode": (lambda: np.asarray(Image.open(io.BytesIO(jpg)).convert("RGB")),
                        lambda: cv2.cvtColor(cv2.imdecode(np.frombuffer(jpg, np.uint8), cv2.IMREAD_COLOR),
                                             cv2.COLOR_BGR2RGB)),
        "jpeg encode q90": (pil_jpeg_enc,
                            lambda: cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR),
                                                 [cv2.IMWRITE_JPEG_QUALITY, 90])),
        "jpeg encode q90 (BGR in)": (pil_jpeg_enc, lambda: cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 90])),
        "png encode (level 1)": (pil_png_enc, lambda: cv2.imencode(".png", bgr, [cv2.IMWRITE_PNG_COMPRESSION, 1])),
        "mask png (1 bit / 8 bit)": (pil_mask_png,
                                     lambda: cv2.imencode(".png", mask, [cv2.IMWRITE_PNG_BILEVEL, 1])),
        f"resize to {th}x{tw}": (lambda: Image.fromarray(rgb).resize((tw, th), Image.BILINEAR),
                                 lambda: cv2.resize(rgb, (tw, th), interpolation=cv2.INTER_AREA)),
    }


def median_ms(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--model-size", type=int, default=240)
    a = p.parse_args()
    cv2.setNumThreads(1)
    cpu = read_cpu_info()
    print(f"CPU: {cpu.model}; ISA flags: {' '.join(cpu.isa)}")
    print(f"OpenCV {cv2.__version__}, Pillow {Image.__version__}; one thread each; medians of {a.iters}")
    part, _ = synth.render_part("bottle", 256, 7, "scratch")
    hd = cv2.resize(synth.render_part("wood", 512, 8, "stain")[0], (1920, 1080), interpolation=cv2.INTER_CUBIC)
    print(f"{'image':<10} {'operation':<28} {'PIL ms':>8} {'OpenCV ms':>10} {'PIL / OpenCV':>13}")
    for name, img in (("256x256", part), ("1920x1080", hd)):
        for op, (pil, ocv) in cases(img, a.model_size).items():
            tp, to = [], []
            for _ in range(a.iters):
                tp.append(median_ms(pil))
                to.append(median_ms(ocv))
            mp, mo = statistics.median(tp), statistics.median(to)
            print(f"{name:<10} {op:<28} {mp:>8.3f} {mo:>10.3f} {mp / mo:>12.2f}x")
    print("PIL / OpenCV > 1: OpenCV is faster")
    return 0


if __name__ == "__main__":
    sys.exit(main())
