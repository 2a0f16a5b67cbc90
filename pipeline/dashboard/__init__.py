"""The live inspection dashboard: a web view over the Redis outputs of the workers, and the alert workflow.

`DashboardServer` serves its pages (no front-end build step, no external assets), a small JSON API, a
server-sent-events feed fed by the Redis pub/sub channel and Prometheus series at `/metrics`. The
workers' outputs are only read; operators' acknowledgements, labels and comments on alerts are written
through `pipeline.operators.labels`.
"""

from pipeline.dashboard.server import DEFAULT_PORT, HEALTH_PATH, READY_PATH, TOKEN_ENV, DashboardServer
from pipeline.dashboard.store import DashboardStore

__all__ = [
    "DEFAULT_PORT",
    "HEALTH_PATH",
    "READY_PATH",
    "TOKEN_ENV",
    "DashboardServer",
    "DashboardStore",
]
