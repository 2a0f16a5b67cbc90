#!/usr/bin/env bash
# Local single-machine stack (Tansu broker + Redis on 127.0.0.1): ./stack.sh up|down|status [--config FILE]
# A thin wrapper so shell users and service managers need not know the Python entry point.
set -euo pipefail
cd "$(dirname "$0")/../.."
exec "${PYTHON:-python3}" -m workers.cli stack "$@"
