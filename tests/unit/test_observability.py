"""Grafana, Prometheus alert rules and metric hygiene: every expression parses, the Kubernetes
PrometheusRule holds the same rules, Compose provisions both, and the worker's own series are clean
(no NaN for absent threshold sources, known labels start at 0, no `_created` series).

`expressions()` and `metric_names()` are shared with tests/integration/test_observability.py, which
checks every metric named here against what a live worker and dashboard export.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import promql_parser
import yaml

from pipeline.observability.telemetry import DLQ_STAGES, WorkerTelemetry

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
RULE = DEPLOY / "prometheus" / "prometheusrule.yaml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "anoclip.json"
GRAFANA_VARS = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h", "$line": ".*"}
PROMETHEUS_OWN = {"up"}
"""Series Prometheus makes itself."""


def expressions() -> list[tuple[str, str]]:
    """(where, PromQL) for every alert rule and every Grafana panel target, Grafana variables filled in."""
    out = []
    for group in yaml.safe_load(ALERTS.read_text())["groups"]:
        for rule in group["rules"]:
            out.append((f"alerts.yml:{rule['alert']}", rule["expr"]))
    dash = json.loads(DASHBOARD.read_text())
    for panel in dash["panels"]:
        for t in panel.get("targets", []):
            expr = t["expr"]
            for var, value in GRAFANA_VARS.items():
                expr = expr.replace(var, value)
            out.append((f"anoclip.json:{panel['title']}", expr))
    for var in dash["templating"]["list"]:
        q = var["query"]["query"]
        out.append((f"anoclip.json:${var['name']}", re.sub(r"^label_values\((\w+),.*\)$", r"\1", q)))
    return out


def metric_names(expr: str) -> set[str]:
    """Every metric name a PromQL expression selects (parsed, not grepped)."""
    names: set[str] = set()

    def walk(node: Any) -> None:
        if type(node).__name__ == "VectorSelector" and node.name:
            names.add(node.name)
        for attr in ("lhs", "rhs", "expr", "args", "vector_selector", "param"):
            child = getattr(node, attr, None)
            for c in child if isinstance(child, list) else [child]:
                if c is not None and not isinstance(c, str | int | float):
                    walk(c)

    walk(promql_parser.parse(expr))
    return names


def test_every_expression_parses_and_names_anoclip_metrics() -> None:
    exprs = expressions()
    assert len(exprs) >= 30
    for where, expr in exprs:
        names = metric_names(expr)  # raises on a syntax error
        assert names, f"{where}: selects no metric"
        assert names <= PROMETHEUS_OWN | {n for n in names if n.startswith("anoclip_")}, f"{where}: {names}"


def test_rules_have_severity_and_words_and_the_prometheus_rule_matches() -> None:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    names = [r["alert"] for g in groups for r in g["rules"]]
    assert len(names) == len(set(names)) >= 10
    for g in groups:
        for r in g["rules"]:
            assert r["labels"]["severity"] in ("critical", "warning", "info"), r["alert"]
            assert r["annotations"]["summary"] and r["annotations"]["description"], r["alert"]
    rule = yaml.safe_load(RULE.read_text())
    assert rule["apiVersion"] == "monitoring.coreos.com/v1" and rule["kind"] == "PrometheusRule"
    assert rule["spec"]["groups"] == groups, "prometheusrule.yaml must hold exactly the groups of alerts.yml"


def test_compose_provisions_prometheus_rules_and_grafana() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]
    prom = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    mounts = {m.split(":")[1]: m.split(":")[0] for m in compose["prometheus"]["volumes"]}
    for rule_file in prom["rule_files"]:
        assert (DEPLOY / mounts[rule_file]).resolve() == ALERTS.resolve(), rule_file
    jobs = {j["job_name"]: j for j in prom["scrape_configs"]}
    assert jobs["anoclip-dashboard"]["static_configs"][0]["targets"] == ["dashboard:8700"]
    assert "8700" in " ".join(compose["dashboard"]["command"])
    grafana = compose["grafana"]
    gm = {m.split(":")[1]: DEPLOY / m.split(":")[0] for m in grafana["volumes"] if m.startswith("./")}
    prov = gm["/etc/grafana/provisioning"]
    ds = yaml.safe_load((prov / "datasources" / "prometheus.yml").read_text())["datasources"][0]
    assert ds["url"] == "http://prometheus:9090" and "prometheus" in compose
    provider = yaml.safe_load((prov / "dashboards" / "anoclip.yml").read_text())["providers"][0]
    assert (gm[provider["options"]["path"]] / "anoclip.json").resolve() == DASHBOARD.resolve()
    dash = json.loads(DASHBOARD.read_text())
    uids = {t["datasource"]["uid"] for p in dash["panels"] for t in p.get("targets", [])}
    assert uids == {ds["uid"]}, "every panel uses the provisioned datasource"
    assert all(p.startswith("127.0.0.1:") for p in grafana["ports"]), "Grafana on loopback only"


def test_worker_series_are_clean_before_any_frame() -> None:
    """Before the fix: three NaN threshold series per line, no counter series until the first event,
    and a `_created` twin of every counter and histogram."""
    t = WorkerTelemetry()
    t.init_lines(["bottle", "wood"])
    t.set_threshold("bottle", "default", 0.5)
    t.set_threshold("bottle", "calibrated", 0.61)  # calibration finished: the default series goes away
    t.set_threshold("wood", "config", 0.7)
    text = t.render().decode()
    assert "NaN" not in text and "_created" not in text
    assert re.findall(r'^anoclip_line_threshold\{(.*)\} (.*)$', text, re.M) == [
        ('line="bottle",source="calibrated"', "0.61"), ('line="wood",source="config"', "0.7")]
    for line in ("bottle", "wood"):
        for name in ("frames_consumed", "frames_scored", "alerts", "duplicates_skipped"):
            assert f'anoclip_{name}_total{{line="{line}"}} 0.0' in text
        for stage in DLQ_STAGES:
            assert f'anoclip_frames_dead_lettered_total{{line="{line}",stage="{stage}"}} 0.0' in text
        assert f'anoclip_tta_runs_total{{line="{line}",outcome="refused"}} 0.0' in text
