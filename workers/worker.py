"""`anoclip worker`: frames from Kafka, AnoCLIP verdicts, masks and alerts into Redis.

The runtime is `pipeline.streaming.worker.InspectionWorker`; this module only parses arguments.
"""

from __future__ import annotations

import argparse
import logging
import os

from pipeline.observability.log_format import use_json_logs
from pipeline.settings import load_settings


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="config file (default: $ANOCLIP_CONFIG or ./config.yaml)")
    p.add_argument("--worker-id", default=None, help="name in heartbeats and logs (default host-pid)")
    p.add_argument("--metrics-port", type=int, default=None, help="override worker.metrics_port (0 = any free)")
    p.add_argument("--log-format", choices=["text", "json"], default="text", help="log line format")


def run(args: argparse.Namespace) -> int:
    # The scorer shares the CPU with this process's I/O threads (and, on one box, the broker and Redis):
    # OpenMP threads that spin while waiting for work then starve them, and are starved in turn; measured
    # here at up to 5x slower inference on a busy 2-core host. Must be set before torch loads; override
    # by setting the variable yourself.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from pipeline.streaming.worker import InspectionWorker

    if args.log_format == "json":
        use_json_logs()
    logging.getLogger("kafka").setLevel(logging.WARNING)
    worker = InspectionWorker(load_settings(args.config), worker_id=args.worker_id, metrics_port=args.metrics_port)
    worker.install_signal_handlers()
    return worker.run()
