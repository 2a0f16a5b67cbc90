"""The live inspection dashboard: a read-only web view over the Redis outputs of the workers.

`DashboardServer` serves one page (no front-end build step, no external assets) plus a small JSON
API and a server-sent-events feed fed by the Redis pub/sub channel. It never writes to Redis.
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
