"""`anoclip versions list|show|rollback|pause|resume|refresh --line LINE`: see and steer the versions of what a
line learned (`list` without `--line` lists every configured line): its TTA adapters (default), or with
`--kind bank` its patch-memory banks (`lines[].memory: stream`, docs/memory.md), kept in the one version registry;
`list` shows both kinds. `anoclip versions ...` is the old name, kept as an alias for one release.

`refresh` asks the line's trainer (a running worker) to refresh now and waits for the outcome, so a
cron job or Kubernetes CronJob can drive refreshes and read the exit code:
0 = a new version was promoted, 3 = the candidate was refused (reason printed), 4 = no answer in time.
"""

from __future__ import annotations

import argparse
import json
import sys

from pipeline.adaptation.registry import VersionRegistry, default_actor
from pipeline.errors import AnoclipError
from pipeline.redis_keys import RedisKeys
from pipeline.services.redis_client import make_redis
from pipeline.settings import load_settings

EXIT_REFUSED = 3
EXIT_TIMEOUT = 4


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["list", "show", "rollback", "pause", "resume", "refresh"])
    p.add_argument("--line", default=None, help="product line id (list: default every configured line)")
    p.add_argument("--config", default=None, help="config file (default: $ANOCLIP_CONFIG or ./config.yaml)")
    p.add_argument("--version", default=None, help="show: which version (default current); rollback: target")
    p.add_argument("--reason", default="", help="why (kept in the audit trail)")
    p.add_argument("--timeout", type=float, default=600.0, help="refresh: seconds to wait for the outcome")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--kind", choices=["adapter", "bank"], default=None,
                   help="which registry: TTA adapters (default) or memory banks; list: both unless given")


def _print(obj: object, as_json: bool) -> None:
    if as_json:
        print(json.dumps(obj, indent=2, default=str))
    elif isinstance(obj, list):
        for row in obj:
            print(row if isinstance(row, str) else json.dumps(row, default=str))
    elif isinstance(obj, dict):
        for k, v in obj.items():
            print(f"{k}: {v if isinstance(v, str) else json.dumps(v, default=str)}")
    else:
        print(obj)


def _list(reg: VersionRegistry, line: str) -> dict[str, object]:
    cur = reg.current(line)
    rows = []
    for v in reg.versions(line):
        m = reg.meta(line, v)
        if reg.kind == "banks":
            rows.append({"version": v, "current": v == cur, "created": m.get("created"), "frames": m.get("frames"),
                         "patches": m.get("patches"), "bytes": m.get("bytes"), "parent": m.get("parent"),
                         "id": m.get("id"), "thresholds": m.get("thresholds") or {}})
            continue
        rows.append({"version": v, "current": v == cur, "created": m.get("created"),
                     "frames": m.get("training", {}).get("frames"), "validation": m.get("validation"),
                     "thresholds": m.get("thresholds") or {}})
    return {"line": line, "current": cur, "paused": reg.is_paused(line), "versions": rows}


def _print_banks(d: dict[str, object]) -> None:
    cur, paused = d["current"], d["paused"]
    print(f"line {d['line']}: memory bank {cur or 'none (mutual scoring)'}{' [PAUSED]' if paused else ''}")
    for r in d["versions"]:  # type: ignore[attr-defined]
        print(f"{'*' if r['current'] else ' '} {r['version']:>6}  created {r['created']}  frames {r['frames']}  "
              f"patches {r['patches']}  bytes {r['bytes']}  parent {r['parent']}  "
              f"image threshold {r['thresholds'].get('image', 'of the line')}")


def run(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    if args.line is None and args.action != "list":
        raise AnoclipError(f"{args.action} needs --line (one of: {', '.join(x.id for x in settings.lines)})")
    lines = [settings.line(args.line).id] if args.line else [x.id for x in settings.lines]  # unknown lines fail here
    client, keys = make_redis(settings.redis), RedisKeys(settings.redis.prefix)
    banks = VersionRegistry(client, keys, kind="banks")
    reg = banks if args.kind == "bank" else VersionRegistry(client, keys)
    actor = default_actor()
    line = lines[0] if lines else ""
    noun = "memory bank" if args.kind == "bank" else "adapter"
    if args.action == "list":
        listed = [_list(reg, x) for x in lines]
        if args.kind is None:  # both kinds: the adapters' records gain their line's banks
            for d, x in zip(listed, lines, strict=True):
                d["banks"] = _list(banks, x)
        if args.json:
            _print(listed[0] if args.line else listed, True)
            return 0
        if args.kind == "bank":
            for d in listed:
                _print_banks(d)
            return 0
        for d in listed:
            cur, paused = d["current"], d["paused"]
            print(f"line {d['line']}: current {cur or 'none (base model)'}{' [PAUSED]' if paused else ''}")
            for r in d["versions"]:  # type: ignore[attr-defined]
                print(f"{'*' if r['current'] else ' '} {r['version']:>6}  created {r['created']}  "
                      f"frames {r['frames']}  pixel threshold {r['thresholds'].get('pixel', 'of the line')}  "
                      f"validation {json.dumps(r['validation'], default=str)}")
            if "banks" in d and (d["banks"]["versions"] or d["banks"]["paused"]):  # type: ignore[index]
                _print_banks(d["banks"])  # type: ignore[arg-type]
        if not lines:
            print("no lines are configured", file=sys.stderr)
        return 0
    if args.action == "show":
        version = args.version or reg.current(line)
        out = {"line": line, "current": reg.current(line), "paused": reg.is_paused(line),
               "audit": reg.audit(line, count=20)}
        if version:
            out["version"] = reg.meta(line, version)
        _print(out, args.json)
        return 0
    if args.action == "rollback":
        target = reg.rollback(line, args.version, actor=actor, reason=args.reason)
        none = "none (mutual scoring)" if args.kind == "bank" else "none (base model)"
        print(f"line {line}: current {noun} is now {target or none}")
        return 0
    if args.action == "pause":
        reg.pause(line, actor=actor, reason=args.reason)
        print(f"line {line}: {noun} refreshes paused")
        return 0
    if args.action == "resume":
        reg.resume(line, actor=actor, reason=args.reason)
        print(f"line {line}: {noun} refreshes resumed")
        return 0
    if args.kind == "bank":
        raise AnoclipError("memory banks refresh on their own schedule (docs/memory.md); there is no bank refresh")
    request_id = reg.request_refresh(line, actor=actor)
    print(f"line {line}: refresh requested ({request_id}); waiting up to {args.timeout:.0f} s", file=sys.stderr)
    outcome = reg.wait_outcome(line, request_id, args.timeout)
    if outcome is None:
        print(f"line {line}: no trainer answered within {args.timeout:.0f} s (is a worker serving this line "
              f"with tta.mode=buffered?)", file=sys.stderr)
        return EXIT_TIMEOUT
    _print(outcome, args.json)
    return 0 if outcome["action"] == "promote" else EXIT_REFUSED
