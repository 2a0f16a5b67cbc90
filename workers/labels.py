"""`anoclip labels list|export --line LINE`: the operators' labels on a line's alerts.

`export --out DIR` writes them as a folder dataset (`DIR/<class name>/good/` for false alarms,
`DIR/<class name>/<defect type>/` for confirmed defects, `masks/<defect type>/` where the operator
accepted the model's outline) that `anoclip eval --dataset folder --root DIR` reads.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from pipeline.errors import AnoclipError
from pipeline.observability.log_format import log_context
from pipeline.operators.labels import LabelStore, export_folder, suggest_threshold
from pipeline.redis_keys import RedisKeys
from pipeline.services.redis_client import make_redis
from pipeline.settings import load_settings

log = logging.getLogger("anoclip.labels")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["list", "export"])
    p.add_argument("--line", required=True, help="product line id")
    p.add_argument("--out", default=None, metavar="DIR", help="export: dataset folder to write (required)")
    p.add_argument("--config", default=None, help="config file (default: $ANOCLIP_CONFIG or ./config.yaml)")
    p.add_argument("--json", action="store_true", help="list: one JSON object per label")


def run(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    line = settings.line(args.line)  # unknown lines fail here, naming the configured ones
    if args.action == "export" and not args.out:
        raise AnoclipError("export needs --out DIR")
    store = LabelStore(make_redis(settings.redis), RedisKeys(settings.redis.prefix))
    with log_context(line=line.id):
        if args.action == "list":
            labels = store.labelled(line.id)
            for lab in labels:
                if args.json:
                    print(json.dumps(lab.to_dict()))
                else:
                    what = (lab.label + (f" ({lab.defect_type})" if lab.defect_type else "")) or "acknowledged"
                    who = lab.labelled_by or lab.acknowledged_by
                    note = f"  “{lab.comment}”" if lab.comment else ""
                    print(f"{lab.frame_id}  score {lab.score:.4f}  {what:<24} by {who}{note}")
            c = store.counts(line.id)
            rate = f"{c.false_alarm_rate:.1%}" if c.false_alarm_rate is not None else "n/a"
            print(f"line {line.id}: {c.confirmed} confirmed, {c.false_alarm} false alarms, {c.unsure} unsure, "
                  f"{c.acknowledged} acknowledged; false-alarm rate {rate}", file=sys.stderr)
            print(suggest_threshold(labels)["text"], file=sys.stderr)
            return 0
        report = export_folder(store, line.id, line.class_name, args.out)
        for reason in report.skipped:
            print(f"skipped {reason}", file=sys.stderr)
        log.info("exported %d labelled alerts to %s", report.written, report.root)
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(report.defects.items())) or "none"
        print(f"line {line.id}: wrote {report.good} good (false alarms) and {sum(report.defects.values())} defect "
              f"image(s) ({kinds}; {report.masks} with masks) to {report.root}; "
              f"evaluate with: anoclip eval --dataset folder --root {args.out} --out <report dir>", file=sys.stderr)
        if report.written == 0:
            print("nothing to export: no alert of this line is labelled confirmed or false alarm", file=sys.stderr)
            return 1
        return 0
