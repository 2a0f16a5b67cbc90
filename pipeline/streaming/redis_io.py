"""Publishing results to Redis, idempotently: a replayed frame changes nothing.

Each frame is written by one Lua script, so its writes are atomic: the script first sets the frame's
done marker with `SET NX`; if the marker exists (a replay after a crash or rebalance), it returns at
once and writes nothing. Otherwise it appends to the line's results stream (and the alerts stream),
stores the per-frame result, mask, heatmap (and, for alerts, the original image) with a TTL, moves the
line's `latest` keys unless a newer frame is already there, and publishes a live notification.
A batch is one pipelined round trip. Every key comes from `RedisKeys`.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from pipeline.redis_client import RETRYABLE, make_redis
from pipeline.redis_keys import RedisKeys
from pipeline.settings import RedisSettings
from pipeline.streaming.records import FrameResult

_PUBLISH_LUA = """
-- KEYS: 1 done, 2 results stream, 3 alerts stream, 4 frame result, 5 frame mask, 6 frame heatmap,
--       7 frame image, 8 latest result, 9 latest mask, 10 latest heatmap, 11 latest image, 12 latest ts
-- ARGV: 1 done value, 2 done ttl, 3 frame ttl, 4 results maxlen, 5 alerts maxlen, 6 is alert (1/0),
--       7 capture ts, 8 result json, 9 mask png, 10 heatmap png, 11 image bytes, 12 live channel,
--       13 live json, 14 n result fields, 15 n alert fields, then result fields, then alert fields
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2]) then
  return 0
end
local nres = tonumber(ARGV[14])
local nalert = tonumber(ARGV[15])
local res = {}
for i = 1, nres do res[i] = ARGV[15 + i] end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', unpack(res))
local ttl = ARGV[3]
redis.call('SET', KEYS[4], ARGV[8], 'EX', ttl)
redis.call('SET', KEYS[5], ARGV[9], 'EX', ttl)
redis.call('SET', KEYS[6], ARGV[10], 'EX', ttl)
if ARGV[6] == '1' then
  local al = {}
  for i = 1, nalert do al[i] = ARGV[15 + nres + i] end
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[5], '*', unpack(al))
  if string.len(ARGV[11]) > 0 then redis.call('SET', KEYS[7], ARGV[11], 'EX', ttl) end
end
local cur = redis.call('GET', KEYS[12])
if (not cur) or tonumber(cur) <= tonumber(ARGV[7]) then
  redis.call('SET', KEYS[12], ARGV[7])
  redis.call('SET', KEYS[8], ARGV[8])
  redis.call('SET', KEYS[9], ARGV[9])
  redis.call('SET', KEYS[10], ARGV[10])
  if string.len(ARGV[11]) > 0 then redis.call('SET', KEYS[11], ARGV[11]) end
end
redis.call('PUBLISH', ARGV[12], ARGV[13])
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

    @classmethod
    def from_settings(cls, settings: RedisSettings, worker_id: str = "") -> ResultPublisher:
        return cls(make_redis(settings), settings, worker_id)

    def ping(self) -> bool:
        try:
            return bool(self.client.ping())
        except RETRYABLE:
            return False

    # --- frames -----------------------------------------------------------------------------
    def publish(self, outputs: Sequence[FrameOutput]) -> list[bool]:
        """Write a batch in one round trip; per frame, True if written now, False if it was already there.

        Raises a RETRYABLE error if Redis cannot be reached; some frames may then be written and the
        rest not, which is safe to retry as is.
        """
        if not outputs:
            return []
        s, k = self.settings, self.keys
        published_ns = time.time_ns()
        pipe = self.client.pipeline(transaction=False)
        for out in outputs:
            r = dataclasses.replace(out.result, published_ts_ns=published_ns,
                                    worker=out.result.worker or self.worker_id)
            fid, line = r.frame_id, r.line
            res = r.results_entry(result_key=k.frame(fid, "result"), mask_key=k.frame(fid, "mask"))
            alert = r.alert_entry(mask_key=k.frame(fid, "mask"), heatmap_key=k.frame(fid, "heatmap"),
                                  image_key=k.frame(fid, "image") if out.image else "")
            result_json = json.dumps(r.to_json_dict(), separators=(",", ":"))
            live = json.dumps(r.live_event(), separators=(",", ":"))
            res_f, alert_f = _flatten(res), (_flatten(alert) if r.anomalous else [])
            keys = [
                k.done_marker(fid), k.results_stream(line), k.alerts_stream,
                k.frame(fid, "result"), k.frame(fid, "mask"), k.frame(fid, "heatmap"),
                k.frame(fid, "image"), k.latest(line, "result"), k.latest(line, "mask"),
                k.latest(line, "heatmap"), k.latest(line, "image"), k.latest(line, "capture_ts"),
            ]
            args = [
                f"{self.worker_id}@{published_ns}", s.done_ttl_s, s.frame_ttl_s, s.results_maxlen, s.alerts_maxlen,
                "1" if r.anomalous else "0", r.capture_ts_ns, result_json, out.mask_png, out.heatmap_png,
                out.image, k.live_channel, live, len(res_f), len(alert_f), *res_f, *alert_f,
            ]
            self._script(keys=keys, args=args, client=pipe)
        replies = pipe.execute(raise_on_error=True)
        return [bool(int(x)) for x in replies]

    def is_done(self, frame_id: str) -> bool:
        return bool(self.client.exists(self.keys.done_marker(frame_id)))

    # --- thresholds -------------------------------------------------------------------------
    def read_threshold(self, line: str) -> dict[str, str]:
        raw = self.client.hgetall(self.keys.threshold(line))
        return {k.decode(): v.decode() for k, v in raw.items()}

    def write_threshold(self, line: str, state: Mapping[str, Any]) -> None:
        """Publish the worker's view; never touches the operator's `manual_*` fields."""
        fields = {k: _field_value(v) for k, v in state.items() if not k.startswith("manual_")}
        fields["updated"] = str(time.time_ns())
        fields["worker"] = self.worker_id
        self.client.hset(self.keys.threshold(line), mapping=fields)

    # --- heartbeat --------------------------------------------------------------------------
    def heartbeat(self, fields: Mapping[str, Any]) -> None:
        key = self.keys.worker(self.worker_id)
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(key, mapping={k: _field_value(v) for k, v in fields.items()})
        pipe.expire(key, self.settings.heartbeat_ttl_s)
        pipe.execute()

    def forget_worker(self) -> None:
        self.client.delete(self.keys.worker(self.worker_id))


def manual_override(state: Mapping[str, str]) -> tuple[float | None, float | None]:
    """The operator's run-time override from a threshold hash: `manual_image` / `manual_pixel` fields.

    Set with e.g. `HSET anoclip:threshold:bottle manual_image 0.62`; delete the field to go back.
    Values that are not numbers are ignored (and the worker logs them).
    """

    def num(name: str) -> float | None:
        v = state.get(name)
        if v is None or v == "":
            return None
        try:
            return float(v)
        except ValueError:
            return None

    return num("manual_image"), num("manual_pixel")
