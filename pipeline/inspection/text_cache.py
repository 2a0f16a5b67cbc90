"""On-disk cache of text features, keyed by model architecture + weights + exact prompt sentences.

Encoding ~900 sentences costs tens of seconds on a CPU with the real text tower; a worker restart
should not pay it again. Files are safetensors (never pickles), written atomically.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path

from safetensors.torch import load_file, save_file

from pipeline.model import AnoCLIP, PromptSet, TextFeatures

log = logging.getLogger(__name__)


class TextFeatureCache:
    def __init__(self, directory: str | os.PathLike[str] | None) -> None:
        self.directory = Path(directory).expanduser() if directory else None

    @staticmethod
    def key(model: AnoCLIP, prompts: PromptSet) -> str:
        # Text is always encoded in fp32 (AnoCLIP.encode_prompts), whatever the scoring precision.
        blob = f"{model.arch}|{model.weights_id}|fp32|{prompts.hash}".encode()
        return hashlib.sha256(blob).hexdigest()[:24]

    def path(self, model: AnoCLIP, prompts: PromptSet) -> Path | None:
        if self.directory is None:
            return None
        return self.directory / f"{model.arch.replace('/', '_')}-{self.key(model, prompts)}.safetensors"

    def get_or_compute(self, model: AnoCLIP, prompts: PromptSet) -> TextFeatures:
        """Cached features if present and well-formed, else encode and store them."""
        path = self.path(model, prompts)
        if path is not None and path.is_file():
            try:
                tf = TextFeatures.from_state_dict(load_file(str(path)))
                if tf.class_embeddings.shape == (2, model.embed_dim) and tf.normal_sentences.shape[0] == len(
                    prompts.normal
                ):
                    return tf.to(model.device)
                log.warning("text cache %s does not fit the model; recomputing", path)
            except Exception as e:  # a damaged cache file must never stop a worker
                log.warning("text cache %s unreadable (%s); recomputing", path, e)
        tf = model.encode_prompts(prompts)
        if path is not None:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
                os.close(fd)
                save_file({k: v.cpu() for k, v in tf.state_dict().items()}, tmp)
                os.replace(tmp, path)
            except OSError as e:
                log.warning("cannot write text cache %s: %s", path, e)
        return tf
