#!/usr/bin/env bash
# Set up anoclip on a fresh machine: a virtualenv in .venv with the pinned torch build and the project.
#   bash deploy/local/setup.sh          # runtime
#   bash deploy/local/setup.sh --dev    # + test tools and, as root with apt, the Chromium the dashboard test drives
# Idempotent: re-running only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
DEV=0
[ "${1:-}" = "--dev" ] && DEV=1

if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  "$PY" -m venv .venv
fi
. .venv/bin/activate
if ! python -c "import torch, torchvision; assert torch.__version__.startswith('2.14.1')" 2>/dev/null; then
  echo "[setup] installing torch 2.14.1 + torchvision 0.29.1 (pinned; never unpinned)"
  pip install -q torch==2.14.1 torchvision==0.29.1
fi
if [ "$DEV" = 1 ]; then
  echo "[setup] installing anoclip with dev extras"
  pip install -q -e ".[dev]"
  if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      echo "[setup] installing chromium + chromium-driver (dashboard browser test)"
      apt-get update -qq >/dev/null
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
    else
      echo "[setup] WARNING: chromium/chromedriver missing; the dashboard browser test will fail" >&2
    fi
  fi
  # Camera tests: ffmpeg serves an MJPEG stream; GStreamer's RTSP server (system python3 + gi) an RTSP one;
  # gst-launch-1.0 runs GStreamer pipeline sources (PyPI's OpenCV has no GStreamer).
  if ! command -v ffmpeg >/dev/null 2>&1 || ! command -v gst-launch-1.0 >/dev/null 2>&1 \
      || ! /usr/bin/python3 -c "import gi; gi.require_version('GstRtspServer', '1.0')" 2>/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      echo "[setup] installing ffmpeg + GStreamer (tools, RTSP server; camera tests)"
      apt-get update -qq >/dev/null
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ffmpeg python3-gi gir1.2-gst-rtsp-server-1.0 \
        gstreamer1.0-tools gstreamer1.0-plugins-base gstreamer1.0-plugins-good >/dev/null
    else
      echo "[setup] WARNING: ffmpeg or the GStreamer RTSP server missing; the camera tests will fail" >&2
    fi
  fi
else
  echo "[setup] installing anoclip"
  pip install -q -e .
fi
if [ "$DEV" = 1 ] && ! command -v openssl >/dev/null 2>&1; then  # the TLS tests make their certificates
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[setup] installing openssl (TLS tests)"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssl >/dev/null
  else
    echo "[setup] WARNING: openssl missing; the Redis/Kafka TLS tests will fail" >&2
  fi
fi
command -v redis-server >/dev/null 2>&1 || echo "[setup] note: redis-server not found; 'anoclip stack up' needs Redis reachable or redis-server installed" >&2
echo "[setup] done: . .venv/bin/activate && anoclip --help"
