"""The one verdict path (`inspector.Inspector`): what a line is served now and the verdict on its frames, for
the worker, `anoclip serve`, `anoclip score`, `anoclip eval` and the Python API alike; `following` keeps a
non-worker in step with what the line's workers serve (registry adapters and banks, published thresholds)."""
