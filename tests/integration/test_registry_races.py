"""The registry's optimistic transactions under concurrent writers, on a real Redis
(pipeline/adaptation/registry.py): `rollback` and `publish` read the pointer under WATCH, then write it
with MULTI/EXEC; a concurrent publish, rollback or pause between the read and the write must make them
retry and end consistent: one current version, every pointer move audited once, with the pointer it
really moved from, and no half-written version.

The concurrent write is injected deterministically: the registry under test talks to Redis through a
`RacingClient`, which runs another writer (its own connection) at a chosen call made between WATCH and
EXEC, the first `times` times that call is made.
"""

from __future__ import annotations

import contextlib
import threading
import uuid
from collections.abc import Callable
from typing import Any

import pytest
import redis

from pipeline.adaptation.registry import VersionRegistry
from pipeline.redis_keys import RedisKeys
from tests.integration.conftest import RedisServer

pytestmark = pytest.mark.integration

LINE = "bottle"


class RacingClient:
    """A redis client that runs `race()` just before the first `times` calls of `method`; the rest passes through."""

    def __init__(self, real: redis.Redis, method: str, race: Callable[[], None], times: int = 1) -> None:
        self._real, self._method, self._race, self._left = real, method, race, times
        self.calls = 0

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._real, name)
        if name != self._method:
            return attr

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            if self._left > 0:
                self._left -= 1
                self._race()
            return attr(*args, **kwargs)

        return wrapped


@pytest.fixture
def keys() -> RedisKeys:
    return RedisKeys(f"race{uuid.uuid4().hex[:8]}")


@pytest.fixture
def other(redis_server: RedisServer, keys: RedisKeys) -> VersionRegistry:
    """The concurrent writer: another process's registry, on its own connection."""
    return VersionRegistry(redis_server.client(), keys)


def _racing(redis_server: RedisServer, keys: RedisKeys, method: str, race: Callable[[], None],
            times: int = 1) -> tuple[VersionRegistry, RacingClient]:
    client = RacingClient(redis_server.client(), method, race, times)
    return VersionRegistry(client, keys), client  # type: ignore[arg-type]


def _publish(reg: VersionRegistry, base: str | None, actor: str = "w1") -> str | None:
    res = reg.publish(LINE, b"T", {}, actor=actor, reason="good", base_version=base)
    return res.version if res.promoted else None


def _moves(reg: VersionRegistry) -> list[tuple[str, str, str]]:
    """(action, from, to) of every pointer move in the audit, oldest first; '' = no adapter."""
    out = []
    for e in reversed(reg.audit(LINE, count=10_000)):
        if e["action"] in ("promote", "rollback"):
            to = "" if e["version"] == "none" else e["version"]
            out.append((e["action"], e["from_version"], to))
    return out


def _assert_consistent(reg: VersionRegistry) -> None:
    """The audit's pointer moves chain (each starts where the previous one ended) and end at `current`;
    every version listed is whole (tensors and metadata) and nothing else is stored as a version."""
    pointer = ""
    for action, frm, to in _moves(reg):
        assert frm == pointer, f"{action} recorded a move from {frm!r} while the pointer was at {pointer!r}"
        pointer = to
    assert (reg.current(LINE) or "") == pointer
    versions = reg.versions(LINE)
    for v in versions:
        assert reg.tensors(LINE, v) == b"T" and reg.meta(LINE, v)["version"] == v
    stored = {k.decode().rsplit(":", 1)[-1] for k in reg.client.scan_iter(reg.keys.registry_version(LINE, "*"))}
    assert stored == set(versions), "a version was written outside its transaction"


def test_rollback_retries_when_a_promotion_lands_between_its_read_and_its_write(
    redis_server: RedisServer, keys: RedisKeys, other: VersionRegistry
) -> None:
    for base in (None, "v1", "v2"):
        _publish(other, base)
    # the operator reads current = v3 and plans "one step back" = v2; a worker promotes v4 before the write
    reg, client = _racing(redis_server, keys, "zrange", lambda: _publish(other, "v3", actor="w2"))
    assert reg.rollback(LINE, actor="op", reason="bad") == "v3", "the retry stepped back from v4, not from v3"
    assert client.calls == 2, "the first transaction must have failed and been retried once"
    assert reg.current(LINE) == "v3"
    assert _moves(reg)[-2:] == [("promote", "v3", "v4"), ("rollback", "v4", "v3")]
    assert [e["action"] for e in reg.audit(LINE)].count("rollback") == 1, "the failed attempt wrote no audit entry"
    _assert_consistent(reg)


def test_rollbacks_racing_each_other_both_land_in_order(
    redis_server: RedisServer, keys: RedisKeys, other: VersionRegistry
) -> None:
    for base in (None, "v1", "v2"):
        _publish(other, base)
    # operator A rolls back to v1; operator B's rollback to v2 lands between A's read (v3) and A's write
    reg, client = _racing(redis_server, keys, "zrange", lambda: other.rollback(LINE, "v2", actor="B"))
    assert reg.rollback(LINE, "v1", actor="A") == "v1"
    assert client.calls == 2 and reg.current(LINE) == "v1"
    audit = [(e["actor"], e["from_version"], e["version"]) for e in reg.audit(LINE) if e["action"] == "rollback"]
    assert audit == [("A", "v2", "v1"), ("B", "v3", "v2")], "A's entry names the pointer it really moved from"
    _assert_consistent(reg)


def test_rollback_keeps_retrying_while_the_pointer_keeps_moving(
    redis_server: RedisServer, keys: RedisKeys, other: VersionRegistry
) -> None:
    _publish(other, None)
    bases = iter(["v1", "v2", "v3"])
    reg, client = _racing(redis_server, keys, "zrange", lambda: _publish(other, next(bases)), times=3)
    assert reg.rollback(LINE, actor="op") == "v3", "three promotions interrupted it: it steps back from v4"
    assert client.calls == 4 and reg.versions(LINE) == ["v1", "v2", "v3", "v4"]
    _assert_consistent(reg)


def test_rollback_to_no_adapter_racing_a_promotion(
    redis_server: RedisServer, keys: RedisKeys, other: VersionRegistry
) -> None:
    _publish(other, None)
    # "one step back" from v1 is no adapter; a promotion of v2 lands first, so the retry steps back to v1
    reg, client = _racing(redis_server, keys, "zrange", lambda: _publish(other, "v1"))
    assert reg.rollback(LINE, actor="op") == "v1" and client.calls == 2
    assert reg.current(LINE) == "v1"
    _assert_consistent(reg)


@pytest.mark.parametrize("move", ["rollback", "promote", "pause"])
def test_a_promotion_raced_by_a_pointer_move_or_a_pause_is_refused_after_its_retry(
    redis_server: RedisServer, keys: RedisKeys, other: VersionRegistry, move: str
) -> None:
    for base in (None, "v1", "v2"):
        _publish(other, base)
    race = {"rollback": lambda: other.rollback(LINE, "v2", actor="op"),
            "promote": lambda: _publish(other, "v3", actor="w2"),
            "pause": lambda: other.pause(LINE, actor="op")}[move]
    # the worker checked current == v3 (its base) and not paused; the move lands before its write
    reg, client = _racing(redis_server, keys, "incr", race)
    res = reg.publish(LINE, b"T", {}, actor="w1", reason="good", base_version="v3")
    assert not res.promoted and res.version is None
    assert client.calls == 1, "the retry never got as far as numbering a version"
    expected_current, expected_versions = {"rollback": ("v2", ["v1", "v2", "v3"]),
                                           "promote": ("v4", ["v1", "v2", "v3", "v4"]),
                                           "pause": ("v3", ["v1", "v2", "v3"])}[move]
    assert reg.current(LINE) == expected_current and reg.versions(LINE) == expected_versions
    newest = reg.audit(LINE)[0]
    assert (newest["action"], newest["actor"]) == ("refuse", "w1")
    assert ("paused" in newest["reason"]) == (move == "pause")
    _assert_consistent(reg)


def test_concurrent_writers_on_threads_leave_a_consistent_registry(
    redis_server: RedisServer, keys: RedisKeys
) -> None:
    """Not deterministic in its interleaving, only in what must hold after it: many publishers and
    rollbacks at once leave one current version and an unbroken, complete audit chain."""
    seed = VersionRegistry(redis_server.client(), keys)
    _publish(seed, None)
    errors: list[BaseException] = []
    promoted: list[str] = []
    rolled: list[str | None] = []

    def publisher(name: str) -> None:
        reg = VersionRegistry(redis_server.client(), keys)
        try:
            for _ in range(15):
                v = _publish(reg, reg.current(LINE), actor=name)
                if v:
                    promoted.append(v)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    def roller(name: str) -> None:
        reg = VersionRegistry(redis_server.client(), keys)
        try:
            for _ in range(15):
                if reg.current(LINE) is not None:
                    with contextlib.suppress(ValueError):  # the pointer reached no adapter since the check
                        rolled.append(reg.rollback(LINE, actor=name))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=publisher, args=(f"w{i}",)) for i in range(3)]
    threads += [threading.Thread(target=roller, args=(f"op{i}",)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    moves = _moves(seed)
    assert sum(a == "promote" for a, _, _ in moves) == 1 + len(promoted), "a promotion's audit entry was lost"
    assert sum(a == "rollback" for a, _, _ in moves) == len(rolled), "a rollback's audit entry was lost"
    assert sorted(seed.versions(LINE), key=lambda v: int(v[1:])) == seed.versions(LINE)
    assert len(set(promoted)) == len(promoted), "two promotions got the same version"
    _assert_consistent(seed)
