"""Kafka clients built from `KafkaSettings`, so every process talks to the broker the same way.

The defaults in `KafkaSettings` are right for Apache Kafka; anything broker-specific (the local Tansu
broker's short session timeout, its non-idempotent producer) comes from configuration only. Security
settings (SASL/SSL) pass straight through to kafka-python.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.errors import KafkaError, TopicAlreadyExistsError

from pipeline.observability.redaction import install_log_redaction, register_secrets
from pipeline.settings import KafkaSettings

log = logging.getLogger(__name__)


def client_config(ks: KafkaSettings) -> dict[str, Any]:
    """Connection and security options shared by producers, consumers and the admin client.

    The SASL password is registered for redaction (kafka-python logs its whole configuration at DEBUG).
    """
    register_secrets(ks.sasl_password)
    install_log_redaction()
    cfg: dict[str, Any] = {
        "bootstrap_servers": [s.strip() for s in ks.bootstrap_servers.split(",") if s.strip()],
        "client_id": ks.client_id,
        "security_protocol": ks.security_protocol,
        "request_timeout_ms": ks.request_timeout_ms,
    }
    if ks.security_protocol.startswith("SASL"):
        cfg.update(sasl_mechanism=ks.sasl_mechanism, sasl_plain_username=ks.sasl_username,
                   sasl_plain_password=ks.sasl_password)
    if ks.security_protocol.endswith("SSL"):
        cfg.update(ssl_cafile=ks.ssl_cafile, ssl_certfile=ks.ssl_certfile, ssl_keyfile=ks.ssl_keyfile)
    return cfg


def producer_config(ks: KafkaSettings) -> dict[str, Any]:
    acks: str | int = "all" if ks.acks == "all" else int(ks.acks)
    return {
        **client_config(ks),
        "acks": acks,
        "enable_idempotence": ks.enable_idempotence,
        "linger_ms": ks.linger_ms,
        "batch_size": ks.batch_size,
        "max_request_size": ks.max_request_size,
    }


def consumer_config(ks: KafkaSettings) -> dict[str, Any]:
    return {
        **client_config(ks),
        "group_id": ks.group_id,
        "enable_auto_commit": False,  # offsets are committed only after results are in Redis
        "auto_offset_reset": ks.auto_offset_reset,
        "session_timeout_ms": ks.session_timeout_ms,
        "heartbeat_interval_ms": ks.heartbeat_interval_ms,
        "max_poll_records": ks.max_poll_records,
        "max_poll_interval_ms": ks.max_poll_interval_ms,
        "max_partition_fetch_bytes": ks.max_partition_fetch_bytes,
        "fetch_max_wait_ms": ks.fetch_max_wait_ms,
    }


def make_producer(ks: KafkaSettings, **overrides: Any) -> KafkaProducer:
    """A producer for frames or dead letters (raw bytes in, raw bytes out)."""
    return KafkaProducer(**{**producer_config(ks), **overrides})


def make_consumer(ks: KafkaSettings, *topics: str, **overrides: Any) -> KafkaConsumer:
    """A group consumer with manual commits; pass `topics` to subscribe at once (no rebalance listener)."""
    return KafkaConsumer(*topics, **{**consumer_config(ks), **overrides})


def make_admin(ks: KafkaSettings) -> KafkaAdminClient:
    return KafkaAdminClient(**client_config(ks))


def ensure_topics(ks: KafkaSettings, topics: list[str] | None = None, *, retries: int = 20) -> list[str]:
    """Create the frames and DLQ topics (or `topics`) with the configured partitions; returns the new ones.

    Existing topics are left alone. Retries while the broker is still coming up.
    """
    names = topics or [ks.frames_topic, ks.dlq_topic]
    last: Exception | None = None
    for attempt in range(retries):
        try:
            admin = make_admin(ks)
        except KafkaError as e:  # broker not up yet
            last = e
            time.sleep(min(0.1 * (attempt + 1), 1.0))
            continue
        try:
            existing = set(admin.list_topics())
            created = []
            for name in names:
                if name in existing:
                    continue
                try:
                    admin.create_topics({name: {"num_partitions": ks.partitions,
                                                "replication_factor": ks.replication_factor}})
                    created.append(name)
                except TopicAlreadyExistsError:
                    pass
            return created
        except KafkaError as e:
            last = e
            time.sleep(min(0.1 * (attempt + 1), 1.0))
        finally:
            admin.close()
    raise KafkaError(f"could not create topics {names} on {ks.bootstrap_servers}: {last}")


def delete_topics(ks: KafkaSettings, topics: list[str]) -> None:
    """Delete topics (tests and `stack` housekeeping: Tansu keeps everything in memory)."""
    admin = make_admin(ks)
    try:
        existing = set(admin.list_topics())
        todo = [t for t in topics if t in existing]
        if todo:
            admin.delete_topics(todo, raise_errors=False)
    finally:
        admin.close()


def topic_partitions(ks: KafkaSettings) -> dict[str, int]:
    """Partition counts of every topic (for `stack status`)."""
    admin = make_admin(ks)
    try:
        described = admin.describe_topics()
        return {d["name"]: len(d.get("partitions", [])) for d in described if not d.get("error_code")}
    finally:
        admin.close()
