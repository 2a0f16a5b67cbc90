"""One lifecycle for what a line learns, whatever its kind (TTA adapters: `tta/`, patch-memory banks: `memory/`).

The kinds differ in how a candidate is made (training vs building), gated and loaded; everything around that is
here, once:

* **Following** (`VersionFollower`): each line's `current` pointer in the kind's registry. A version that moved
  is loaded once by the kind's `load` and handed to its `install` (which registers the version's thresholds
  before the state is swapped in). A version that cannot be loaded here (a blob of another model, a corrupt or
  hostile blob: any error) is marked bad once, logged and skipped: never re-read per poll, never a crash.
* **Refreshing** (`settle`): a candidate the kind made and gated (`Candidate`) is published through the
  registry, which promotes it atomically unless the line was paused or its pointer moved since the candidate
  started from `base_version`; a candidate the gate refused is recorded with its figures. Every refresh
  request a refresh answers gets exactly one audit entry. The caller holds the line's `RefreshLock` (one
  refresher per line and kind) and renews it while the candidate is made (`RefreshLock.renew_if_due`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis

from pipeline.adaptation.registry import VersionRegistry

log = logging.getLogger(__name__)


@dataclass
class Loaded:
    """A registry version as the kind serves it: its state (adapter, bank) and its own thresholds."""

    state: Any
    thresholds: dict[str, Any] | None


Load = Callable[[str, str], Loaded]
"""(line, version) -> the version loaded; raises when it cannot be served here."""
Install = Callable[[str, "Loaded | None", "str | None"], None]
"""(line, loaded or None, version or None): serve it from the next batch (None: nothing learned, the base)."""


class VersionFollower:
    """Follows each line's `current` version of one registry kind (see the module docstring)."""

    def __init__(self, registry: VersionRegistry, load: Load, install: Install,
                 on_bad: Callable[[str, str], None] | None = None) -> None:
        self.registry = registry
        self.load = load
        self.install = install
        self.on_bad = on_bad
        self._following: dict[str, str | None] = {}
        self._bad: dict[str, set[str]] = {}
        self._lock = threading.Lock()

    def following(self, line: str) -> str | None:
        """The version last handed to `install` for `line` (None: none yet, or the base)."""
        with self._lock:
            return self._following.get(line)

    def note(self, line: str, version: str | None) -> None:
        """A version installed without `sync` (this process's own promotion): not loaded again."""
        with self._lock:
            self._following[line] = version

    def bad_versions(self, line: str) -> set[str]:
        with self._lock:
            return set(self._bad.get(line, set()))

    def sync(self, line: str) -> bool:
        """Follow the line's `current` pointer; True when another version (or none) was installed."""
        version = self.registry.current(line)
        with self._lock:
            if version == self._following.get(line) or version in self._bad.get(line, set()):
                return False
        if version is None:
            self.install(line, None, None)
            self.note(line, None)
            return True
        try:
            loaded = self.load(line, version)
        except redis.RedisError:  # Redis away: nothing is wrong with the version, read it again next time
            raise
        except Exception as e:  # a version that cannot be served must not take the line (or the worker) down
            with self._lock:
                self._bad.setdefault(line, set()).add(version)
            log.error("line %s: %s %s cannot be served here (skipped from now on): %s: %s", line,
                      self.registry.noun, version, type(e).__name__, e)
            if self.on_bad is not None:
                self.on_bad(line, version)
            return False
        self.install(line, loaded, version)
        self.note(line, version)
        return True


@dataclass
class Candidate:
    """What a kind made for one refresh: the artifact and its metadata, or the gate's refusal."""

    blob: bytes | None
    """The artifact's bytes (safetensors, `pipeline.adaptation.artifacts`); None: the gate refused it."""
    meta: dict[str, Any]
    reason: str
    """The promotion's summary for the audit, or the gate's reasons for the refusal."""
    audit: dict[str, Any] = field(default_factory=dict)
    """Fields for the promotion's audit entry (admission counts, bank id, ...)."""
    refusal_audit: dict[str, Any] = field(default_factory=dict)
    """Fields for the refusal's audit entry (the gate's figures, ...)."""


@dataclass(frozen=True)
class Outcome:
    """How a refresh ended: `promote` (with the registry's version) or `refuse` (with the reason)."""

    action: str
    reason: str
    version: str | None = None

    @property
    def promoted(self) -> bool:
        return self.action == "promote"


def settle(registry: VersionRegistry, line: str, candidate: Candidate, *, owner: str, base_version: str | None,
           request_ids: Sequence[str] = (), follower: VersionFollower | None = None) -> Outcome:
    """Publish a gated candidate, or record the gate's refusal; each of `request_ids` gets one audit entry.
    `follower`: the caller installs what it promoted itself (it has it in hand), so its follower must not load the
    new version back from the registry."""
    rids = list(request_ids)
    if candidate.blob is None:
        for rid in rids or [None]:
            registry.record(line, "refuse", actor=owner, reason=candidate.reason, request_id=rid,
                            **candidate.refusal_audit)
        return Outcome("refuse", candidate.reason)
    result = registry.publish(line, candidate.blob, candidate.meta, actor=owner, reason=candidate.reason,
                              base_version=base_version, request_id=rids[0] if rids else None,
                              audit=candidate.audit)
    for rid in rids[1:]:
        registry.record(line, "promote" if result.promoted else "refuse", actor=owner, reason=result.reason,
                        request_id=rid, version=result.version)
    if not result.promoted:
        return Outcome("refuse", result.reason)
    if follower is not None:
        follower.note(line, result.version)
    return Outcome("promote", result.reason, result.version)


class ServiceThread:
    """The one background thread of a kind's worker-side service (`AdapterService`, `MemoryService`): follows the
    registry and refreshes; `stop` ends it."""

    _stop: threading.Event
    _thread: threading.Thread | None

    def _start_thread(self, name: str, loop: Callable[[], None]) -> None:
        self._thread = threading.Thread(target=loop, name=name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
