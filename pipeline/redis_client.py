"""The project's one way to reach Redis: URL, ACL user and password, TLS CA; and which errors are transient.

Used by the worker's publisher, the adapter registry, the dashboard and the CLI.
"""

from __future__ import annotations

from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from pipeline.errors import ConfigError
from pipeline.settings import RedisSettings

# Errors that mean "Redis is unreachable or unhappy right now, try again later" (not a bug in the data).
RETRYABLE = (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError, redis.ReadOnlyError,
             redis.ResponseError, OSError)


def make_redis(rs: RedisSettings) -> redis.Redis:
    """A client that fails fast (one immediate reconnect attempt): the worker does its own backoff."""
    # redis-py accepts TLS options only for rediss:// URLs; a CA with a plain URL is a config error.
    if rs.ssl_ca_certs and not rs.url.startswith("rediss://"):
        raise ConfigError("redis.ssl_ca_certs is set but redis.url is not a rediss:// (TLS) URL")
    extra: dict[str, Any] = {"ssl_ca_certs": rs.ssl_ca_certs} if rs.ssl_ca_certs else {}
    return redis.Redis.from_url(
        rs.url,
        username=rs.username,
        password=rs.password,
        socket_timeout=rs.socket_timeout_s,
        socket_connect_timeout=rs.socket_timeout_s,
        retry=Retry(NoBackoff(), 1),
        health_check_interval=0,
        **extra,
    )
