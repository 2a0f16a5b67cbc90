"""Following what a line's workers serve, for everything that judges frames without being a worker (`anoclip
serve`, `anoclip score`, the Python API): the registry's current adapter and bank, and the thresholds the
workers published. A follower never admits, builds, publishes, locks nor calibrates: its frames are untrusted.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass

import redis

from pipeline.adaptation.memory.service import MemoryService
from pipeline.adaptation.registry import VersionRegistry
from pipeline.adaptation.tta.service import AdapterService
from pipeline.errors import ConfigError
from pipeline.inspection.frame_scorer import FrameScorer
from pipeline.inspection.thresholds import LineThresholds, calibration_identity, follow_published
from pipeline.observability.redaction import redact_url
from pipeline.redis_keys import RedisKeys
from pipeline.services.redis_client import RETRYABLE, make_redis
from pipeline.settings import Settings

log = logging.getLogger("anoclip.following")


class PublishedThresholds:
    """Reads each line's threshold hash (at most every `poll_s`) and applies the calibration and the operator's
    override in it (`follow_published`), as a worker adopts them; Redis away: the last ones read stay."""

    def __init__(self, client: redis.Redis, keys: RedisKeys, scorer: FrameScorer, poll_s: float = 1.0) -> None:
        self.client = client
        self.keys = keys
        self.scorer = scorer
        self.poll_s = poll_s
        self._read: dict[str, float] = {}
        self._lock = threading.Lock()

    def sync(self, line: str, thresholds: LineThresholds) -> None:
        now = time.monotonic()
        with self._lock:
            last = self._read.get(line)
            if last is not None and now - last < self.poll_s:
                return
            self._read[line] = now
        try:
            raw = self.client.hgetall(self.keys.threshold(line))
        except redis.RedisError as e:  # away, or not allowed: judge with the last state read, never fail a request
            log.debug("line %s: published thresholds unavailable, keeping the last read: %s", line, e)
            return
        state = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
                 for k, v in raw.items()}
        ident = calibration_identity(self.scorer.settings, line, self.scorer.prompt_hash(line))
        follow_published(line, thresholds, state, ident, first=last is None)


@dataclass
class Following:
    """The followers of one process; `Inspector.over(scorer, following)` puts them on the verdict path."""

    settings: Settings
    adapters: AdapterService | None = None
    memory: MemoryService | None = None
    published: PublishedThresholds | None = None
    adapter_note: str | None = None
    """Why the base model is served (no buffered TTA, Redis unreachable); None when following adapters."""
    memory_note: str | None = None

    def stop(self) -> None:
        for part in (self.adapters, self.memory):
            if part is not None:
                part.stop()


def start_following(settings: Settings, scorer: FrameScorer, *, client: redis.Redis | None = None,
                    keys: RedisKeys | None = None, follower_id: str = "follower",
                    required: bool = False) -> Following:
    """Follow the line's workers through Redis: adapters (with `tta.mode: buffered`, as workers serve them),
    the banks of `memory: stream` lines, and the published thresholds. Redis unreachable: the base model and the
    config's thresholds, the reason in `adapter_note`/`memory_note` (an error when `required`); memory lines then
    answer `NoBankError` until Redis answers."""
    s = settings
    client = client if client is not None else make_redis(s.redis)
    keys = keys if keys is not None else RedisKeys(s.redis.prefix)
    following = Following(settings)
    lines = [ln.id for ln in s.lines]
    memory_lines = sorted(ln.id for ln in s.lines if ln.memory == "stream")
    try:
        client.ping()
        reachable, reason = True, ""
    except Exception as e:  # any Redis failure: the base model and the config's thresholds
        reachable, reason = False, f"Redis at {redact_url(s.redis.url)} unreachable ({type(e).__name__}: {e})"
        if required:
            raise ConfigError(f"redis.url: cannot follow the line's workers: {reason}") from e
    if memory_lines:
        following.memory = MemoryService(scorer, VersionRegistry(client, keys, kind="banks"), memory_lines,
                                         follower_id, poll_s=s.tta.trainer_poll_s, follow_only=True)
        if reachable:
            with contextlib.suppress(*RETRYABLE):
                for line in memory_lines:
                    following.memory.sync(line)
        else:
            following.memory_note = reason
            log.warning("memory lines %s have no bank until Redis answers: %s", ", ".join(memory_lines), reason)
        following.memory.start()
    if s.tta.mode != "buffered":
        following.adapter_note = (f"base model: tta.mode is {s.tta.mode}; registry adapters are served with "
                                  "tta.mode buffered, as workers do")
    elif not reachable:
        following.adapter_note = f"base model: {reason}"
    if not reachable:
        log.warning("judging with the base model and the config's thresholds: %s", reason)
        return following
    following.published = PublishedThresholds(client, keys, scorer)
    if following.adapter_note is not None:
        return following
    service = AdapterService(scorer, VersionRegistry(client, keys), lines, follower_id)
    for line in lines:
        with contextlib.suppress(*RETRYABLE):  # Redis gone meanwhile: the service's loop catches up
            service.sync(line)
    following.adapters = service.start(train=False)
    log.info("following the adapter registry (prefix %s): %s", keys.prefix,
             ", ".join(f"{ln} {service.adapter_for(ln)[1] or 'base'}" for ln in lines))
    return following
