"""Frames in, verdicts out: the Inspector (model + each line's text features and thresholds), image
decoding, rendering of masks and heatmaps, defect regions, thresholds and the text-feature cache."""
