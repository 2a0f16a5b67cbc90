"""Write the Kubernetes manifests that follow from config.yaml: the ConfigMap and one refresh CronJob per line.

    python deploy/k8s/render.py

The ConfigMap holds config.yaml verbatim (comments included). Cluster-specific settings (broker and
Redis addresses, security) are not edited into it: the Deployments set them as ANOCLIP_...
environment variables, which override the file. tests/unit/test_deploy_manifests.py fails when these
files and config.yaml drift apart, and names this script.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
IMAGE_CPU = "anoclip:0.1.0-cpu"

CONFIGMAP_HEADER = """\
# Generated from config.yaml by deploy/k8s/render.py: do not edit here, edit config.yaml and
# re-run the script. Cluster settings (addresses, security) come from env in the Deployments.
apiVersion: v1
kind: ConfigMap
metadata:
  name: anoclip-config
data:
  config.yaml: |
"""

CRONJOB = """\
apiVersion: batch/v1
kind: CronJob
metadata:
  name: anoclip-refresh-{name}
  labels:
    app.kubernetes.io/name: anoclip-refresh
    anoclip.io/line: {name}
spec:
  schedule: "{minute} * * * *"
  concurrencyPolicy: Forbid
  startingDeadlineSeconds: 600
  successfulJobsHistoryLimit: 3
  failedJobsHistoryLimit: 3
  jobTemplate:
    spec:
      backoffLimit: 0            # a refused candidate (exit 3) is an answer, not a failure to retry
      activeDeadlineSeconds: 1800
      template:
        metadata:
          labels:
            app.kubernetes.io/name: anoclip-refresh
            anoclip.io/line: {name}
        spec:
          restartPolicy: Never
          securityContext:
            runAsNonRoot: true
            runAsUser: 10001
          containers:
            - name: refresh
              image: {image}
              imagePullPolicy: IfNotPresent
              command: ["anoclip", "versions", "refresh", "--line", "{line}"]
              env:
                - name: ANOCLIP_CONFIG
                  value: /etc/anoclip/config.yaml
                - name: ANOCLIP_REDIS__URL
                  value: rediss://anoclip-redis.redis.svc:6379/0
                - name: ANOCLIP_REDIS__USERNAME
                  valueFrom:
                    secretKeyRef:
                      name: anoclip-redis
                      key: username
                - name: ANOCLIP_REDIS__PASSWORD
                  valueFrom:
                    secretKeyRef:
                      name: anoclip-redis
                      key: password
                - name: ANOCLIP_REDIS__SSL_CA_CERTS
                  value: /etc/anoclip/tls/redis/ca.crt
              resources:
                requests:
                  cpu: 250m
                  memory: 512Mi
                limits:
                  memory: 2Gi
              volumeMounts:
                - name: config
                  mountPath: /etc/anoclip/config.yaml
                  subPath: config.yaml
                  readOnly: true
                - name: redis-tls
                  mountPath: /etc/anoclip/tls/redis
                  readOnly: true
          volumes:
            - name: config
              configMap:
                name: anoclip-config
            - name: redis-tls
              secret:
                secretName: anoclip-redis
                items:
                  - key: ca.crt
                    path: ca.crt
"""


def k8s_name(line_id: str) -> str:
    """A line id as a DNS-1123 label fragment (CronJob names allow at most 52 characters)."""
    name = re.sub(r"[^a-z0-9-]+", "-", line_id.lower()).strip("-") or "line"
    return name[:36].rstrip("-")


def render_configmap(config_text: str) -> str:
    """The ConfigMap manifest holding `config_text` as its `config.yaml` key."""
    body = "".join(f"    {line}" if line.strip() else "\n" for line in config_text.splitlines(keepends=True))
    if not body.endswith("\n"):
        body += "\n"
    return CONFIGMAP_HEADER + body


def render_cronjobs(config_text: str, image: str = IMAGE_CPU) -> str:
    """One CronJob per configured line, each running `anoclip versions refresh --line LINE` hourly.

    The minutes are staggered so the lines' refreshes do not all start at once.
    """
    lines = [entry["id"] for entry in (yaml.safe_load(config_text) or {}).get("lines", [])]
    docs = [
        "# Generated from config.yaml by deploy/k8s/render.py: one adapter refresh job per line.\n"
        "# A refresh that is refused (validation failed) is recorded on the line's audit stream.\n"
    ]
    for i, line in enumerate(lines):
        docs.append(("---\n" if i else "") + CRONJOB.format(name=k8s_name(line), line=line, image=image,
                                                            minute=(7 + 17 * i) % 60))
    return "".join(docs)


def main() -> int:
    text = (ROOT / "config.yaml").read_text()
    (K8S / "configmap.yaml").write_text(render_configmap(text))
    (K8S / "refresh-cronjobs.yaml").write_text(render_cronjobs(text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
