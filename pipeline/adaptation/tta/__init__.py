"""Test-time adaptation of a line's adapter (docs/tta.md): the token buffer with admission (`token_buffer`),
buffered training and its gate around the pure-torch procedures of `pipeline.model.tta_*` (`buffered`), the
adapters of `anoclip eval --tta` (`eval_scorers`), adapter files (`files`, the one artifact format) and the
worker's `AdapterService` (`service`: serve the registry's adapter, buffer frames, refresh)."""
