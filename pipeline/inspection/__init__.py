"""The model's side of judging frames: `FrameScorer` (the model, each line's text features and thresholds;
`score_raw`, `judge`), thresholds and the line's published threshold state, the one score scale (`score_scale`),
image decoding, rendering of masks and heatmaps, defect regions, CPU runtimes and the text-feature cache.
Combining scores with thresholds happens on the one verdict path, `pipeline.verdicts`."""
