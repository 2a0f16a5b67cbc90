"""anoclip: streaming zero-shot anomaly localisation with AnoCLIP."""

__version__ = "0.1.0"
