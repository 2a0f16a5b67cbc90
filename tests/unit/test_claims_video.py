"""Video input through OpenCV (issue 14, item 3): frames come out in RGB order and at the video's size.
(tests/unit/test_frame_sources.py covers names, counts and looping; grey frames there cannot tell BGR from RGB.)"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from pipeline.inspection.imaging import decode_image
from pipeline.streaming.frame_sources import open_source


def test_video_frames_are_rgb_at_the_video_size(tmp_path: Path) -> None:
    video = tmp_path / "colours.avi"
    out = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 5, (48, 32))
    assert out.isOpened(), "OpenCV in this environment cannot write MJPG"
    for bgr in ((0, 0, 255), (255, 0, 0), (0, 255, 0)):  # red, blue, green as OpenCV (BGR) writes them
        out.write(np.full((32, 48, 3), bgr, np.uint8))
    out.release()
    frames = [decode_image(f.data, content_type=f.content_type) for f in open_source(str(video))]
    assert [f.shape for f in frames] == [(32, 48, 3)] * 3
    dominant = [int(np.argmax(f.reshape(-1, 3).mean(0))) for f in frames]
    assert dominant == [0, 2, 1], "red, blue, green in RGB order"
