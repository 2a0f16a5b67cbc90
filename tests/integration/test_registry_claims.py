"""The adapter registry's own claims on a real Redis, without a worker (pipeline/adaptation/registry.py):
immutable numbered versions written with the pointer move, rollback that deletes nothing, pause, the
audit trail (newest first), refresh requests and their outcomes, and the trainer lock's ownership."""

from __future__ import annotations

import json
import threading
import time
import uuid

import pytest
import redis

from pipeline.adaptation.registry import RefreshLock, VersionRegistry, default_actor
from pipeline.redis_keys import RedisKeys
from tests.integration.conftest import RedisServer

pytestmark = pytest.mark.integration

LINE = "bottle"


@pytest.fixture
def reg(redis_server: RedisServer) -> VersionRegistry:
    return VersionRegistry(redis_server.client(), RedisKeys(f"reg{uuid.uuid4().hex[:8]}"))


def _publish(reg: VersionRegistry, base: str | None, data: bytes = b"T", **meta: object) -> str | None:
    res = reg.publish(LINE, data, {"validation": {"spread_ratio": 1.0}, **meta}, actor="w1", reason="good",
                      base_version=base, request_id="rq")
    return res.version if res.promoted else None


def test_versions_are_numbered_immutable_and_carry_their_metadata(reg: VersionRegistry) -> None:
    assert reg.current(LINE) is None and reg.versions(LINE) == [] and reg.audit(LINE) == []
    assert _publish(reg, None, b"one", created=123.0) == "v1"
    assert _publish(reg, "v1", b"two") == "v2"
    assert reg.versions(LINE) == ["v1", "v2"] and reg.current(LINE) == "v2"
    assert reg.tensors(LINE, "v1") == b"one" and reg.tensors(LINE, "v2") == b"two"
    m1, m2 = reg.meta(LINE, "v1"), reg.meta(LINE, "v2")
    assert (m1["version"], m1["line"], m1["created"]) == ("v1", LINE, 123.0)
    assert m2["version"] == "v2" and m2["created"] > 1e9, "created defaults to now"
    with pytest.raises(KeyError, match="no adapter version 'v9'"):
        reg.meta(LINE, "v9")
    with pytest.raises(KeyError, match="no adapter version 'v9'"):
        reg.tensors(LINE, "v9")
    newest = reg.audit(LINE)[0]
    assert (newest["action"], newest["version"], newest["from_version"], newest["actor"], newest["reason"],
            newest["request_id"]) == ("promote", "v2", "v1", "w1", "good", "rq")
    assert json.loads(newest["validation"]) == {"spread_ratio": 1.0} and float(newest["ts"]) > 1e9
    assert reg.audit(LINE)[1]["from_version"] == "", "the first promotion came from no adapter"
    assert [e["version"] for e in reg.audit(LINE, count=1)] == ["v2"]
    assert reg.audit(LINE)[0]["id"] > reg.audit(LINE)[1]["id"]


def test_a_refused_promotion_writes_nothing_but_the_refusal(reg: VersionRegistry) -> None:
    assert _publish(reg, None) == "v1"
    res = reg.publish(LINE, b"x", {}, actor="w2", reason="r", base_version=None, request_id="rq2")
    assert (res.promoted, res.version, res.reason) == (False, None, "current adapter moved from None to v1 during "
                                                                    "training")
    reg.pause(LINE, actor="op", reason="audit")
    res = reg.publish(LINE, b"x", {}, actor="w2", reason="r", base_version="v1")
    assert (res.promoted, res.reason) == (False, "line paused during training")
    assert reg.versions(LINE) == ["v1"] and reg.current(LINE) == "v1"
    assert [e["action"] for e in reg.audit(LINE)] == ["refuse", "pause", "refuse", "promote"]
    assert reg.audit(LINE)[2]["request_id"] == "rq2" and reg.audit(LINE)[2]["actor"] == "w2"
    reg.resume(LINE, actor="op")
    assert not reg.is_paused(LINE) and _publish(reg, "v1") == "v2", "the version counter skipped nothing"


def test_rollback_moves_the_pointer_back_and_deletes_nothing(reg: VersionRegistry) -> None:
    with pytest.raises(ValueError, match="no current adapter to roll back"):
        reg.rollback(LINE, actor="op")
    for base in (None, "v1", "v2"):
        _publish(reg, base)
    assert reg.rollback(LINE, actor="op", reason="bad v3") == "v2" and reg.current(LINE) == "v2"
    entry = reg.audit(LINE)[0]
    assert (entry["action"], entry["version"], entry["from_version"], entry["reason"]) == ("rollback", "v2", "v3",
                                                                                            "bad v3")
    assert reg.rollback(LINE, "v3", actor="op") == "v3", "rolled forward again"
    assert reg.rollback(LINE, "v1", actor="op") == "v1"
    assert reg.rollback(LINE, actor="op") is None and reg.current(LINE) is None, "before v1: no adapter"
    assert reg.audit(LINE)[0]["version"] == "none"
    with pytest.raises(KeyError, match="no adapter version 'v7'"):
        reg.rollback(LINE, "v7", actor="op")
    assert reg.versions(LINE) == ["v1", "v2", "v3"] and reg.tensors(LINE, "v3") == b"T"
    assert "@" in default_actor(), "operators are recorded as user@host"


def test_pause_and_resume_are_audited(reg: VersionRegistry) -> None:
    reg.pause(LINE, actor="alice", reason="inspection")
    assert reg.is_paused(LINE)
    note = json.loads(reg.client.get(reg.keys.registry_paused(LINE)))
    assert (note["actor"], note["reason"]) == ("alice", "inspection")
    reg.resume(LINE, actor="bob", reason="done")
    assert not reg.is_paused(LINE)
    assert [(e["action"], e["actor"], e["reason"]) for e in reg.audit(LINE)] == [
        ("resume", "bob", "done"), ("pause", "alice", "inspection")]


def test_refresh_requests_and_their_outcome(reg: VersionRegistry) -> None:
    assert reg.last_request_id(LINE) == "0-0" and reg.refresh_requests(LINE) == []
    r1 = reg.request_refresh(LINE, actor="op")
    mark = reg.last_request_id(LINE)
    r2 = reg.request_refresh(LINE, actor="op2")
    assert r1 != r2 and len(r1) == 32
    got = reg.refresh_requests(LINE)
    assert [f["request_id"] for _, f in got] == [r1, r2] and got[0][1]["actor"] == "op"
    assert [f["request_id"] for _, f in reg.refresh_requests(LINE, mark)] == [r2], "only those after the mark"
    assert reg.last_request_id(LINE) == got[-1][0]
    t0 = time.monotonic()
    assert reg.wait_outcome(LINE, r1, 0.3, poll_s=0.05) is None and time.monotonic() - t0 >= 0.3
    reg.record(LINE, "pause", actor="x", reason="not an answer", request_id=r1)
    assert reg.wait_outcome(LINE, r1, 0) is None, "only promote or refuse answers a request"
    reg.record(LINE, "refuse", actor="w", reason="nope", request_id=r1, report={"steps": 3})
    answer = reg.wait_outcome(LINE, r1, 5)
    assert answer is not None and answer["reason"] == "nope" and json.loads(answer["report"]) == {"steps": 3}
    assert reg.wait_outcome(LINE, r2, 0) is None


def test_the_trainer_lock_belongs_to_its_holder_and_expires(redis_server: RedisServer) -> None:
    client = redis_server.client()
    keys = RedisKeys(f"lock{uuid.uuid4().hex[:8]}")
    a = RefreshLock(client, keys, LINE, "a", ttl_s=0.5)
    b = RefreshLock(client, keys, LINE, "b", ttl_s=0.5)
    assert a.ttl_ms == 500
    assert a.acquire() and not b.acquire() and a.holder() == b.holder() == "a"
    assert 0 < client.pttl(keys.registry_lock(LINE)) <= 500
    assert not b.renew(), "only the holder renews"
    b.release()
    assert a.holder() == "a", "only the holder releases"
    time.sleep(0.3)
    assert a.renew() and client.pttl(keys.registry_lock(LINE)) > 300, "renewing extends the lease"
    a.release()
    assert a.holder() is None and b.acquire() and b.holder() == "b"
    time.sleep(0.7)
    assert b.holder() is None and not b.renew(), "an expired lease is lost"
    assert a.acquire()



def test_details_an_operator_reads_back(reg: VersionRegistry, monkeypatch: pytest.MonkeyPatch) -> None:
    """Added after mutation testing: defaults, the first step back, and answers buried under newer entries."""
    for base in (None, "v1"):
        _publish(reg, base)
    assert reg.rollback(LINE, actor="op") == "v1", "one step back from v2 is v1"
    reg.pause(LINE, actor="op")
    reg.resume(LINE, actor="op")
    assert [e["reason"] for e in reg.audit(LINE)[:3]] == ["", "", ""], "no reason given: recorded as empty"
    reg.rollback(LINE, actor="op")  # to no adapter
    reg.rollback(LINE, "v2", actor="op")
    assert reg.audit(LINE)[0]["from_version"] == "", "rolled forward from no adapter"
    reg.pause(LINE, actor="op")
    assert json.loads(reg.client.get(reg.keys.registry_paused(LINE)))["ts"] > 1e9

    rid = reg.request_refresh(LINE, actor="op")
    assert float(reg.refresh_requests(LINE)[0][1]["ts"]) > 1e9
    _publish_answer = reg.publish(LINE, b"T", {}, actor="w", reason="ok", base_version="v2", request_id=rid)
    assert not _publish_answer.promoted  # paused: a refusal answers it
    reg.resume(LINE, actor="op")
    rid2 = reg.request_refresh(LINE, actor="op")
    assert reg.publish(LINE, b"T", {}, actor="w", reason="ok", base_version="v2", request_id=rid2).promoted
    for i in range(60):  # newer entries than the answer: more than the audit's default page of 50
        reg.record(LINE, "note", actor="x", reason=str(i))
    assert reg.wait_outcome(LINE, rid2, 0)["action"] == "promote"
    assert reg.wait_outcome(LINE, rid, 0)["action"] == "refuse"
    for _ in range(120):
        reg.request_refresh(LINE, actor="op")
    assert len(reg.refresh_requests(LINE)) == 100, "requests are read in pages of 100"

    def no_passwd() -> str:
        raise KeyError("uid not found")

    monkeypatch.setattr("getpass.getuser", no_passwd)
    assert default_actor().startswith("unknown@")


def test_adapter_and_bank_registries_of_one_prefix_never_share_a_key(redis_server: RedisServer) -> None:
    """Added after mutation testing: every operation of a `banks` registry reads and writes its own keys, so
    the adapters of a line and its patch-memory banks are versioned, paused and audited independently."""
    keys = RedisKeys(f"kinds{uuid.uuid4().hex[:8]}")
    adapters = VersionRegistry(redis_server.client(), keys)
    banks = VersionRegistry(redis_server.client(), keys, kind="banks")
    assert adapters.publish(LINE, b"A", {}, actor="w", reason="a", base_version=None).version == "v1"
    assert banks.publish(LINE, b"B1", {"n": 1}, actor="w", reason="b", base_version=None).version == "v1"
    assert banks.publish(LINE, b"B2", {}, actor="w", reason="b", base_version="v1").version == "v2"
    assert (adapters.current(LINE), banks.current(LINE)) == ("v1", "v2")
    assert (adapters.versions(LINE), banks.versions(LINE)) == (["v1"], ["v1", "v2"])
    assert (adapters.tensors(LINE, "v1"), banks.tensors(LINE, "v1")) == (b"A", b"B1")
    assert banks.meta(LINE, "v1")["n"] == 1 and "n" not in adapters.meta(LINE, "v1")
    with pytest.raises(KeyError, match="no adapter version 'v2'"):
        adapters.tensors(LINE, "v2")
    with pytest.raises(KeyError, match="no bank version 'v3'"):
        banks.meta(LINE, "v3")
    assert banks.rollback(LINE, actor="op") == "v1" and adapters.current(LINE) == "v1"
    assert [e["action"] for e in adapters.audit(LINE)] == ["promote"]
    assert [e["action"] for e in banks.audit(LINE)] == ["rollback", "promote", "promote"]
    banks.pause(LINE, actor="op")
    assert banks.is_paused(LINE) and not adapters.is_paused(LINE)
    assert banks.publish(LINE, b"B3", {}, actor="w", reason="b", base_version="v1").reason == (
        "line paused during training")
    assert adapters.publish(LINE, b"A2", {}, actor="w", reason="a", base_version="v1").promoted, "adapters not paused"
    adapters.pause(LINE, actor="op")
    banks.resume(LINE, actor="op")
    assert adapters.is_paused(LINE) and not banks.is_paused(LINE)
    assert banks.publish(LINE, b"B3", {}, actor="w", reason="b", base_version="v1").promoted, "banks not paused"
    lock_a = RefreshLock(redis_server.client(), keys, LINE, "trainer", ttl_s=5)
    lock_b = RefreshLock(redis_server.client(), keys, LINE, "bank-builder", ttl_s=5, kind="banks")
    assert lock_a.acquire() and lock_b.acquire(), "one trainer per line and kind"
    assert (lock_a.holder(), lock_b.holder()) == ("trainer", "bank-builder")
    assert RefreshLock(redis_server.client(), keys, LINE, "x", ttl_s=2).ttl_ms == 2000
    rid = banks.request_refresh(LINE, actor="op")
    assert adapters.refresh_requests(LINE) == [] and adapters.last_request_id(LINE) == "0-0"
    assert [f["request_id"] for _, f in banks.refresh_requests(LINE)] == [rid]
    assert banks.last_request_id(LINE) == banks.refresh_requests(LINE)[0][0]
    stored = {k.decode() for k in redis_server.client().scan_iter(f"{keys.prefix}:*")}
    assert stored and all(k.startswith((f"{keys.prefix}:adapters:{LINE}:", f"{keys.prefix}:banks:{LINE}:"))
                          for k in stored), stored


def test_each_line_numbers_its_own_versions(reg: VersionRegistry) -> None:
    assert _publish(reg, None) == "v1"
    assert reg.publish("other", b"T", {}, actor="w", reason="r", base_version=None).version == "v1"
    assert _publish(reg, "v1") == "v2" and reg.versions("other") == ["v1"]


def test_a_current_pointer_to_an_unknown_version_rolls_back_to_the_newest(reg: VersionRegistry) -> None:
    """A pointer naming no stored version (e.g. one removed by hand) steps back to the newest stored one."""
    for base in (None, "v1"):
        _publish(reg, base)
    reg.client.set(reg.keys.registry_current(LINE), "v9")
    assert reg.rollback(LINE, actor="op") == "v2" and reg.current(LINE) == "v2"


def test_the_request_and_audit_streams_are_capped(reg: VersionRegistry, monkeypatch: pytest.MonkeyPatch) -> None:
    """Added after mutation testing: months of requests and rollbacks stay bounded in Redis (trimmed
    approximately, i.e. by whole stream nodes of 100 entries)."""
    pipe = reg.client.pipeline(transaction=False)
    for _ in range(1300):
        pipe.xadd(reg.keys.registry_refresh_requests(LINE), {"request_id": "x"})
    pipe.execute()
    reg.request_refresh(LINE, actor="op")
    assert 1000 <= reg.client.xlen(reg.keys.registry_refresh_requests(LINE)) < 1200
    monkeypatch.setattr("pipeline.adaptation.registry.AUDIT_MAXLEN", 5)
    for base in (None, "v1"):
        _publish(reg, base)
    for i in range(300):
        reg.rollback(LINE, "v1" if i % 2 else "v2", actor="op")
    assert reg.client.xlen(reg.keys.registry_audit(LINE)) < 250


def test_waiting_for_an_outcome_polls_every_fifth_of_a_second(reg: VersionRegistry) -> None:
    rid = reg.request_refresh(LINE, actor="op")
    timer = threading.Timer(0.3, lambda: reg.record(LINE, "refuse", actor="w", reason="no", request_id=rid))
    timer.start()
    t0 = time.monotonic()
    answer = reg.wait_outcome(LINE, rid, timeout_s=5)
    waited = time.monotonic() - t0
    timer.join()
    assert answer is not None and answer["reason"] == "no"
    assert 0.3 <= waited < 0.9, waited


def test_a_promotion_audits_its_thresholds_and_extra_figures(reg: VersionRegistry) -> None:
    """Added after mutation testing: the promote entry carries the version's own thresholds and the
    caller's `audit` figures (e.g. admission counts), and the result echoes the reason."""
    res = reg.publish(LINE, b"T", {"thresholds": {"pixel": 0.31, "image": 0.6}}, actor="w", reason="gate passed",
                      base_version=None, audit={"admission": {"offered": 40, "admitted": 31}})
    assert (res.promoted, res.version, res.reason) == (True, "v1", "gate passed")
    entry = reg.audit(LINE)[0]
    assert json.loads(entry["thresholds"]) == {"pixel": 0.31, "image": 0.6}
    assert json.loads(entry["admission"]) == {"offered": 40, "admitted": 31}
    assert _publish(reg, "v1") == "v2" and "thresholds" not in reg.audit(LINE)[0], "none carried: none recorded"


def test_every_audit_writer_is_capped(reg: VersionRegistry, monkeypatch: pytest.MonkeyPatch) -> None:
    """Promotions and plain records trim the audit stream as rollbacks do (approximately: whole nodes)."""
    monkeypatch.setattr("pipeline.adaptation.registry.AUDIT_MAXLEN", 5)
    base = None
    for _ in range(300):
        base = _publish(reg, base)
    assert reg.client.xlen(reg.keys.registry_audit(LINE)) < 250
    reg.client.delete(reg.keys.registry_audit(LINE))
    for i in range(300):
        reg.record(LINE, "note", actor="x", reason=str(i))
    assert reg.client.xlen(reg.keys.registry_audit(LINE)) < 250


def test_a_registry_kind_is_one_of_two_and_records_go_to_its_own_audit(redis_server: RedisServer) -> None:
    """Added after the second mutation run: a misspelt kind is refused by name, and a `banks` registry's plain
    records (refusals, failed builds) land in the banks' audit, never in the adapters'."""
    keys = RedisKeys(f"kinds{uuid.uuid4().hex[:8]}")
    with pytest.raises(ValueError, match=r"^registry kind must be one of \('adapters', 'banks'\), got 'bank'$"):
        VersionRegistry(redis_server.client(), keys, kind="bank")
    adapters = VersionRegistry(redis_server.client(), keys)
    banks = VersionRegistry(redis_server.client(), keys, kind="banks")
    banks.record(LINE, "refuse", actor="builder", reason="AUROC dropped")
    assert [(e["action"], e["reason"]) for e in banks.audit(LINE)] == [("refuse", "AUROC dropped")]
    assert adapters.audit(LINE) == []


def test_the_audit_shows_the_newest_fifty_unless_asked(reg: VersionRegistry) -> None:
    for i in range(60):
        reg.record(LINE, "note", actor="x", reason=str(i))
    assert [e["reason"] for e in reg.audit(LINE)] == [str(i) for i in range(59, 9, -1)]
    assert len(reg.audit(LINE, count=60)) == 60


def test_a_decoding_client_reads_what_a_bytes_client_wrote(redis_server: RedisServer) -> None:
    """Read-only tools may hold a client with `decode_responses=True`: the registry's reads answer the same."""
    keys = RedisKeys(f"dec{uuid.uuid4().hex[:8]}")
    writer = VersionRegistry(redis_server.client(), keys)
    writer.publish(LINE, b"T", {"n": 1}, actor="w", reason="good", base_version=None)
    writer.request_refresh(LINE, actor="op")
    lock = RefreshLock(redis_server.client(), keys, LINE, "trainer", ttl_s=5)
    assert lock.acquire()
    decoding = redis.Redis.from_url(redis_server.url, socket_timeout=5, decode_responses=True)
    reader = VersionRegistry(decoding, keys)
    assert (reader.current(LINE), reader.versions(LINE), reader.meta(LINE, "v1")) == (
        writer.current(LINE), writer.versions(LINE), writer.meta(LINE, "v1"))
    assert reader.audit(LINE) == writer.audit(LINE) and reader.last_request_id(LINE) == writer.last_request_id(LINE)
    assert reader.refresh_requests(LINE) == writer.refresh_requests(LINE)
    assert RefreshLock(decoding, keys, LINE, "other", ttl_s=5).holder() == "trainer"
