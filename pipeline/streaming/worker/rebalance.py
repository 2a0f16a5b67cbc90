"""Consumer-group rebalances: giving partitions up and taking them (kafka-python's network thread)."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any

from kafka import ConsumerRebalanceListener, TopicPartition
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata

from pipeline.observability.telemetry import Health, WorkerTelemetry
from pipeline.streaming.offsets import OffsetBook
from pipeline.streaming.worker.batching import LineBatcher

log = logging.getLogger("anoclip.worker")


@dataclass
class Rebalancer(ConsumerRebalanceListener):
    """Keeps the worker's offsets, buffers and assignment right across rebalances; never blocks."""

    offsets: OffsetBook
    batcher: LineBatcher
    telemetry: WorkerTelemetry
    health: Health
    consumer: Any = None
    assigned: list[TopicPartition] = field(default_factory=list)
    _rewind: dict[TopicPartition, int] = field(default_factory=dict)
    """Revoked partitions -> where their unfinished work starts, in case the rebalance hands them back."""

    # kafka-python's listener interface
    def on_partitions_revoked(self, revoked: Any) -> None:
        self.revoke(list(revoked))

    def on_partitions_lost(self, lost: Any) -> None:
        self.revoke(list(lost), lost=True)

    def on_partitions_assigned(self, assigned: Any) -> None:
        self.assign(list(assigned))

    def revoke(self, revoked: list[TopicPartition], *, lost: bool = False) -> None:
        """Give up partitions in a rebalance.

        kafka-python runs this on its network thread while the poll thread waits inside `poll()`, so it
        must not block: no synchronous commit, no waiting for work in flight (heartbeats would stop).
        What is finished is committed asynchronously; frames still in flight are simply forgotten: the
        partition's next owner replays them and its writes are skipped by frame id, so nothing is lost
        or published twice. Frames not yet scored are dropped here to save the work. The next owner may
        be this member again: `assign` then rewinds the partition to where its unfinished work starts.
        """
        if lost:  # another member may own these by now: no rewind on our own say-so, read what is committed
            for tp in revoked:
                self._rewind.pop(tp, None)
        revoked = [tp for tp in revoked if tp in self.offsets.partitions]
        if not revoked:
            return
        offsets: dict[TopicPartition, OffsetAndMetadata] = {}
        if not lost:  # a member that was evicted can no longer commit
            for tp in revoked:
                restart = self.offsets.partitions[tp].committable()
                if restart is not None:
                    self._rewind[tp] = restart
            offsets = {tp: OffsetAndMetadata(off, "", -1) for tp, off in self.offsets.to_commit(revoked).items()}
            if offsets:
                try:
                    self.consumer.commit_async(offsets)
                except KafkaError as e:
                    log.warning("rebalance: commit of finished frames failed (%s); they will be replayed", e)
        gone = set(revoked)
        self.batcher.drop_partitions(gone)
        in_flight = self.offsets.in_flight(revoked)
        self.offsets.forget(revoked)
        for tp in revoked:
            with contextlib.suppress(KeyError):
                self.telemetry.consumer_lag.remove(tp.topic, str(tp.partition))
        self.assigned = [tp for tp in self.assigned if tp not in gone]
        self._publish_assignment()
        log.info("rebalance: %s partitions %s; committing %s; %d frames in flight go to the next owner "
                 "(deduplicated)", "lost" if lost else "revoked", ",".join(str(tp.partition) for tp in revoked),
                 {tp.partition: o.offset for tp, o in offsets.items()} or "nothing", in_flight)

    def assign(self, assigned: list[TopicPartition]) -> None:
        """Take partitions in a rebalance (kafka-python's network thread, like `revoke`).

        A partition that `revoke` just gave up may come straight back to this member. kafka-python
        (3.x) then keeps its fetch position: it does not re-read the committed offset. But `revoke`
        already forgot the partition's frames in flight and dropped its unscored ones, so consuming on
        from that position would never re-read them: results missing for good, and the fresh
        offsets would later commit past them. Such a partition is rewound to its lowest unfinished
        offset instead (what `revoke` committed); the frames in flight are read again and their
        writes, where the old epoch got as far as Redis, are skipped by frame id.
        """
        rewind, self._rewind = self._rewind, {}
        rewound = {}
        for tp in assigned:
            self.offsets.track(tp)
            off = rewind.get(tp)
            if off is not None:
                try:
                    self.consumer.seek(tp, off)
                    rewound[tp.partition] = off
                except (ValueError, KafkaError) as e:  # not assigned after all: the next owner reads it
                    log.warning("rebalance: cannot rewind partition %s to offset %d: %s", tp, off, e)
        self.assigned = sorted(set(self.assigned) | set(assigned), key=lambda t: (t.topic, t.partition))
        self._publish_assignment()
        log.info("assigned partitions: %s", ",".join(str(tp.partition) for tp in self.assigned) or "none")
        if rewound:
            log.info("rebalance: got back partitions with frames in flight; re-reading from %s", rewound)

    def _publish_assignment(self) -> None:
        self.telemetry.partitions_assigned.set(len(self.assigned))
        self.health.partitions_assigned = bool(self.assigned)
