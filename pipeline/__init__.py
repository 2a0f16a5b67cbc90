"""anoclip: streaming zero-shot anomaly localisation with AnoCLIP.

The public API for scripts and notebooks (see docs/api.md)::

    from pipeline import Inspector, list_images, load_image, load_settings, save_overlay

    settings = load_settings("config.yaml")
    inspector = Inspector.from_settings(settings)
    for path in list_images(["frames/"]):
        image = load_image(path)
        (result,) = inspector.inspect("bottle", [image])
        result.score, result.verdict, result.anomaly_map, result.mask   # float, bool, HxW arrays
        save_overlay(f"{path.stem}.overlay.png", image, result)

Names are imported on first use, so `import pipeline` stays cheap (no torch until a model is needed).
Wings: `model` (pure torch), `inspection`, `adaptation`, `verdicts` (the one verdict path), `evaluation`,
`streaming`, `serving`, `dashboard`, `jobs`; below them `operators`, `web`, `observability`, `services`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "Settings": "pipeline.settings",
    "load_settings": "pipeline.settings",
    "AnoclipError": "pipeline.errors",
    "ConfigError": "pipeline.errors",
    "ImageError": "pipeline.errors",
    "Inspector": "pipeline.verdicts.inspector",
    "Inspection": "pipeline.inspection.frame_scorer",
    "load_image": "pipeline.inspection.imaging",
    "decode_image": "pipeline.inspection.imaging",
    "list_images": "pipeline.inspection.imaging",
    "overlay": "pipeline.inspection.render",
    "save_overlay": "pipeline.inspection.render",
    "create_anoclip": "pipeline.model.factory",
}

__all__ = [
    "AnoclipError", "ConfigError", "ImageError", "Inspection", "Inspector", "Settings", "__version__",
    "create_anoclip", "decode_image", "list_images", "load_image", "load_settings", "overlay", "save_overlay",
]

if TYPE_CHECKING:
    from pipeline.errors import AnoclipError, ConfigError, ImageError
    from pipeline.inspection.frame_scorer import Inspection
    from pipeline.inspection.imaging import decode_image, list_images, load_image
    from pipeline.inspection.render import overlay, save_overlay
    from pipeline.model.factory import create_anoclip
    from pipeline.settings import Settings, load_settings
    from pipeline.verdicts.inspector import Inspector


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
