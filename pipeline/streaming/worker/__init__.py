"""The streaming inspection worker, split into small parts (see `runtime` for how they fit together)."""

from pipeline.streaming.worker.runtime import InspectionWorker

__all__ = ["InspectionWorker"]
