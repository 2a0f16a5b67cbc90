"""One Redis pub/sub subscription fanned out to every open browser, and a periodic status tick.

Pub/sub forgets what a disconnected subscriber missed, so every (re)connection to Redis is followed by
a `resync` event: the pages then re-read their state from the streams, which are the reliable path.
While Redis is unreachable the feed says so (`redis` event) and retries with capped backoff; it never
gives up and never takes the HTTP server down with it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis

from pipeline.dashboard.store import DashboardStore

log = logging.getLogger(__name__)

CLOSE = object()
"""Put on a subscriber's queue to end its HTTP response (shutdown, slow client, tests)."""


@dataclass
class Event:
    name: str
    data: Any

    def encode(self) -> bytes:
        """The SSE wire form: one `event:` line and one `data:` line (JSON has no raw newlines)."""
        return f"event: {self.name}\ndata: {json.dumps(self.data, separators=(',', ':'))}\n\n".encode()


class LiveFeed:
    """Subscribes to the live channel in a thread and hands every message to each subscriber queue."""

    def __init__(self, store: DashboardStore, *, tick_s: float = 2.0, backoff_s: float = 0.25,
                 backoff_max_s: float = 5.0, queue_size: int = 1000,
                 client_factory: Callable[[], redis.Redis] | None = None) -> None:
        self.store = store
        self.channel = store.keys.live_channel
        self.tick_s = tick_s
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self.queue_size = queue_size
        self._client_factory = client_factory or (lambda: store.client)
        self._subs: set[queue.Queue[Any]] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.redis_ok = False
        self.redis_error: str | None = None
        self.messages = 0
        self._subscribed = False

    # --- subscribers -------------------------------------------------------------------------
    def subscribe(self, wake: Callable[[], None] | None = None) -> queue.Queue[Any]:
        """A queue of `Event`s (and `CLOSE`); `wake` is called after each put, so an asyncio reader can await
        the next one instead of blocking a thread or polling. It must not block or raise."""
        q: queue.Queue[Any] = queue.Queue(maxsize=self.queue_size) if wake is None else _WakingQueue(
            self.queue_size, wake)
        with self._lock:
            self._subs.add(q)
        return q

    def unsubscribe(self, q: queue.Queue[Any]) -> None:
        with self._lock:
            self._subs.discard(q)

    @property
    def subscribers(self) -> int:
        with self._lock:
            return len(self._subs)

    def broadcast(self, name: str, data: Any) -> None:
        """Queue an event for every browser; one too slow to keep up is cut off (it reconnects and resyncs)."""
        ev = Event(name, data)
        with self._lock:
            subs = list(self._subs)
        for q in subs:
            try:
                q.put_nowait(ev)
            except queue.Full:
                self.unsubscribe(q)
                _force_put(q, CLOSE)

    def drop_clients(self) -> int:
        """End every open event stream (browsers reconnect by themselves); returns how many."""
        with self._lock:
            subs = list(self._subs)
            self._subs.clear()
        for q in subs:
            _force_put(q, CLOSE)
        return len(subs)

    def status(self) -> dict[str, Any]:
        return {"redis": self.redis_ok, "error": self.redis_error, "channel": self.channel}

    # --- threads -----------------------------------------------------------------------------
    def start(self) -> None:
        for target, name in ((self._listen, "dashboard-pubsub"), (self._ticker, "dashboard-tick")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self.drop_clients()
        for t in self._threads:
            t.join(timeout)

    def _set_redis(self, ok: bool, error: str | None = None) -> None:
        changed = ok != self.redis_ok or (not ok and error != self.redis_error)
        self.redis_ok, self.redis_error = ok, error
        if changed:
            self.broadcast("redis", self.status())
            if ok:
                log.info("redis reachable; subscribed to %s", self.channel)
                self.broadcast("resync", {"reason": "redis reconnected"})
            else:
                log.warning("redis unreachable: %s", error)

    def _listen(self) -> None:
        delay = self.backoff_s
        while not self._stop.is_set():
            pubsub = None
            try:
                pubsub = self._client_factory().pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(self.channel)
                self._subscribed = True
                self._set_redis(True)
                delay = self.backoff_s
                last_ping = time.monotonic()
                while not self._stop.is_set():
                    msg = pubsub.get_message(timeout=1.0)
                    if msg is not None and msg.get("type") == "message":
                        self._forward(msg.get("data"))
                    if time.monotonic() - last_ping > 10.0:  # catches a half-open TCP connection
                        pubsub.ping()
                        last_ping = time.monotonic()
            except (redis.RedisError, OSError) as e:
                self._subscribed = False
                self._set_redis(False, f"{type(e).__name__}: {e}")
            finally:
                if pubsub is not None:
                    with contextlib.suppress(redis.RedisError, OSError):
                        pubsub.close()
            if self._stop.wait(delay):
                return
            delay = min(delay * 2, self.backoff_max_s)

    def _forward(self, raw: Any) -> None:
        try:
            data = json.loads(raw.decode() if isinstance(raw, bytes | bytearray) else raw)
        except (ValueError, UnicodeDecodeError, AttributeError):
            log.warning("ignoring a non-JSON message on %s", self.channel)
            return
        if not isinstance(data, dict):
            return
        self.messages += 1
        self.broadcast("result", data)

    def _ticker(self) -> None:
        while not self._stop.wait(self.tick_s):
            if not self.subscribers:
                continue
            try:
                self.broadcast("tick", self.store.tick())
                if self._subscribed and not self.redis_ok:
                    self._set_redis(True)
            except (redis.RedisError, OSError) as e:
                self._set_redis(False, f"{type(e).__name__}: {e}")


class _WakingQueue(queue.Queue[Any]):
    def __init__(self, maxsize: int, wake: Callable[[], None]) -> None:
        super().__init__(maxsize)
        self.wake = wake

    def _put(self, item: Any) -> None:  # the hook every put() runs, under the queue's lock
        super()._put(item)
        self.wake()


def _force_put(q: queue.Queue[Any], item: Any) -> None:
    """Make room if needed: the close marker must get through even to a full queue."""
    while True:
        try:
            q.put_nowait(item)
            return
        except queue.Full:
            with contextlib.suppress(queue.Empty):
                q.get_nowait()
