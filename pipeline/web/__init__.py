"""What the two HTTP servers (the dashboard and `anoclip serve`) share: access checks (`auth`: tokens, Host
allow-list, guess limiting, one ASGI middleware) and serving a Starlette app under uvicorn on a thread (`asgi`)."""
