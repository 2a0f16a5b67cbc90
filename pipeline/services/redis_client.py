"""The project's one way to reach Redis: URL, ACL user and password, TLS CA; and which errors are transient.

Used by the worker's publisher, the adapter registry, the dashboard and the CLI.
"""

from __future__ import annotations

from typing import Any

import redis
from redis import exceptions as redis_errors
from redis.backoff import NoBackoff
from redis.retry import Retry

from pipeline.errors import ConfigError
from pipeline.observability.redaction import install_log_redaction, register_secrets, url_password
from pipeline.settings import RedisSettings

# Errors that mean "Redis is unreachable or unhappy, keep the work and try again later" (not a bug in the
# data). Some of them waiting will not fix: `redis_problem` names those, for logs and readiness.
RETRYABLE = (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError, redis.ReadOnlyError,
             redis.ResponseError, OSError)

_PROBLEMS: tuple[tuple[type[BaseException], str], ...] = (
    (redis_errors.AuthenticationError,
     "Redis refused the credentials (NOAUTH / WRONGPASS): check redis.username and redis.password"),
    (redis_errors.AuthorizationError, "Redis refused the credentials: check redis.username and redis.password"),
    (redis_errors.NoPermissionError,
     "Redis ACL denies a command or key (NOPERM): the user needs the redis.prefix keys and channels and the "
     "commands in docs/operations.md"),
    (redis_errors.OutOfMemoryError,
     "Redis is out of memory (OOM, used memory above maxmemory): raise maxmemory or let it evict per-frame "
     "keys (maxmemory-policy volatile-lru, docs/operations.md)"),
)


def redis_problem(error: BaseException | None) -> str | None:
    """What an operator must change when `error` is one that retrying will not fix; None for transient ones
    (unreachable, timeouts, loading) and for None."""
    for cls, words in _PROBLEMS:
        if isinstance(error, cls):
            return words
    return None


def describe_redis_error(error: BaseException, limit: int = 300) -> str:
    """A Redis error for a log line: its problem in words if it has one, and the message cut short (a failed
    pipeline quotes the whole command, frame PNGs included)."""
    text = str(error)
    text = text if len(text) <= limit else text[:limit] + "..."
    problem = redis_problem(error)
    return f"{problem} ({type(error).__name__}: {text})" if problem else f"{type(error).__name__}: {text}"


def make_redis(rs: RedisSettings) -> redis.Redis:
    """A client that fails fast (one immediate reconnect attempt): the worker does its own backoff.

    Its password (and one inside the URL) is registered for redaction: no log line of this process shows it.
    """
    register_secrets(rs.password, url_password(rs.url))
    install_log_redaction()
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
