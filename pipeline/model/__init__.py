"""Pure-torch AnoCLIP: dual-path CLIP backbone, prompts, text features, scorer, factory, adapters, the memory's
math (`memory`) and the TTA procedures (`tta_params`, `tta_scoring`, `tta_per_frame`, `tta_admission`,
`tta_gate`, `tta_train`).

No Kafka, Redis, network or file access here beyond loading weights; caches live outside.
"""

from pipeline.model.anoclip import AnoCLIP, AnomalyOutput, TileLayout, TokenAdapter
from pipeline.model.backbone import DualPathViT, VisualFeatures
from pipeline.model.factory import MODEL_CONFIGS, create_anoclip, list_models, resolve_device
from pipeline.model.prompts import PromptSet, build_prompt_set
from pipeline.model.text import TextFeatures

__all__ = [
    "MODEL_CONFIGS",
    "AnoCLIP",
    "AnomalyOutput",
    "DualPathViT",
    "PromptSet",
    "TextFeatures",
    "TileLayout",
    "TokenAdapter",
    "VisualFeatures",
    "build_prompt_set",
    "create_anoclip",
    "list_models",
    "resolve_device",
]
