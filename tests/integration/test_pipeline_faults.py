"""Failures mid-stream: a worker killed with SIGKILL, Redis stopped and restarted, SIGTERM drain.

The invariants checked: every frame id ends up with exactly one result; no offset is committed before
its frame (and every frame before it) is in Redis; a replay after a crash is skipped, not re-published.
"""

from __future__ import annotations

import re
import threading
import time
from collections import Counter

import pytest

from pipeline.streaming.envelope import build_headers
from pipeline.streaming.kafka_io import make_consumer, make_producer
from pipeline.streaming.producer import FrameProducer
from tests.integration.conftest import Pipeline, synthetic_frame, wait_for

pytestmark = pytest.mark.integration


class BackgroundProducer:
    """Sends `n` frames at `fps` from a thread, alternating lines, so the worker sees a live stream."""

    def __init__(self, pipeline: Pipeline, n: int, fps: float, lines: tuple[str, ...] = ("bottle", "wood")) -> None:
        self.producer = FrameProducer(pipeline.settings)
        self.n, self.fps, self.lines = n, fps, lines
        self.frames = [synthetic_frame(lines[i % len(lines)], i) for i in range(n)]
        self.ids: list[str] = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        t0 = time.monotonic()
        for i, frame in enumerate(self.frames):
            delay = t0 + i / self.fps - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            self.ids.append(self.producer.send(self.lines[i % len(self.lines)], frame))
        self.producer.close()

    def start(self) -> BackgroundProducer:
        self.thread.start()
        return self

    def join(self, timeout: float = 120) -> None:
        self.thread.join(timeout=timeout)
        assert not self.thread.is_alive(), "producer thread hung"
        assert self.producer.stats.acked == self.n, f"broker acknowledged {self.producer.stats.acked}/{self.n}"


def _published_offsets(p: Pipeline) -> dict[int, set[int]]:
    out: dict[int, set[int]] = {}
    for x in p.results():
        out.setdefault(int(x["partition"]), set()).add(int(x["offset"]))
    return out


def _assert_committed_only_published(p: Pipeline, committed: dict[int, int]) -> None:
    """Every offset below the committed one has its result in Redis (frames are all good here)."""
    published = _published_offsets(p)
    for part, off in committed.items():
        missing = set(range(off)) - published.get(part, set())
        assert not missing, f"partition {part}: offsets {sorted(missing)[:10]} committed but not in Redis"


def _assert_exactly_once(p: Pipeline, ids: list[str]) -> None:
    counts = Counter(x["frame_id"] for x in p.results())
    dupes = {f: c for f, c in counts.items() if c > 1}
    assert not dupes, f"frames published more than once: {dupes}"
    assert set(counts) == set(ids), f"missing results: {sorted(set(ids) - set(counts))[:10]}"


def test_kill9_then_new_worker_every_frame_exactly_once(pipeline: Pipeline) -> None:
    # Commits are spaced out, so at any moment some published frames are not yet committed: the crash
    # below leaves a replay window, and the second worker must skip exactly those frames.
    # Every wait is bounded so that their sum (45+45+10+45+30+45+15+30 = 265 s) stays under the suite's
    # 300 s per-test timeout: a slow host fails with the step that was slow, not with a timeout kill.
    a = pipeline.start_worker("a", commit_interval_ms=3000)
    a.wait_ready(45)
    prod = BackgroundProducer(pipeline, n=60, fps=20).start()

    def window_open() -> bool:
        return len(pipeline.results()) >= 12 and len(pipeline.results()) > sum(pipeline.committed().values())

    wait_for(window_open, 45, "some published but not yet committed frames")
    a.kill9()
    committed_at_kill = pipeline.committed()
    published_at_kill = len(pipeline.results())
    _assert_committed_only_published(pipeline, committed_at_kill)
    replay_window = published_at_kill - sum(committed_at_kill.values())
    assert replay_window > 0

    b = pipeline.start_worker("b")
    b.wait_ready(45)
    prod.join(30)  # 60 frames at 20 fps: sent within 3 s of the start, long before B is ready
    wait_for(lambda: len(pipeline.results()) >= 60, 45, "60 results after the crash")
    _assert_exactly_once(pipeline, prod.ids)
    assert b.metric("anoclip_duplicates_skipped_total") == replay_window, "B skipped exactly A's uncommitted work"
    wait_for(lambda: sum(pipeline.committed().values()) == 60, 15, "all 60 offsets committed")
    b.terminate()
    assert b.wait_exit(30) == 0


def test_redis_outage_pauses_without_loss_or_commit(pipeline_own_redis: Pipeline) -> None:
    p = pipeline_own_redis
    w = p.start_worker("w")
    w.wait_ready()
    prod = BackgroundProducer(p, n=60, fps=8).start()
    wait_for(lambda: len(p.results()) >= 10, 60, "10 results before the outage")

    p.redis_server.stop()
    stopped_at = time.monotonic()
    wait_for(lambda: w.health("/readyz")[1].get("redis") is False, 15, "readiness to report Redis down")
    wait_for(lambda: w.metric("anoclip_consumer_paused") == 1, 10, "partitions paused")
    committed_during = [p.committed()]
    while time.monotonic() - stopped_at < 6:
        assert w.alive(), f"worker died during the Redis outage:\n{w.log()[-2000:]}"
        assert w.health("/healthz")[0] == 200, "worker not live during the outage"
        assert w.health("/readyz")[0] == 503
        committed_during.append(p.committed())
        time.sleep(0.5)
    assert all(c == committed_during[0] for c in committed_during), f"offsets moved while Redis was down: " \
        f"{committed_during[0]} -> {committed_during[-1]}"
    assert w.metric("anoclip_redis_errors_total") >= 1

    p.redis_server.start()  # same port and folder: the AOF brings back what was written before
    _assert_committed_only_published(p, committed_during[-1])
    prod.join()
    wait_for(lambda: len(p.results()) >= 60, 60, "60 results after Redis came back")
    _assert_exactly_once(p, prod.ids)
    wait_for(lambda: sum(p.committed().values()) == 60, 15, "all 60 offsets committed after the outage")
    wait_for(lambda: w.health("/readyz")[0] == 200, 15, "worker ready again")
    assert w.alive()
    assert "Redis is back" in w.log()
    w.terminate()
    assert w.wait_exit(30) == 0


def test_sigterm_drains_publishes_commits_and_leaves(pipeline: Pipeline) -> None:
    a = pipeline.start_worker("a", max_batch=8, max_wait_ms=200)
    a.wait_ready()
    prod = BackgroundProducer(pipeline, n=40, fps=25).start()
    wait_for(lambda: len(pipeline.results()) >= 8, 60, "8 results")
    a.terminate()
    assert a.wait_exit(30) == 0
    log = a.log()
    assert "drained: everything in hand is published and committed" in log
    assert "left group" in log

    # What A published is exactly what A committed: nothing in hand was lost or left uncommitted.
    committed = pipeline.committed()
    published = _published_offsets(pipeline)
    for part in committed:
        assert published.get(part, set()) == set(range(committed[part])), f"partition {part}"
    assert sum(committed.values()) > 0

    b = pipeline.start_worker("b")
    b.wait_ready()
    prod.join()
    wait_for(lambda: len(pipeline.results()) >= 40, 60, "40 results")
    _assert_exactly_once(pipeline, prod.ids)
    assert b.metric("anoclip_duplicates_skipped_total") == 0, "a clean drain leaves nothing to replay"


def test_second_worker_joins_mid_stream_nothing_lost(pipeline: Pipeline) -> None:
    """Scale out under load: A gives up partitions in a rebalance without blocking; B takes over.

    A commits only every 2 s, so when B joins A always holds finished-but-uncommitted frames: the
    rebalance listener must commit them without blocking kafka-python's network thread.
    """
    a = pipeline.start_worker("a", commit_interval_ms=2000)
    a.wait_ready()
    prod = BackgroundProducer(pipeline, n=60, fps=15, lines=("bottle", "wood", "pcb1")).start()
    wait_for(lambda: len(pipeline.results()) >= 10, 60, "10 results from A alone")
    b = pipeline.start_worker("b")
    b.wait_ready()  # ready means B was assigned partitions: the group rebalanced under load
    prod.join()
    wait_for(lambda: len(pipeline.results()) >= 60, 60, "60 results with two workers")
    _assert_exactly_once(pipeline, prod.ids)
    scored = a.metric("anoclip_frames_scored_total") + b.metric("anoclip_frames_scored_total")
    assert scored == 60, "each frame written once across both workers"
    wait_for(lambda: sum(pipeline.committed().values()) == 60, 15, "all 60 offsets committed")
    assert a.alive() and b.alive()
    assert "rebalance: revoked partitions" in a.log()
    # A logs its new assignment only when it rejoins: under load that can come after B has scored the
    # rest (B was assigned everything while A was still rejoining), so wait for it rather than race it.
    wait_for(lambda: a.log().count("assigned partitions:") >= 2, 60, "A assigned again after the rebalance")
    assert "Traceback" not in a.log() and "Traceback" not in b.log()
    wait_for(
        lambda: a.health("/readyz")[1]["partitions_assigned"] and b.health("/readyz")[1]["partitions_assigned"],
        60,
        "both workers hold partitions",
    )


def test_partition_handed_back_with_frames_in_flight_is_read_again(pipeline: Pipeline) -> None:
    """An eager rebalance that hands a partition straight back to the member that had frames in flight.

    A buffers frames on all four partitions (a long max_wait_ms keeps them unscored); a plain consumer
    joins the group, so A revokes all four, dropping the buffers, and gets two of them back. kafka-python
    keeps the fetch position of a partition handed back, so unless A rewinds it those frames are never
    read again (and a later commit would skip them). Then the other member leaves and A takes all four.
    """
    a = pipeline.start_worker("a", max_batch=64, max_wait_ms=10000, commit_interval_ms=200)
    a.wait_ready()
    ks = pipeline.settings.kafka
    producer = make_producer(ks)
    ids = []
    for i in range(8):
        line = ("bottle", "wood", "pcb1")[i % 3]
        frame = synthetic_frame(line, i)
        fid = f"handback-{i}"
        headers = build_headers(fid, line, "cam-1", time.time_ns(), frame.content_type, extra=frame.extra_headers)
        producer.send(ks.frames_topic, key=line.encode(), value=frame.data, headers=headers, partition=i % 4)
        ids.append(fid)
    producer.flush(30)
    producer.close()
    wait_for(lambda: a.metric("anoclip_frames_in_flight") == 8, 30, "8 frames in flight at A")

    other = make_consumer(ks, ks.frames_topic, max_poll_records=1)
    try:
        deadline = time.monotonic() + 60
        while not other.assignment() and time.monotonic() < deadline:
            other.poll(timeout_ms=100)  # joins the group; reads but never commits
        assert other.assignment(), "the second member got no partitions"
        wait_for(lambda: a.log().count("assigned partitions:") >= 2, 30, "A to go through the rebalance")
    finally:
        other.close(autocommit=False)
    revoked = re.search(r"rebalance: revoked partitions \S+; committing .*?; (\d+) frames in flight", a.log())
    assert revoked and int(revoked.group(1)) > 0, f"A had no frames in flight at the rebalance:\n{a.log()[-2000:]}"
    assert "got back partitions with frames in flight; re-reading" in a.log()

    wait_for(lambda: len(pipeline.results()) >= 8, 60, "8 results after the partitions came back")
    _assert_exactly_once(pipeline, ids)
    wait_for(lambda: sum(pipeline.committed().values()) == 8, 30, "all 8 offsets committed")
    assert a.metric("anoclip_frames_scored_total") == 8
    assert "Traceback" not in a.log()
