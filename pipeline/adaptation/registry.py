"""The registry of what a line learns, in Redis: immutable versions of one kind of learned state per line
(`kind="adapters"`: TTA adapters, `adaptation/tta/`; `kind="banks"`: patch-memory banks, `adaptation/memory/`),
an atomic `current` pointer, pause, rollback, an audit trail, refresh requests, and the lock that elects one
refresher (trainer or bank builder) per line and kind. Both kinds store one artifact format: safetensors bytes
with their metadata in the header (`tta/files.py`, `memory/files.py`) plus the same metadata as JSON.

A version is written whole (one HSET of tensors + metadata) in the same MULTI/EXEC as the pointer
move, so no half-written version can ever become current. Rollback moves the pointer back and
deletes nothing. Every promotion, refusal, rollback, pause and resume leaves an audit entry.
"""

from __future__ import annotations

import getpass
import json
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Any

import redis

from pipeline.redis_keys import RedisKeys

AUDIT_MAXLEN = 10_000

_RENEW_LUA = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end return 0"
_RELEASE_LUA = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"


def default_actor() -> str:
    """Who did it, for the audit trail: user@host."""
    try:
        user = getpass.getuser()
    except Exception:  # no passwd entry in some containers
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


@dataclass
class PromotionResult:
    promoted: bool
    version: str | None
    reason: str


class VersionRegistry:
    """Versions and pointer of every line's learned state of one kind; workers read, refreshers and operators
    write."""

    def __init__(self, client: redis.Redis, keys: RedisKeys, kind: str = "adapters") -> None:
        """`kind`: `adapters` (TTA adapters) or `banks` (patch-memory banks, docs/memory.md): the same
        versions, pointer, pause, rollback and audit under `<prefix>:<kind>:<line>:...`."""
        if kind not in RedisKeys.REGISTRY_KINDS:
            raise ValueError(f"registry kind must be one of {RedisKeys.REGISTRY_KINDS}, got {kind!r}")
        self.client = client
        self.keys = keys
        self.kind = kind

    @property
    def noun(self) -> str:
        """What a version is, in messages: `adapter` or `bank`."""
        return "bank" if self.kind == "banks" else "adapter"

    # -- reading --------------------------------------------------------------------------------
    def current(self, line: str) -> str | None:
        v = self.client.get(self.keys.registry_current(line, kind=self.kind))
        return _s(v) if v is not None else None

    def is_paused(self, line: str) -> bool:
        return bool(self.client.exists(self.keys.registry_paused(line, kind=self.kind)))

    def versions(self, line: str) -> list[str]:
        """Every version of the line, oldest first."""
        return [_s(v) for v in self.client.zrange(self.keys.registry_versions(line, kind=self.kind), 0, -1)]

    def meta(self, line: str, version: str) -> dict[str, Any]:
        raw = self.client.hget(self.keys.registry_version(line, version, kind=self.kind), "meta")
        if raw is None:
            raise KeyError(f"line {line!r} has no {self.noun} version {version!r}")
        return json.loads(raw)

    def tensors(self, line: str, version: str) -> bytes:
        raw = self.client.hget(self.keys.registry_version(line, version, kind=self.kind), "tensors")
        if raw is None:
            raise KeyError(f"line {line!r} has no {self.noun} version {version!r}")
        return raw

    def audit(self, line: str, count: int = 50) -> list[dict[str, Any]]:
        """Newest first."""
        out = []
        for entry_id, fields in self.client.xrevrange(self.keys.registry_audit(line, kind=self.kind), count=count):
            d = {_s(k): _s(v) for k, v in fields.items()}
            d["id"] = _s(entry_id)
            out.append(d)
        return out

    # -- writing --------------------------------------------------------------------------------
    def _audit_fields(self, action: str, actor: str, reason: str, **extra: Any) -> dict[str, str]:
        fields = {"ts": f"{time.time():.3f}", "action": action, "actor": actor, "reason": reason}
        fields.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in extra.items() if v is not None})
        return fields

    def publish(
        self,
        line: str,
        tensors: bytes,
        meta: dict[str, Any],
        *,
        actor: str,
        reason: str,
        base_version: str | None,
        request_id: str | None = None,
        audit: dict[str, Any] | None = None,
    ) -> PromotionResult:
        """Store a new immutable version and make it current, unless the line was paused or its
        current adapter moved (e.g. a rollback) since training started from `base_version`.

        The promotion's audit entry records the gate's figures (`validation`), the version's own
        `thresholds` and `audit` (e.g. the admission counts behind the training buffer)."""
        k = self.keys
        cur_key, paused_key = k.registry_current(line, kind=self.kind), k.registry_paused(line, kind=self.kind)
        with self.client.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(cur_key, paused_key)
                    cur = pipe.get(cur_key)
                    cur = _s(cur) if cur is not None else None
                    refusal = None
                    if pipe.exists(paused_key):
                        refusal = "line paused during training"
                    elif cur != base_version:
                        refusal = f"current {self.noun} moved from {base_version} to {cur} during training"
                    if refusal:
                        pipe.unwatch()
                        self.record(line, "refuse", actor=actor, reason=refusal, request_id=request_id)
                        return PromotionResult(False, None, refusal)
                    n = int(self.client.incr(k.registry_seq(line, kind=self.kind)))
                    version = f"v{n}"
                    meta = {**meta, "version": version, "line": line, "created": meta.get("created", time.time())}
                    pipe.multi()
                    pipe.hset(k.registry_version(line, version, kind=self.kind),
                              mapping={"tensors": tensors, "meta": json.dumps(meta)})
                    pipe.zadd(k.registry_versions(line, kind=self.kind), {version: n})
                    pipe.set(cur_key, version)
                    pipe.xadd(
                        k.registry_audit(line, kind=self.kind),
                        self._audit_fields("promote", actor, reason, version=version, from_version=cur or "",
                                           request_id=request_id, validation=meta.get("validation"),
                                           thresholds=meta.get("thresholds") or None, **(audit or {})),
                        maxlen=AUDIT_MAXLEN,
                        approximate=True,
                    )
                    pipe.execute()
                    return PromotionResult(True, version, reason)
                except redis.WatchError:
                    continue

    def record(self, line: str, action: str, *, actor: str, reason: str, **extra: Any) -> None:
        """An audit entry without a pointer move (refusals, refresh outcomes)."""
        self.client.xadd(self.keys.registry_audit(line, kind=self.kind),
                         self._audit_fields(action, actor, reason, **extra), maxlen=AUDIT_MAXLEN, approximate=True)

    def rollback(self, line: str, to_version: str | None = None, *, actor: str, reason: str = "") -> str | None:
        """Move `current` to `to_version` (default: the version before current; None = no adapter).

        Deletes nothing, so a rollback can itself be rolled forward again.
        """
        k = self.keys
        cur_key = k.registry_current(line, kind=self.kind)
        with self.client.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(cur_key)
                    cur = pipe.get(cur_key)
                    cur = _s(cur) if cur is not None else None
                    versions = self.versions(line)
                    if to_version is None:
                        if cur is None:
                            raise ValueError(f"line {line!r} has no current {self.noun} to roll back")
                        idx = versions.index(cur) if cur in versions else len(versions)
                        target = versions[idx - 1] if idx > 0 else None
                    else:
                        if to_version not in versions:
                            raise KeyError(
                                f"line {line!r} has no {self.noun} version {to_version!r} (have: {versions})")
                        target = to_version
                    pipe.multi()
                    if target is None:
                        pipe.delete(cur_key)
                    else:
                        pipe.set(cur_key, target)
                    pipe.xadd(k.registry_audit(line, kind=self.kind),
                              self._audit_fields("rollback", actor, reason, version=target or "none",
                                                 from_version=cur or ""),
                              maxlen=AUDIT_MAXLEN, approximate=True)
                    pipe.execute()
                    return target
                except redis.WatchError:
                    continue

    def pause(self, line: str, *, actor: str, reason: str = "") -> None:
        """Stop promotions on the line; workers keep serving the current adapter."""
        note = json.dumps({"actor": actor, "reason": reason, "ts": time.time()})
        self.client.set(self.keys.registry_paused(line, kind=self.kind), note)
        self.record(line, "pause", actor=actor, reason=reason)

    def resume(self, line: str, *, actor: str, reason: str = "") -> None:
        self.client.delete(self.keys.registry_paused(line, kind=self.kind))
        self.record(line, "resume", actor=actor, reason=reason)

    # -- refresh requests -----------------------------------------------------------------------
    def request_refresh(self, line: str, *, actor: str) -> str:
        """Ask the line's trainer to refresh now; the outcome arrives on the audit stream."""
        request_id = uuid.uuid4().hex
        self.client.xadd(self.keys.registry_refresh_requests(line, kind=self.kind),
                    {"request_id": request_id, "actor": actor, "ts": f"{time.time():.3f}"},
                    maxlen=1000, approximate=True)
        return request_id

    def refresh_requests(self, line: str, after_id: str = "0-0") -> list[tuple[str, dict[str, str]]]:
        """Requests newer than `after_id`, oldest first."""
        entries = self.client.xrange(self.keys.registry_refresh_requests(line, kind=self.kind), min=f"({after_id}",
                                     count=100)
        return [(_s(i), {_s(k): _s(v) for k, v in f.items()}) for i, f in entries]

    def last_request_id(self, line: str) -> str:
        last = self.client.xrevrange(self.keys.registry_refresh_requests(line, kind=self.kind), count=1)
        return _s(last[0][0]) if last else "0-0"

    def wait_outcome(self, line: str, request_id: str, timeout_s: float, poll_s: float = 0.2) -> dict[str, Any] | None:
        """The audit entry answering `request_id`, or None after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while True:
            for entry in self.audit(line, count=200):
                if entry.get("request_id") == request_id and entry["action"] in ("promote", "refuse"):
                    return entry
            if time.monotonic() >= deadline:
                return None
            time.sleep(poll_s)


class RefreshLock:
    """`SET NX PX` lock electing one refresher (adapter trainer, bank builder) per line and kind; expires by itself
    if the holder dies."""

    def __init__(self, client: redis.Redis, keys: RedisKeys, line: str, owner: str, ttl_s: float,
                 kind: str = "adapters") -> None:
        self.client = client
        self.key = keys.registry_lock(line, kind=kind)
        self.owner = owner
        self.ttl_ms = int(ttl_s * 1000)

    def acquire(self) -> bool:
        return bool(self.client.set(self.key, self.owner, nx=True, px=self.ttl_ms))

    def renew(self) -> bool:
        """Extend the lease; False means it was lost (expired and maybe taken by another worker)."""
        return bool(self.client.eval(_RENEW_LUA, 1, self.key, self.owner, self.ttl_ms))

    def release(self) -> None:
        self.client.eval(_RELEASE_LUA, 1, self.key, self.owner)

    def holder(self) -> str | None:
        v = self.client.get(self.key)
        return _s(v) if v is not None else None
