"""What operators say and read: alert labels (`labels`: acknowledged, confirmed defect, false alarm, with their
audit; the one meaning of "label" in this project: Prometheus' own are "series labels") and the words every
output uses for defect regions and for an image verdict a mask disagrees with (`describe`)."""
