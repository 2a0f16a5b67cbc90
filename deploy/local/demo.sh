#!/usr/bin/env bash
# The main job end to end: stack up, a worker, synthetic frames, alerts printed as they arrive.
#   ./demo.sh --tiny --count 40      (tiny random-weight model: no weights needed)
set -euo pipefail
cd "$(dirname "$0")/../.."
exec "${PYTHON:-python3}" -m workers.cli demo "$@"
