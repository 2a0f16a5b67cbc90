"""Deployment manifests stay true to the project: they parse, run only commands and flags that exist,
set only configuration keys the settings model knows (and the result validates), reference only
Secrets/ConfigMaps/claims that are defined, use one consistent image naming, and their probes and
scrape targets hit the endpoints the worker and the dashboard really serve (checked on live servers).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import re
import shlex
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.dashboard.server import DEFAULT_PORT, HEALTH_PATH, READY_PATH, TOKEN_ENV, DashboardServer
from pipeline.dashboard.store import DashboardStore
from pipeline.observability.telemetry import Health, TelemetryServer, WorkerTelemetry
from pipeline.services.redis_client import make_redis
from pipeline.settings import CONFIG_ENV, Settings, load_settings
from pipeline.streaming.kafka_io import client_config
from workers.cli import COMMANDS
from workers.serve import TOKEN_ENV as SERVE_TOKEN_ENV

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE = DEPLOY / "compose.yaml"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]
IMAGE_RE = re.compile(rf"^anoclip:{re.escape(VERSION)}-(cpu|cuda)$")
PROCESS_ENV = {CONFIG_ENV, TOKEN_ENV, SERVE_TOKEN_ENV}
"""ANOCLIP_ variables read by processes rather than by the settings model."""
COMPOSE_ENV = {"REDIS_PASSWORD": "compose-redis-password", "REDIS_ADMIN_PASSWORD": "compose-admin-password",
               TOKEN_ENV: "compose-dashboard-token", SERVE_TOKEN_ENV: "compose-serve-token"}
"""What an operator puts in deploy/.env (the required variables); everything else takes its default."""


# --- loading ----------------------------------------------------------------------------------------


def k8s_docs() -> list[tuple[str, dict[str, Any]]]:
    """(file, document) for every Kubernetes object (the kustomization is not one)."""
    out = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") != "Kustomization":
                out.append((path.name, doc))
    return out


def compose_interpolate(obj: Any, env: dict[str, str]) -> Any:
    """Docker Compose variable interpolation: ${V}, ${V:-d}, ${V-d}, ${V:?e}, ${V?e} and $$."""

    def one(s: str) -> str:
        def repl(m: re.Match[str]) -> str:
            if m.group(0) == "$$":
                return "$"
            name, op, arg = m.group(1), m.group(2), m.group(3) or ""
            val = env.get(name)
            if op in (":-", "-"):
                return val if (val if op == ":-" else val is not None) else arg
            if op in (":?", "?"):
                if not val if op == ":?" else val is None:
                    raise AssertionError(f"compose requires ${name}: {arg}")
                return val or ""
            return val or ""

        return re.sub(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:-|-|:\?|\?)([^}]*))?\}", repl, s)

    if isinstance(obj, str):
        return one(obj)
    if isinstance(obj, list):
        return [compose_interpolate(x, env) for x in obj]
    if isinstance(obj, dict):
        return {k: compose_interpolate(v, env) for k, v in obj.items()}
    return obj


def compose() -> dict[str, Any]:
    return compose_interpolate(yaml.safe_load(COMPOSE.read_text()), COMPOSE_ENV)


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    out = []
    for raw in text.splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def dockerfile_entrypoint() -> list[str]:
    eps = [json.loads(rest) for word, rest in dockerfile_instructions() if word == "ENTRYPOINT"]
    assert eps, "deploy/Dockerfile has no ENTRYPOINT"
    return eps[-1]


@dataclass
class Container:
    """An anoclip process some manifest starts, in a form the checks below share."""

    where: str
    image: str
    argv: list[str]
    env: dict[str, str]
    secret_env: dict[str, tuple[str, str]] = field(default_factory=dict)
    gpu: bool = False
    raw: dict[str, Any] = field(default_factory=dict)
    pod: dict[str, Any] = field(default_factory=dict)
    doc: dict[str, Any] = field(default_factory=dict)


def _pod_spec(doc: dict[str, Any]) -> dict[str, Any] | None:
    kind = doc.get("kind")
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        return doc["spec"]["template"]["spec"]
    if kind == "CronJob":
        return doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return None


def k8s_containers() -> list[Container]:
    out = []
    for fname, doc in k8s_docs():
        pod = _pod_spec(doc)
        if pod is None:
            continue
        for c in pod.get("containers", []) + pod.get("initContainers", []):
            env, secret_env = {}, {}
            for e in c.get("env", []):
                if "value" in e:
                    env[e["name"]] = str(e["value"])
                elif "secretKeyRef" in e.get("valueFrom", {}):
                    ref = e["valueFrom"]["secretKeyRef"]
                    secret_env[e["name"]] = (ref["name"], ref["key"])
                elif "fieldRef" in e.get("valueFrom", {}):
                    env[e["name"]] = f"pod-field-{e['valueFrom']['fieldRef']['fieldPath']}"
            limits = c.get("resources", {}).get("limits", {})
            out.append(Container(f"k8s/{fname}:{doc['metadata']['name']}/{c['name']}", c["image"],
                                 list(c.get("command", [])) + list(c.get("args", [])), env, secret_env,
                                 gpu="nvidia.com/gpu" in limits, raw=c, pod=pod, doc=doc))
    return out


def compose_containers(env_files: bool = False) -> list[Container]:
    out = []
    entry = dockerfile_entrypoint()
    for name, svc in compose()["services"].items():
        image = svc.get("image", "")
        if not image.startswith("anoclip:"):
            continue
        env = {k: str(v) for k, v in (svc.get("environment") or {}).items()}
        if env_files:
            for ef in svc.get("env_file", []):
                path = DEPLOY / (ef["path"] if isinstance(ef, dict) else ef)
                example = path.with_name(path.name + ".example")
                env.update(read_env_file(path if path.exists() else example))
        cmd = svc.get("command", [])
        argv = (svc.get("entrypoint") or entry) + (shlex.split(cmd) if isinstance(cmd, str) else list(cmd))
        devices = (svc.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", []))
        out.append(Container(f"compose:{name}", image, argv, env,
                             gpu=any("gpu" in d.get("capabilities", []) for d in devices), raw=svc))
    return out


def read_env_file(path: Path) -> dict[str, str]:
    out = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            k, _, v = line.partition("=")
            out[k.strip()] = v.strip()
    return out


def secrets() -> dict[str, dict[str, str]]:
    return {doc["metadata"]["name"]: {**doc.get("stringData", {}), **doc.get("data", {})}
            for _, doc in k8s_docs() if doc.get("kind") == "Secret"}


def all_containers() -> list[Container]:
    return k8s_containers() + compose_containers()


def _ids(cs: list[Container]) -> list[str]:
    return [c.where for c in cs]


def load_render_module() -> Any:
    spec = importlib.util.spec_from_file_location("k8s_render", K8S / "render.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# --- parsing ----------------------------------------------------------------------------------------


def test_every_manifest_parses_and_names_itself() -> None:
    files = sorted(K8S.glob("*.yaml")) + [COMPOSE, DEPLOY / "prometheus.yml"]
    assert len(files) >= 8
    for path in files:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert docs, f"{path} is empty"
    kinds = {doc["kind"] for _, doc in k8s_docs()}
    assert {"Deployment", "CronJob", "ConfigMap", "Secret", "Service"} <= kinds
    for fname, doc in k8s_docs():
        assert doc.get("apiVersion") and doc.get("kind"), f"{fname}: a document without apiVersion/kind"
        name = doc["metadata"]["name"]
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 52, f"{fname}: bad name {name}"


def test_kustomization_lists_every_manifest() -> None:
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kust["resources"])
    present = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present, f"kustomization resources {sorted(listed)} != files {sorted(present)}"


def test_compose_services_are_complete() -> None:
    services = compose()["services"]
    workers = [n for n, s in services.items() if s.get("command", [None])[0] == "worker"]
    assert len(workers) >= 2, "compose should run N workers"
    assert {"kafka", "redis", "dashboard", "serve", "prometheus"} <= set(services)
    kafka_env = services["kafka"]["environment"]
    assert "controller" in kafka_env["KAFKA_PROCESS_ROLES"] and "KAFKA_CONTROLLER_QUORUM_VOTERS" in kafka_env, \
        "the broker must run in KRaft mode"
    gpu_ids = []
    for n in workers:
        devices = services[n]["deploy"]["resources"]["reservations"]["devices"]
        gpu_ids += [i for d in devices for i in d.get("device_ids", [])]
    assert len(gpu_ids) == len(set(gpu_ids)) == len(workers), f"each worker needs its own GPU, got {gpu_ids}"


# --- commands, flags, images -------------------------------------------------------------------------


def _parse_cli(argv: list[str]) -> tuple[str, argparse.Namespace]:
    assert argv and argv[0] == "anoclip", f"runs {argv[:1]}, not the anoclip command"
    rest = argv[1:]
    if rest[:1] == ["--log-level"]:
        rest = rest[2:]
    assert rest and rest[0] in COMMANDS, f"sub-command {rest[:1]} is not in workers/cli.py COMMANDS"
    module = importlib.import_module(COMMANDS[rest[0]][0])
    parser = argparse.ArgumentParser(prog=f"anoclip {rest[0]}", exit_on_error=False)
    module.add_arguments(parser)
    try:
        return rest[0], parser.parse_args(rest[1:])
    except (argparse.ArgumentError, SystemExit) as e:
        raise AssertionError(f"`{' '.join(argv)}` does not parse with {COMMANDS[rest[0]][0]}: {e}") from e


@pytest.mark.parametrize("c", all_containers(), ids=_ids(all_containers()))
def test_commands_and_flags_exist(c: Container) -> None:
    _parse_cli(c.argv)


def test_the_expected_processes_are_deployed() -> None:
    subs = {(c.where.split(":")[0].split("/")[0], _parse_cli(c.argv)[0]) for c in all_containers()}
    for where in ("k8s", "compose"):
        assert (where, "worker") in subs and (where, "dashboard") in subs, f"{where}: {subs}"
        assert (where, "serve") in subs, f"{where} should run the HTTP inspection API: {subs}"
    assert ("k8s", "versions") in subs, "Kubernetes should run adapter refresh jobs"


@pytest.mark.parametrize("c", all_containers(), ids=_ids(all_containers()))
def test_images_are_named_consistently(c: Container) -> None:
    m = IMAGE_RE.match(c.image)
    assert m, f"{c.where}: image {c.image!r} is not anoclip:{VERSION}-cpu|cuda (pyproject version)"
    variant = m.group(1)
    assert (variant == "cuda") == c.gpu, f"{c.where}: {variant} image but gpu={c.gpu}"
    build = c.raw.get("build")
    if build:
        assert build["args"]["VARIANT"] == variant, f"{c.where}: builds VARIANT={build['args']['VARIANT']}"
        assert (REPO / "deploy" / build["context"] / build["dockerfile"]).resolve() == (DEPLOY / "Dockerfile")


def test_cronjobs_refresh_every_configured_line() -> None:
    cfg = load_settings(REPO / "config.yaml")
    refreshed = []
    for c in k8s_containers():
        sub, args = _parse_cli(c.argv)
        if sub == "versions":
            assert args.action == "refresh", c.where
            refreshed.append(args.line)
    assert sorted(refreshed) == sorted(line.id for line in cfg.lines)


def test_dockerfile_builds_what_the_manifests_run() -> None:
    ins = dockerfile_instructions()
    stages = {m.group(1) for w, r in ins if w == "FROM" and (m := re.search(r"\bAS\s+(\S+)", r, re.I))}
    assert {"torch-cpu", "torch-cuda"} <= stages
    assert any(w == "FROM" and r.startswith("torch-${VARIANT}") for w, r in ins)
    scripts = PYPROJECT["project"]["scripts"]
    assert dockerfile_entrypoint()[0] in scripts, "the ENTRYPOINT must be the installed console script"
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text()
    for word, rest in ins:
        if word == "COPY" and not rest.startswith("--from"):
            *sources, _dest = rest.split()
            for src in sources:
                assert (REPO / src).exists(), f"COPY {src}: not in the repository"
                assert f"!{src}" in ignore, f"COPY {src}: excluded by Dockerfile.dockerignore"
    exposed = {int(p) for w, r in ins if w == "EXPOSE" for p in r.split()}
    assert {Settings().worker.metrics_port, DEFAULT_PORT} <= exposed
    setup = (DEPLOY / "local" / "setup.sh").read_text()
    for pkg in ("torch", "torchvision"):
        pinned = re.search(rf"{pkg}==([\d.]+)", setup)
        arg = re.search(rf"ARG {pkg.upper()}_VERSION=([\d.]+)", (DEPLOY / "Dockerfile").read_text())
        assert pinned and arg and pinned.group(1) == arg.group(1), f"{pkg} pin differs from deploy/local/setup.sh"


# --- configuration ----------------------------------------------------------------------------------


def settings_path(env_name: str) -> list[str]:
    """ANOCLIP_KAFKA__SASL_USERNAME -> ['kafka', 'sasl_username'], checked against the model."""
    parts = env_name[len("ANOCLIP_"):].lower().split("__")
    model: Any = Settings
    for i, part in enumerate(parts):
        fields = getattr(model, "model_fields", None)
        assert fields and part in fields, f"{env_name}: no setting {'.'.join(parts[: i + 1])}"
        model = fields[part].annotation
    return parts


def env_sources() -> Iterator[tuple[str, str]]:
    for c in all_containers():
        for name in [*c.env, *c.secret_env]:
            yield c.where, name
    for word, rest in dockerfile_instructions():
        if word == "ENV":
            for m in re.finditer(r"(\w+)=", rest):
                yield "Dockerfile", m.group(1)
    for f in ("env.example", "kafka-security.env.example"):
        for name in read_env_file(DEPLOY / f):
            yield f, name
    for name in yaml.safe_load(COMPOSE.read_text())["x-anoclip-env"]:
        yield "compose:x-anoclip-env", name


def test_every_anoclip_env_var_is_a_setting() -> None:
    seen = 0
    for where, name in env_sources():
        if name.startswith("ANOCLIP_") and name not in PROCESS_ENV:
            try:
                settings_path(name)
            except AssertionError as e:
                raise AssertionError(f"{where}: {e}") from None
            seen += 1
    assert seen > 20


def test_settings_path_rejects_unknown_keys() -> None:
    assert settings_path("ANOCLIP_KAFKA__SASL_USERNAME") == ["kafka", "sasl_username"]
    with pytest.raises(AssertionError, match="no setting kafka.sasl_user"):
        settings_path("ANOCLIP_KAFKA__SASL_USER")


def _settings_for(c: Container, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Settings:
    """The settings the container's process would load: config file + its environment."""
    cm = next(doc for _, doc in k8s_docs() if doc["kind"] == "ConfigMap")
    cfg = tmp_path / "config.yaml"
    cfg.write_text(cm["data"]["config.yaml"])
    for name in list(os.environ):
        if name.startswith("ANOCLIP_"):
            monkeypatch.delenv(name)
    values = dict(c.env)
    sec = secrets()
    for name, (secret, key) in c.secret_env.items():
        values[name] = sec[secret][key]
    for name, value in values.items():
        if name.startswith("ANOCLIP_") and name not in PROCESS_ENV:
            monkeypatch.setenv(name, value)
    return load_settings(cfg)


@pytest.mark.parametrize("c", k8s_containers(), ids=_ids(k8s_containers()))
def test_k8s_settings_validate_and_reach_the_clients(c: Container, monkeypatch: pytest.MonkeyPatch,
                                                     tmp_path: Path) -> None:
    s = _settings_for(c, monkeypatch, tmp_path)
    mounts = {m["mountPath"].rstrip("/"): m for m in c.raw.get("volumeMounts", [])}
    volumes = {v["name"]: v for v in c.pod.get("volumes", [])}

    def mounted_secret_file(path: str) -> tuple[str, str]:
        directory, _, fname = path.rpartition("/")
        assert directory in mounts, f"{c.where}: {path} is not on a mounted volume"
        vol = volumes[mounts[directory]["name"]]
        assert "secret" in vol, f"{c.where}: {path} is not from a Secret"
        item = next(i for i in vol["secret"]["items"] if i["path"] == fname)
        return vol["secret"]["secretName"], item["key"]

    # Redis: ACL user/password from the Secret, TLS CA from the mounted Secret, all in the client
    conn = make_redis(s.redis).connection_pool.connection_kwargs
    assert s.redis.url.startswith("rediss://")
    assert conn["username"] == secrets()["anoclip-redis"]["username"]
    assert conn["password"] == secrets()["anoclip-redis"]["password"]
    assert conn["ssl_ca_certs"] == s.redis.ssl_ca_certs
    assert mounted_secret_file(s.redis.ssl_ca_certs) == ("anoclip-redis", "ca.crt")
    if _parse_cli(c.argv)[0] == "worker":
        kc = client_config(s.kafka)
        assert kc["security_protocol"] == "SASL_SSL" and kc["sasl_mechanism"].startswith("SCRAM")
        assert kc["sasl_plain_password"] == secrets()["anoclip-kafka"]["sasl-password"]
        assert mounted_secret_file(kc["ssl_cafile"]) == ("anoclip-kafka", "ca.crt")
        assert s.kafka.enable_idempotence and s.kafka.session_timeout_ms >= 10000, "Apache Kafka defaults"
        grace = c.pod["terminationGracePeriodSeconds"]
        assert grace > s.worker.drain_timeout_s, "SIGTERM drain must finish before the kill"


@pytest.mark.parametrize("c", compose_containers(env_files=True), ids=_ids(compose_containers()))
def test_compose_settings_validate(c: Container, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    s = _settings_for(c, monkeypatch, tmp_path)
    assert s.redis.username == "anoclip" and s.redis.password == COMPOSE_ENV["REDIS_PASSWORD"]
    services = compose()["services"]
    host = s.kafka.bootstrap_servers.split(":")[0]
    assert host in services and s.redis.url.split("//")[1].split(":")[0] in services
    if _parse_cli(c.argv)[0] == "worker":
        assert client_config(s.kafka)["security_protocol"] == "SASL_SSL", "kafka-security.env is applied"
        grace = int(c.raw["stop_grace_period"].rstrip("s"))
        assert grace > s.worker.drain_timeout_s


def test_secret_configmap_and_claim_references_exist() -> None:
    sec = secrets()
    names = {(doc["kind"], doc["metadata"]["name"]) for _, doc in k8s_docs()}
    for c in k8s_containers():
        for env_name, (secret, key) in c.secret_env.items():
            assert key in sec.get(secret, {}), f"{c.where}: {env_name} reads missing {secret}/{key}"
        for v in c.pod.get("volumes", []):
            if "secret" in v:
                for item in v["secret"].get("items", []):
                    assert item["key"] in sec.get(v["secret"]["secretName"], {}), f"{c.where}: volume {v['name']}"
            if "configMap" in v:
                assert ("ConfigMap", v["configMap"]["name"]) in names
            if "persistentVolumeClaim" in v:
                assert ("PersistentVolumeClaim", v["persistentVolumeClaim"]["claimName"]) in names
        mounted = {m["name"] for m in c.raw.get("volumeMounts", [])}
        assert mounted <= {v["name"] for v in c.pod.get("volumes", [])}, c.where


def test_configmap_and_cronjobs_are_rendered_from_config_yaml() -> None:
    render = load_render_module()
    text = (REPO / "config.yaml").read_text()
    hint = "config.yaml changed: run `python deploy/k8s/render.py`"
    assert (K8S / "configmap.yaml").read_text() == render.render_configmap(text), hint
    assert (K8S / "refresh-cronjobs.yaml").read_text() == render.render_cronjobs(text), hint
    cm = yaml.safe_load((K8S / "configmap.yaml").read_text())
    assert cm["data"]["config.yaml"] == text


def test_keda_scales_workers_on_lag_within_the_partitions(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The ScaledObject targets the worker Deployment, reads the workers' group and topic on their broker with
    their credentials, and never scales past the partition count (idle workers holding GPUs)."""
    docs = {(doc["kind"], doc["metadata"]["name"]): doc for _, doc in k8s_docs()}
    scaled = [d for (kind, _), d in docs.items() if kind == "ScaledObject"]
    assert len(scaled) == 1, "one ScaledObject for the workers"
    so = scaled[0]
    assert so["apiVersion"] == "keda.sh/v1alpha1"
    target = docs[("Deployment", so["spec"]["scaleTargetRef"]["name"])]
    (worker,) = [c for c in k8s_containers()
                 if (c.doc["kind"], c.doc["metadata"]["name"]) == (target["kind"], target["metadata"]["name"])]
    assert _parse_cli(worker.argv)[0] == "worker"
    s = _settings_for(worker, monkeypatch, tmp_path)
    lo, hi = so["spec"]["minReplicaCount"], so["spec"]["maxReplicaCount"]
    assert 1 <= lo <= hi <= s.kafka.partitions, f"replicas {lo}..{hi} beyond {s.kafka.partitions} partitions"
    assert hi == s.kafka.partitions, "scale to the partition count, no further"
    (trigger,) = so["spec"]["triggers"]
    m = trigger["metadata"]
    assert trigger["type"] == "kafka"
    assert (m["bootstrapServers"], m["consumerGroup"], m["topic"]) == (
        s.kafka.bootstrap_servers, s.kafka.group_id, s.kafka.frames_topic)
    assert m["allowIdleConsumers"] == "false" and int(m["lagThreshold"]) > 0
    keda_sasl = {"PLAIN": "plaintext", "SCRAM-SHA-256": "scram_sha256", "SCRAM-SHA-512": "scram_sha512"}
    assert m["sasl"] == keda_sasl[s.kafka.sasl_mechanism], "the workers' SASL mechanism, as KEDA spells it"
    assert m["tls"] == ("enable" if s.kafka.security_protocol.endswith("SSL") else "disable")
    auth = docs[("TriggerAuthentication", trigger["authenticationRef"]["name"])]
    refs = {r["parameter"]: (r["name"], r["key"]) for r in auth["spec"]["secretTargetRef"]}
    sec = secrets()
    for parameter, (secret, key) in refs.items():
        assert key in sec.get(secret, {}), f"TriggerAuthentication {parameter} reads missing {secret}/{key}"
    assert refs["username"] == worker.secret_env["ANOCLIP_KAFKA__SASL_USERNAME"]
    assert refs["password"] == worker.secret_env["ANOCLIP_KAFKA__SASL_PASSWORD"]
    assert refs["ca"] == ("anoclip-kafka", "ca.crt")


def test_compose_redis_acl_and_topics_match_the_settings() -> None:
    services = compose()["services"]
    s = Settings()
    cmd = services["redis"]["command"]
    user_at = [i for i, a in enumerate(cmd) if a == "--user"]
    users = {cmd[i + 1]: cmd[i + 2:] for i in user_at}
    default = users["default"][: users["default"].index("--user")] if "--user" in users["default"] else users["default"]
    assert "nopass" not in default and f">{COMPOSE_ENV['REDIS_ADMIN_PASSWORD']}" in default, \
        "the default user needs its own password"
    assert default[0] == "on" and "+@all" in default and "~*" in default, \
        "Redis replays the AOF as the default user: without full rights it drops transactions on restart"
    anoclip = users["anoclip"]
    assert f"~{s.redis.prefix}:*" in anoclip and f"&{s.redis.prefix}:*" in anoclip
    opts = dict(zip(cmd[1:user_at[0]:2], cmd[2:user_at[0]:2], strict=True))
    assert opts["--maxmemory-policy"] == "volatile-lru" and re.fullmatch(r"\d+[kmg]b", opts["--maxmemory"]), \
        "a memory budget that only evicts keys with a TTL"
    assert f">{COMPOSE_ENV['REDIS_PASSWORD']}" in anoclip
    init = " ".join(services["kafka-init"]["command"])
    for topic in (s.kafka.frames_topic, s.kafka.dlq_topic):
        assert topic in init
    partitions = int(re.search(r"--partitions (\d+)", init).group(1))
    workers = [n for n, sv in services.items() if sv.get("command", [None])[0] == "worker"]
    assert partitions >= len(workers)
    for n in workers:
        assert int(services[n]["environment"]["ANOCLIP_KAFKA__PARTITIONS"]) == partitions


# --- probes and scrape targets, against live servers -------------------------------------------------


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


@pytest.fixture
def worker_telemetry() -> Iterator[tuple[TelemetryServer, Health]]:
    health = Health()
    metrics = WorkerTelemetry()
    metrics.frames_scored.labels("bottle").inc()
    server = TelemetryServer(metrics, health, "127.0.0.1", 0).start()
    yield server, health
    server.stop()


def _probe_paths(c: Container) -> dict[str, tuple[str, int]]:
    ports = {p["name"]: p["containerPort"] for p in c.raw.get("ports", [])}
    out = {}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        if probe in c.raw:
            get = c.raw[probe]["httpGet"]
            out[probe] = (get["path"], ports.get(get["port"], get["port"]))
    return out


def test_worker_probes_hit_the_real_endpoints(worker_telemetry: tuple[TelemetryServer, Health],
                                              monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    server, health = worker_telemetry
    base = f"http://127.0.0.1:{server.port}"
    workers = [c for c in k8s_containers() if _parse_cli(c.argv)[0] == "worker"]
    assert workers
    for c in workers:
        probes = _probe_paths(c)
        assert {"livenessProbe", "readinessProbe"} <= set(probes), c.where
        port = _settings_for(c, monkeypatch, tmp_path).worker.metrics_port
        for name, (_path, probe_port) in probes.items():
            assert probe_port == port, f"{c.where}: {name} on port {probe_port}, metrics on {port}"
        ready_path = probes["readinessProbe"][0]
        health.model_loaded = health.partitions_assigned = health.redis_ok = False
        assert _status(base + ready_path) == 503, "readiness must fail before the model and partitions"
        health.model_loaded = health.partitions_assigned = health.redis_ok = health.broker_ok = True
        for name, (path, _) in probes.items():
            assert _status(base + path) == 200, f"{c.where}: {name} {path} on a healthy worker"
        health.broker_ok = False
        assert _status(base + ready_path) == 503, "a worker without its broker is not ready"
        health.broker_ok, health.redis_ok = True, False
        assert _status(base + ready_path) == 503, "a worker without Redis is not ready"
        assert _status(base + probes["livenessProbe"][0]) == 200, "...but stays live (no restart loop)"
        tmpl = c.doc["spec"]["template"]["metadata"]["annotations"]
        assert int(tmpl["prometheus.io/port"]) == port
        with urllib.request.urlopen(base + tmpl["prometheus.io/path"], timeout=5) as r:
            assert b"anoclip_frames_scored_total" in r.read()


def test_metrics_service_and_prometheus_targets_reach_every_worker(
        worker_telemetry: tuple[TelemetryServer, Health]) -> None:
    server, _ = worker_telemetry
    services = compose()["services"]
    workers = {n: s for n, s in services.items() if s.get("command", [None])[0] == "worker"}
    prom = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    job = next(j for j in prom["scrape_configs"] if j["job_name"] == "anoclip-workers")
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    expected = [f"{n}:{s['environment']['ANOCLIP_WORKER__METRICS_PORT']}" for n, s in workers.items()]
    assert sorted(targets) == sorted(expected)
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}{job['metrics_path']}", timeout=5) as r:
        assert b"anoclip_frames_scored_total" in r.read()
    svc = next(doc for _, doc in k8s_docs() if doc["kind"] == "Service" and doc["metadata"]["name"] ==
               "anoclip-worker-metrics")
    worker = next(doc for _, doc in k8s_docs() if doc["metadata"]["name"] == "anoclip-worker"
                  and doc["kind"] == "Deployment")
    assert svc["spec"]["selector"].items() <= worker["spec"]["template"]["metadata"]["labels"].items()
    port_names = {p["name"] for c in worker["spec"]["template"]["spec"]["containers"] for p in c["ports"]}
    assert all(p["targetPort"] in port_names for p in svc["spec"]["ports"])


def test_compose_healthchecks_hit_the_real_endpoints(worker_telemetry: tuple[TelemetryServer, Health]) -> None:
    server, health = worker_telemetry
    health.model_loaded = health.partitions_assigned = health.redis_ok = health.broker_ok = True
    for c in compose_containers():
        test = " ".join(c.raw["healthcheck"]["test"])
        m = re.search(r"http://127\.0\.0\.1:(\d+)(/\w+)", test)
        assert m, f"{c.where}: healthcheck does not call an HTTP endpoint: {test}"
        port, path = int(m.group(1)), m.group(2)
        sub, args = _parse_cli(c.argv)
        if sub == "worker":
            assert port == int(c.env["ANOCLIP_WORKER__METRICS_PORT"])
            assert _status(f"http://127.0.0.1:{server.port}{path}") == 200
        elif sub == "serve":
            assert port == args.port and path in ("/healthz", "/readyz"), f"{c.where}: {test}"
        else:
            assert sub == "dashboard" and port == args.port and path in (HEALTH_PATH, READY_PATH)


def test_dashboard_probes_hit_the_real_endpoints(tmp_path: Path) -> None:
    dash = [c for c in k8s_containers() if _parse_cli(c.argv)[0] == "dashboard"]
    assert dash
    (tmp_path / "c.yaml").write_text("{}\n")
    settings = load_settings(tmp_path / "c.yaml", redis={"url": "redis://127.0.0.1:1/0"})
    store = DashboardStore(settings)
    with DashboardServer(settings, port=0, token="probe-test-token", store=store).start() as server:
        for c in dash:
            _, args = _parse_cli(c.argv)
            assert args.host == "0.0.0.0" and args.token_file, f"{c.where}: off loopback it must use a token"
            probes = _probe_paths(c)
            assert {p for _, p in probes.values()} == {args.port}
            assert _status(server.url + probes["livenessProbe"][0]) == 200, "alive without Redis"
            assert _status(server.url + probes["readinessProbe"][0]) == 503, "not ready without Redis"
            assert _status(server.url + "/api/snapshot") == 401, "probes need no token, data does"


def test_serve_probes_and_token_hit_the_real_endpoints(tmp_path: Path) -> None:
    """`anoclip serve` in both deployments: off loopback with its own token (Kubernetes: a file from Secret
    anoclip-serve; Compose: ANOCLIP_SERVE_TOKEN from deploy/.env), probes and healthcheck on the app's real
    open endpoints (live while the model loads, ready only once it is loaded), everything else behind the token."""
    import threading

    import uvicorn

    from pipeline.serving.app import OPEN_PATHS, ServeState, create_app
    from pipeline.streaming.local_stack import free_port

    k8s = [c for c in k8s_containers() if _parse_cli(c.argv)[0] == "serve"]
    composed = [c for c in compose_containers() if _parse_cli(c.argv)[0] == "serve"]
    assert k8s and composed
    for c in k8s:
        _, args = _parse_cli(c.argv)
        assert args.host == "0.0.0.0" and args.token_file and not args.allow_no_token, c.where
        directory, _, fname = args.token_file.rpartition("/")
        mount = next(m for m in c.raw["volumeMounts"] if m["mountPath"].rstrip("/") == directory)
        vol = next(v for v in c.pod["volumes"] if v["name"] == mount["name"])
        item = next(i for i in vol["secret"]["items"] if i["path"] == fname)
        assert (vol["secret"]["secretName"], item["key"]) == ("anoclip-serve", "token")
        assert secrets()["anoclip-serve"]["token"] != secrets()["anoclip-dashboard"]["token"]
        svc = next(doc for _, doc in k8s_docs() if doc["kind"] == "Service" and doc["metadata"]["name"] ==
                   c.doc["metadata"]["name"])
        assert svc["spec"]["selector"].items() <= c.doc["spec"]["template"]["metadata"]["labels"].items()
        assert {p["targetPort"] for p in svc["spec"]["ports"]} <= {p["name"] for p in c.raw["ports"]}
    for c in composed:
        _, args = _parse_cli(c.argv)
        assert args.host == "0.0.0.0" and not args.allow_no_token
        assert c.env[SERVE_TOKEN_ENV] == COMPOSE_ENV[SERVE_TOKEN_ENV], "the token comes from deploy/.env"
        assert c.raw["ports"] == [f"127.0.0.1:{args.port}:{args.port}"]

    (tmp_path / "c.yaml").write_text("{}\n")
    settings = load_settings(tmp_path / "c.yaml", redis={"url": "redis://127.0.0.1:1/0"})
    state = ServeState(settings, token="probe-test-token")  # no model yet: as while it loads
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(state), host="127.0.0.1", port=port, log_level="warning"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    try:
        for _ in range(200):
            if server.started:
                break
            t.join(0.05)
        base = f"http://127.0.0.1:{port}"
        for c in k8s:
            probes = _probe_paths(c)
            assert {"startupProbe", "livenessProbe", "readinessProbe"} <= set(probes), c.where
            assert {p for _, p in probes.values()} == {_parse_cli(c.argv)[1].port}
            for name in ("startupProbe", "livenessProbe"):
                assert _status(base + probes[name][0]) == 200, f"{name}: alive while the model loads"
            assert _status(base + probes["readinessProbe"][0]) == 503, "not ready before the model is loaded"
            assert {path for path, _ in probes.values()} <= OPEN_PATHS, "probes carry no token"
        for c in composed:
            path = re.search(r"http://127\.0\.0\.1:\d+(/\w+)", " ".join(c.raw["healthcheck"]["test"])).group(1)
            assert path in OPEN_PATHS and _status(base + path) == 503, "healthy only once the model is loaded"
        assert _status(base + "/v1/lines") == 401 and _status(base + "/metrics") == 401, "data needs the token"
    finally:
        server.should_exit = True
        t.join(10)


def test_operations_doc_explains_every_metric() -> None:
    doc = (REPO / "docs" / "operations.md").read_text()
    names = []
    for metric in WorkerTelemetry().registry.collect():
        names.append(metric.name + ("_total" if metric.type == "counter" else ""))
    assert len(names) >= 15
    missing = [n for n in names if f"`{n}`" not in doc]
    assert not missing, f"docs/operations.md does not explain {missing}"
    documented = set(re.findall(r"^\| `(anoclip_\w+)`", doc, re.M))
    assert documented == set(names), f"documented but not exported: {sorted(documented - set(names))}"
