"""Publishing results to Redis, idempotently: a replayed frame changes nothing.

Each frame is written by one Lua script, so its writes are atomic. The script first looks up the frame's
done marker: if it is there with the same content digest (a replay after a crash or rebalance, or a
producer's resend), it returns at once and writes nothing; if it is there with another digest, the frame
id was reused for a different image, and the script writes nothing and says so (the worker dead-letters
that frame). Otherwise it sets the marker, appends to the line's results stream (and the alerts stream),
stores the per-frame result, mask and heatmap as the image policy says (and, for alerts, the original
image) with a TTL, moves the line's `latest` keys unless a newer frame is already there, and publishes a
live notification. A batch is one pipelined round trip. Every key comes from `RedisKeys`.

Memory (docs/operations.md): only the per-frame blobs carry a TTL, so a Redis run with `maxmemory-policy
volatile-lru` can evict them and nothing else. Done markers carry none: they are indexed by time in a
sorted set and the script itself deletes those older than `redis.done_ttl_s`, a few per publish.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from pipeline.errors import ConfigError
from pipeline.observability.redaction import redact_url
from pipeline.redis_keys import RedisKeys
from pipeline.services.redis_client import RETRYABLE, make_redis, redis_problem
from pipeline.settings import RedisSettings
from pipeline.streaming.records import FrameResult

DUPLICATE, WRITTEN, CONFLICT = 0, 1, 2
"""Per-frame outcomes of `ResultPublisher.publish` (DUPLICATE == False and WRITTEN == True, as before)."""
WRITE_REFUSALS = (redis.exceptions.OutOfMemoryError, redis.exceptions.NoPermissionError)
"""Errors of a Redis that answers PING but refuses our writes."""
DONE_EXPIRE_PER_CALL = 16
"""Expired done markers one publish deletes at most: bounded work, and a backlog still drains (each publish
adds one)."""

_PUBLISH_LUA = """
-- KEYS: 1 done marker, 2 done index, 3 results stream, 4 alerts stream, 5 frame result, 6 frame mask,
--       7 frame heatmap, 8 frame image, 9 latest result, 10 latest mask, 11 latest heatmap, 12 latest image,
--       13 latest ts
-- ARGV: 1 content digest, 2 now ms, 3 expire markers up to (ms), 4 frame ttl s, 5 results maxlen, 6 alerts maxlen,
--       7 min stream id ('' = none), 8 is alert (1/0), 9 capture ts, 10 result json, 11 mask png,
--       12 heatmap png, 13 store mask (1/0), 14 store heatmap (1/0), 15 image bytes, 16 live channel,
--       17 live json, 18 frame id, 19 done-marker key prefix, 20 expire at most, 21 n result fields,
--       22 n alert fields, then result fields, then alert fields
local cur = redis.call('GET', KEYS[1])
if cur then
  -- same content, or a marker written before digests (worker@ns): a replay
  if cur == ARGV[1] or string.find(cur, '@', 1, true) then return 0 end
  return 2
end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[18])
local old = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[3], 'LIMIT', 0, ARGV[20])
if #old > 0 then
  for i = 1, #old do redis.call('DEL', ARGV[19] .. old[i]) end
  redis.call('ZREM', KEYS[2], unpack(old))
end
local nres = tonumber(ARGV[21])
local nalert = tonumber(ARGV[22])
local base = 22
local res = {}
for i = 1, nres do res[i] = ARGV[base + i] end
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[5], '*', unpack(res))
if ARGV[7] ~= '' then redis.call('XTRIM', KEYS[3], 'MINID', '~', ARGV[7]) end
local ttl = ARGV[4]
redis.call('SET', KEYS[5], ARGV[10], 'EX', ttl)
if ARGV[13] == '1' then redis.call('SET', KEYS[6], ARGV[11], 'EX', ttl) end
if ARGV[14] == '1' then redis.call('SET', KEYS[7], ARGV[12], 'EX', ttl) end
if ARGV[8] == '1' then
  local al = {}
  for i = 1, nalert do al[i] = ARGV[base + nres + i] end
  redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[6], '*', unpack(al))
  if ARGV[7] ~= '' then redis.call('XTRIM', KEYS[4], 'MINID', '~', ARGV[7]) end
  if string.len(ARGV[15]) > 0 then redis.call('SET', KEYS[8], ARGV[15], 'EX', ttl) end
end
local cur_ts = redis.call('GET', KEYS[13])
if (not cur_ts) or tonumber(cur_ts) <= tonumber(ARGV[9]) then
  redis.call('SET', KEYS[13], ARGV[9])
  redis.call('SET', KEYS[9], ARGV[10])
  redis.call('SET', KEYS[10], ARGV[11])
  redis.call('SET', KEYS[11], ARGV[12])
  if string.len(ARGV[15]) > 0 then redis.call('SET', KEYS[12], ARGV[15]) end
end
redis.call('PUBLISH', ARGV[16], ARGV[17])
return 1
"""


@dataclass
class FrameOutput:
    """Everything published for one scored frame: its typed result and the images beside it."""

    result: FrameResult
    mask_png: bytes
    heatmap_png: bytes
    image: bytes = b""
    """Original encoded frame; stored for alerts and as the line's latest image."""
    digest: str = ""
    """Content digest kept with the done marker (default: of `image`); a reused frame id with another digest
    is a conflict, not a replay."""

    def content_digest(self) -> str:
        return self.digest or content_digest(self.image)


def content_digest(data: bytes) -> str:
    """What tells a replay (same bytes) from a reused frame id (other bytes): 128-bit BLAKE2b, hex."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _field_value(v: Any) -> str | bytes:
    if isinstance(v, bytes | str):
        return v
    if v is None:
        return ""
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, int | float):
        return repr(v) if isinstance(v, float) else str(v)
    return json.dumps(v, separators=(",", ":"))


def _flatten(fields: Mapping[str, Any]) -> list[str | bytes]:
    out: list[str | bytes] = []
    for k, v in fields.items():
        out += [k, _field_value(v)]
    return out


class ResultPublisher:
    """Writes frame outputs, thresholds and heartbeats; raises a RETRYABLE error when Redis is away."""

    def __init__(self, client: redis.Redis, settings: RedisSettings, worker_id: str = "") -> None:
        self.client = client
        self.settings = settings
        self.keys = RedisKeys(settings.prefix)
        self.worker_id = worker_id
        self._script = client.register_script(_PUBLISH_LUA)
        self.last_error: BaseException | None = None

    @classmethod
    def from_settings(cls, settings: RedisSettings, worker_id: str = "") -> ResultPublisher:
        return cls(make_redis(settings), settings, worker_id)

    def ping(self) -> bool:
        """Whether Redis works for us. After a refused write (out of memory, an ACL) a PING proves nothing, so
        then it takes a small write (this worker's heartbeat) too. The last failure of any call is kept in
        `last_error`, to name it in logs and `/readyz`."""
        try:
            if isinstance(self.last_error, WRITE_REFUSALS):
                self._probe_write()
            ok = bool(self.client.ping())
        except RETRYABLE as e:
            self.last_error = e
            return False
        self.last_error = None
        return ok

    def _probe_write(self) -> None:
        key = self.keys.worker(self.worker_id)
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(key, "last_seen", str(int(time.time())))
        pipe.expire(key, self.settings.heartbeat_ttl_s)
        pipe.execute()

    def check_access(self) -> None:
        """At start-up: refuse to run with credentials or an ACL Redis rejects (ConfigError naming the keys).

        An unreachable Redis is not refused (the worker waits for it); a wrong password would never heal.
        """
        try:
            self.client.ping()
        except RETRYABLE as e:
            problem = redis_problem(e)
            if problem and not isinstance(e, redis.exceptions.OutOfMemoryError):
                raise ConfigError(f"Redis at {redact_url(self.settings.url)}: {problem}") from e

    # --- frames -----------------------------------------------------------------------------
    def publish(self, outputs: Sequence[FrameOutput]) -> list[int]:
        """Write a batch in one round trip; per frame WRITTEN, DUPLICATE (a replay: nothing written) or
        CONFLICT (the id was published before with other content: nothing written).

        Raises a RETRYABLE error if Redis cannot be reached; some frames may then be written and the
        rest not, which is safe to retry as is.
        """
        if not outputs:
            return []
        s, k = self.settings, self.keys
        published_ns = time.time_ns()
        now_ms = published_ns // 1_000_000
        min_id = f"{now_ms - s.stream_max_age_s * 1000}-0" if s.stream_max_age_s else ""
        pipe = self.client.pipeline(transaction=False)
        for out in outputs:
            r = dataclasses.replace(out.result, published_ts_ns=published_ns,
                                    worker=out.result.worker or self.worker_id)
            fid, line = r.frame_id, r.line
            store_mask = s.store_masks == "all" or r.anomalous
            store_heat = s.store_heatmaps == "all" or (s.store_heatmaps == "alerts" and r.anomalous)
            res = r.results_entry(result_key=k.frame(fid, "result"),
                                  mask_key=k.frame(fid, "mask") if store_mask else "")
            alert = r.alert_entry(mask_key=k.frame(fid, "mask"),
                                  heatmap_key=k.frame(fid, "heatmap") if store_heat else "",
                                  image_key=k.frame(fid, "image") if out.image else "")
            result_json = json.dumps(r.to_json_dict(), separators=(",", ":"))
            live = json.dumps(r.live_event(), separators=(",", ":"))
            res_f, alert_f = _flatten(res), (_flatten(alert) if r.anomalous else [])
            keys = [
                k.done_marker(fid), k.done_index, k.results_stream(line), k.alerts_stream,
                k.frame(fid, "result"), k.frame(fid, "mask"), k.frame(fid, "heatmap"),
                k.frame(fid, "image"), k.latest(line, "result"), k.latest(line, "mask"),
                k.latest(line, "heatmap"), k.latest(line, "image"), k.latest(line, "capture_ts"),
            ]
            args = [
                out.content_digest(), now_ms, now_ms - s.done_ttl_s * 1000, s.frame_ttl_s, s.results_maxlen,
                s.alerts_maxlen, min_id, "1" if r.anomalous else "0", r.capture_ts_ns, result_json, out.mask_png,
                out.heatmap_png, "1" if store_mask else "0", "1" if store_heat else "0", out.image, k.live_channel,
                live, fid, k.done_marker(""), DONE_EXPIRE_PER_CALL, len(res_f), len(alert_f), *res_f, *alert_f,
            ]
            self._script(keys=keys, args=args, client=pipe)
        with self._recording():
            replies = pipe.execute(raise_on_error=True)
        return [int(x) for x in replies]

    @contextlib.contextmanager
    def _recording(self) -> Iterator[None]:
        """Keep the outcome of a write in `last_error` (None once a write works)."""
        try:
            yield
        except RETRYABLE as e:
            self.last_error = e
            raise
        self.last_error = None

    def is_done(self, frame_id: str) -> bool:
        return bool(self.client.exists(self.keys.done_marker(frame_id)))

    def done_digest(self, frame_id: str) -> str | None:
        """The content digest a frame id was published with (None if it was not, or before digests)."""
        v = self.client.get(self.keys.done_marker(frame_id))
        return None if v is None or b"@" in v else v.decode()

    # --- thresholds -------------------------------------------------------------------------
    def read_threshold(self, line: str) -> dict[str, str]:
        raw = self.client.hgetall(self.keys.threshold(line))
        return {k.decode(): v.decode() for k, v in raw.items()}

    def write_threshold(self, line: str, state: Mapping[str, Any]) -> None:
        """Publish the worker's view; never touches the operator's `manual_*` fields."""
        fields = {k: _field_value(v) for k, v in state.items() if not k.startswith("manual_")}
        fields["updated"] = str(time.time_ns())
        fields["worker"] = self.worker_id
        with self._recording():
            self.client.hset(self.keys.threshold(line), mapping=fields)

    # --- heartbeat --------------------------------------------------------------------------
    def heartbeat(self, fields: Mapping[str, Any]) -> None:
        key = self.keys.worker(self.worker_id)
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(key, mapping={k: _field_value(v) for k, v in fields.items()})
        pipe.expire(key, self.settings.heartbeat_ttl_s)
        with self._recording():
            pipe.execute()

    def forget_worker(self) -> None:
        self.client.delete(self.keys.worker(self.worker_id))
