"""The HTTP inspection API: `POST /v1/lines/{line}/inspect` with an image body returns the verdict as JSON.

One request is one frame, judged exactly as a streamed frame (same FrameScorer, thresholds, geometry
limits, bounded-size masks; with buffered TTA, each line's promoted adapter from the Redis registry and its
thresholds, followed as workers follow them; a `memory: stream` line with its current patch-memory bank from the
bank registry, read only: requests never admit frames) and answered with the same record the worker stores in Redis
(`FrameResult.to_json_dict`), optionally also published there (`publish=True`). Bad bodies get a 4xx
whose `error` is the reason the DLQ would give. Concurrent requests share model batches
(`InspectionBatcher`). Loopback needs no token; any other bind needs one (`Authorization: Bearer`),
as the dashboard. `/healthz`, `/readyz`, `/metrics` (Prometheus), `/docs` and `/openapi.json` too.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import signal
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, HTTPException, Path, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field

from pipeline.adaptation.memory.service import MemoryService, NoBankError
from pipeline.adaptation.tta.service import AdapterService
from pipeline.errors import ConfigError, ImageError, UnknownLineError
from pipeline.inspection.frame_scorer import FrameScorer, Inspection
from pipeline.inspection.imaging import GeometryLimits, decode_image
from pipeline.inspection.render import heatmap_png, mask_png
from pipeline.serving.batcher import InspectionBatcher
from pipeline.settings import Settings
from pipeline.streaming import envelope
from pipeline.streaming.records import FrameResult
from pipeline.streaming.redis_io import FrameOutput, ResultPublisher
from pipeline.verdicts.following import Following, start_following
from pipeline.verdicts.inspector import Inspector
from pipeline.web.auth import AccessGuard, AccessPolicy, require_token_off_loopback, token_rule

log = logging.getLogger("anoclip.serve")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8800
TOKEN_ENV = "ANOCLIP_SERVE_TOKEN"
TOKEN_RE = token_rule(8)
AUTH_REQUIRED = "a valid access token is required (Authorization: Bearer TOKEN)"
OPEN_PATHS = {"/healthz", "/readyz", "/docs", "/openapi.json", "/docs/oauth2-redirect", "/redoc"}
IMAGE_BODY = {"required": True, "content": {t: {"schema": {"type": "string", "format": "binary"}}
                                            for t in ("image/jpeg", "image/png")}}
_MAGIC = ((b"\xff\xd8\xff", "image/jpeg"), (b"\x89PNG\r\n\x1a\n", "image/png"))
NO_BANK_RETRY_S = 30
"""`Retry-After` of a 503 for a `memory: stream` line without a bank: its workers publish the first one after
`memory.min_bank_frames` admitted frames (seconds on a running line), serve follows within `tta.trainer_poll_s`."""
STAGE_MEMORY = "memory"


def check_token_policy(host: str, token: str | None, allow_no_token: bool) -> str | None:
    """The token to require (None: none). Refuses a bind beyond this machine without one."""
    token = token.strip() if token else None
    require_token_off_loopback("anoclip serve", host, token is not None, allow_no_token, TOKEN_ENV)
    if token is not None and not TOKEN_RE.match(token):
        raise ConfigError("the serve access token must be 8 to 512 characters of A-Z a-z 0-9 . _ ~ + / = - "
                          "(e.g. python -c 'import secrets; print(secrets.token_urlsafe(24))')")
    return token


class RegionModel(BaseModel):
    # One connected region of the mask as the API returns it (`pipeline.inspection.regions.Region` in JSON). No
    # docstring: it would become the schema's description. Its title stays "Region" as before the rename (the
    # OpenAPI component key is the class name, RegionModel).
    model_config = ConfigDict(title="Region")

    area: int
    box: list[int] = Field(description="[x0, y0, x1, y1], ends exclusive, at the frame's size")
    peak: float | None = None


class InspectResult(BaseModel):
    """One frame's verdict: the record streamed frames get in Redis, plus what only a request has."""

    frame_id: str
    line: str
    camera: str
    score: float = Field(description="image-level p(abnormal)")
    verdict: str = Field(description="'anomalous' or 'normal'")
    threshold: float
    pixel_threshold: float
    threshold_source: str
    max_pixel_score: float
    defect_area: int = Field(description="mask pixels, at the judged (bounded) size")
    regions: list[RegionModel]
    adapter_version: str | None
    bank_version: str | None = Field(None, description="the patch-memory bank version that scored the frame "
                                     "(`lines[].memory: stream`: the fused score, on the same 0..1 scale); "
                                     "null with the memory off")
    timings_ms: dict[str, float]
    content_type: str
    width: int
    height: int
    capture_ts: int
    published: bool = Field(description="stored in Redis like a streamed frame (serve --publish)")
    mask_png: str | None = Field(None, description="base64 1-bit PNG mask, white = defect (?mask=true)")
    heatmap_png: str | None = Field(None, description="base64 PNG heatmap overlay (?heatmap=true)")
    model_config = {"extra": "allow"}


class ErrorBody(BaseModel):
    error: str
    stage: str


@dataclass
class ServeMetrics:
    """The Prometheus series of `anoclip serve` (a private registry: one app, one set)."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.requests = Counter("anoclip_http_requests", "Inspect requests answered", ["line", "status"], registry=r)
        self.latency = Histogram("anoclip_http_request_seconds", "Inspect request time, body to answer", ["line"],
                                 buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30), registry=r)
        self.inference = Histogram("anoclip_inference_seconds", "Model time per batch", ["line"], registry=r)
        self.batch_size = Histogram("anoclip_batch_size", "Frames per model batch", ["line"],
                                    buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)
        self.scores = Histogram("anoclip_anomaly_score", "Image scores", ["line"],
                                buckets=[i / 20 for i in range(1, 20)], registry=r)
        self.alerts = Counter("anoclip_alerts", "Anomalous frames", ["line"], registry=r)
        self.queue = Gauge("anoclip_serve_queue_depth", "Frames waiting for the model", registry=r)
        self.published = Counter("anoclip_serve_published", "Results published to Redis", ["outcome"], registry=r)
        self.ready = Gauge("anoclip_serve_ready", "1 when the model is loaded and lines are prepared", registry=r)
        # the same names as the workers' series, so one dashboard panel shows what every scorer of a line serves
        self.adapter_version = Gauge("anoclip_adapter_version", "1 for the adapter version served (none: base model)",
                                     ["line", "version"], registry=r)
        self.bank_version = Gauge("anoclip_bank_version", "1 for the memory bank version served (none: answers 503)",
                                  ["line", "version"], registry=r)


@dataclass
class ServeState:
    """What the app holds; the model loads in the background so health answers from the start."""

    settings: Settings
    token: str | None = None
    publisher: ResultPublisher | None = None
    inspector: FrameScorer | None = None
    batcher: InspectionBatcher | None = None
    limits: GeometryLimits | None = None
    metrics: ServeMetrics = field(default_factory=ServeMetrics)
    load_error: str | None = None
    following: Following | None = None
    """What serve follows of the lines' workers (set by `attach`): adapters, banks, published thresholds."""
    stopping: bool = False
    server_id: str = field(default_factory=lambda: f"serve-{socket.gethostname()}-{os.getpid()}")

    @property
    def adapters(self) -> AdapterService | None:
        """Follows each line's promoted adapter in the Redis registry; None: the base model (`adapter_note`: why)."""
        return self.following.adapters if self.following is not None else None

    @property
    def adapter_note(self) -> str | None:
        return self.following.adapter_note if self.following is not None else None

    @property
    def memory(self) -> MemoryService | None:
        """Follows the current bank of each `memory: stream` line (read only: never admits, builds nor locks)."""
        return self.following.memory if self.following is not None else None

    @property
    def memory_note(self) -> str | None:
        return self.following.memory_note if self.following is not None else None

    def close(self) -> None:
        """Stop batching and following the registries (after the HTTP server stopped answering)."""
        self.stopping = True
        if self.batcher is not None:
            self.batcher.stop()
        if self.following is not None:
            self.following.stop()

    def attach(self, inspector: FrameScorer, *, max_batch: int, max_wait_ms: float) -> None:
        """Start scoring with `inspector` (every line's text features are prepared first) on the one verdict
        path, following what the lines' workers serve (`pipeline.verdicts.following`): each line's promoted
        adapter (with `tta.mode: buffered`, as workers serve them), the current bank of each `memory: stream`
        line, and the thresholds the workers published. A request's frame never calibrates a threshold, nor is
        it admitted, built into a bank or trained on. A memory line without a bank (a cold start, a rollback to
        none, Redis unreachable) is answered 503 (`NoBankError`)."""
        for line in self.settings.lines:
            inspector.prepare_line(line.id)
        client = self.publisher.client if self.publisher is not None else None
        keys = self.publisher.keys if self.publisher is not None else None
        following = start_following(self.settings, inspector, client=client, keys=keys, follower_id=self.server_id)
        self.following = following
        if self.adapter_note is not None:
            log.info("serving the base model: %s", self.adapter_note.removeprefix("base model: "))
        self.limits = GeometryLimits.from_settings(self.settings.worker, inspector.model.image_size,
                                                   self.settings.model.resize)
        m = self.metrics

        def on_batch(line: str, n: int, seconds: float) -> None:
            m.inference.labels(line).observe(seconds)
            m.batch_size.labels(line).observe(n)

        path = Inspector.over(inspector, following, render_max_side=self.settings.worker.render_max_side)
        self.batcher = InspectionBatcher(path, max_batch=max_batch, max_wait_ms=max_wait_ms,
                                         on_batch=on_batch).start()
        self.inspector = inspector
        m.ready.set(1)

    def load_in_background(self, *, max_batch: int, max_wait_ms: float) -> threading.Thread:
        def load() -> None:
            try:
                self.attach(FrameScorer.from_settings(self.settings), max_batch=max_batch, max_wait_ms=max_wait_ms)
                log.info("model loaded; serving %d lines", len(self.settings.lines))
            except Exception as e:  # shown by /readyz and every inspect request
                log.exception("loading the model failed")
                self.load_error = f"{type(e).__name__}: {e}"

        t = threading.Thread(target=load, name="anoclip-serve-load", daemon=True)
        t.start()
        return t

    def served_adapters(self) -> dict[str, str | None] | None:
        """{line: adapter version served} (None: base model); None when not following the registry."""
        return None if self.adapters is None else {ln: self.adapters.adapter_for(ln)[1] for ln in self.adapters.lines}

    def served_banks(self) -> dict[str, str | None] | None:
        """{memory line: bank version served} (None: no bank, answered 503); None without memory lines."""
        return None if self.memory is None else {ln: self.memory.following(ln) for ln in self.memory.lines}

    def observe_versions(self) -> None:
        """Set the version gauges to what is served now (read at each scrape: the registries move on their own)."""
        m = self.metrics
        for gauge, served in ((m.adapter_version, self.served_adapters()), (m.bank_version, self.served_banks())):
            gauge.clear()
            for ln, version in (served or {}).items():
                gauge.labels(ln, version or "none").set(1)

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        checks: dict[str, Any] = {"model_loaded": self.inspector is not None, "stopping": self.stopping,
                                  "batcher_alive": bool(self.batcher and self.batcher.alive)}
        if self.load_error:
            checks["load_error"] = self.load_error
        if self.publisher is not None:
            checks["redis_up"] = self.publisher.ping()
        if (adapters := self.served_adapters()) is not None:
            checks["adapters"] = adapters
        elif self.adapter_note is not None:
            checks["adapters"] = self.adapter_note
        if (banks := self.served_banks()) is not None:  # None: no bank yet, that line is answered 503
            checks["banks"] = banks
            if self.memory_note is not None and not any(checks["banks"].values()):
                checks["banks_note"] = self.memory_note
        ok = checks["model_loaded"] and checks["batcher_alive"] and not self.stopping
        return ok, checks


def _error(status: int, reason: str, stage: str) -> HTTPException:
    return HTTPException(status_code=status, detail={"error": reason, "stage": stage})


def _no_bank(e: NoBankError) -> HTTPException:
    """503 for a `memory: stream` line without a bank: serve has no window of the line's recent frames to score
    it mutually as its workers do, and a zero-shot verdict would be on another scale than the stream's."""
    return HTTPException(status_code=503, detail={"error": str(e), "stage": STAGE_MEMORY},
                         headers={"Retry-After": str(NO_BANK_RETRY_S)})


def _sniff(data: bytes) -> str | None:
    return next((ctype for magic, ctype in _MAGIC if data.startswith(magic)), None)


async def _read_body(request: Request, max_bytes: int) -> bytes:
    """The body, refused as soon as it passes `max_bytes` (413, the DLQ's `size` reason)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise _error(413, f"frame too large: {declared} bytes exceeds the limit of {max_bytes}", envelope.STAGE_SIZE)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise _error(413, f"frame too large: more than {max_bytes} bytes", envelope.STAGE_SIZE)
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(state: ServeState) -> FastAPI:
    """The ASGI app over `state` (model attached now, or later by `load_in_background`)."""
    settings = state.settings
    app = FastAPI(title="anoclip inspection API", version="1",
                  description="Zero-shot anomaly detection and localisation (AnoCLIP) for product lines: POST one "
                              "image, get a verdict, defect regions and, on request, the mask.")
    app.state.serve = state
    m = state.metrics

    def refuse(_request: Request, status: int, message: str, headers: dict[str, str]) -> Response:
        return JSONResponse({"error": message, "stage": "auth"}, status_code=status,
                            headers={"WWW-Authenticate": "Bearer", **headers})

    # bearer tokens only: no cookies, no Host allow-list (API clients, not browsers), no guess limiting
    policy = AccessPolicy(tokens={state.token: "client"} if state.token else {}, open_paths=frozenset(OPEN_PATHS),
                          missing_message=AUTH_REQUIRED, wrong_message=AUTH_REQUIRED)
    app.add_middleware(AccessGuard, policy=policy, refuse=refuse)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        body = exc.detail if isinstance(exc.detail, dict) else {"error": str(exc.detail), "stage": "request"}
        return JSONResponse(body, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.get("/healthz", summary="Liveness: the server answers and its model thread runs (or loads)")
    async def healthz() -> JSONResponse:
        alive = state.load_error is None and (state.batcher is None or state.batcher.alive)
        return JSONResponse({"live": alive}, status_code=200 if alive else 503)

    @app.get("/readyz", summary="Readiness: the model is loaded and every line prepared")
    async def readyz() -> JSONResponse:
        ok, checks = await run_in_threadpool(state.readiness)
        return JSONResponse({"ready": ok, **checks}, status_code=200 if ok else 503)

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def metrics() -> Response:
        if state.batcher is not None:
            m.queue.set(state.batcher.depth)
        state.observe_versions()
        return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/lines", summary="The configured lines")
    async def lines() -> dict[str, Any]:
        return {"lines": [{"id": ln.id, "class_name": ln.class_name, "domain": ln.domain} for ln in settings.lines]}

    @app.post(
        "/v1/lines/{line}/inspect", response_model=InspectResult, response_model_exclude_none=True,
        summary="Inspect one image of a line",
        description="The body is the encoded image (JPEG or PNG, `Content-Type` image/jpeg or image/png; "
                    "omitted, it is recognised from the bytes). Optional headers: `X-Frame-Id`, `X-Camera-Id`, "
                    "`X-Capture-Ts` (ns since the epoch). Refusals carry the reason the streaming DLQ gives.",
        openapi_extra={"requestBody": IMAGE_BODY},
        responses={400: {"model": ErrorBody}, 401: {"model": ErrorBody}, 404: {"model": ErrorBody},
                   413: {"model": ErrorBody}, 415: {"model": ErrorBody}, 422: {"model": ErrorBody},
                   500: {"model": ErrorBody}, 503: {"model": ErrorBody}},
    )
    async def inspect(
        request: Request,
        line: str = Path(description="a configured line id"),
        mask: bool = Query(False, description="include the mask as a base64 PNG"),
        heatmap: bool = Query(False, description="include the heatmap overlay as a base64 PNG"),
    ) -> JSONResponse:
        t0 = time.perf_counter()
        status = 500
        try:
            payload = await _inspect(request, line, mask, heatmap)
            status = 200
            return JSONResponse(payload)
        except HTTPException as e:
            status = e.status_code
            raise
        finally:
            label = line if any(ln.id == line for ln in settings.lines) else "unknown"
            m.requests.labels(label, str(status)).inc()
            m.latency.labels(label).observe(time.perf_counter() - t0)

    async def _inspect(request: Request, line: str, want_mask: bool, want_heatmap: bool) -> dict[str, Any]:
        if state.stopping:
            raise _error(503, "the server is stopping", "request")
        if state.batcher is None or state.inspector is None or state.limits is None:
            raise _error(503, state.load_error or "the model is still loading (see /readyz)", "request")
        try:
            settings.line(line)
        except UnknownLineError as e:
            raise _error(404, str(e), envelope.STAGE_LINE) from e
        if state.memory is not None and state.memory.serves(line) and state.memory.following(line) is None:
            raise _no_bank(NoBankError(line))
        h = request.headers
        frame_id = h.get("x-frame-id") or f"{line}.{uuid.uuid4().hex}"
        camera = h.get("x-camera-id") or "http"
        _check_meta(frame_id, camera, h.get("x-capture-ts"))
        capture_ts = int(h["x-capture-ts"]) if h.get("x-capture-ts") else time.time_ns()
        batcher = state.batcher
        batcher.announce()
        submitted = False
        try:
            t_body = time.perf_counter()
            body = await _read_body(request, settings.worker.max_frame_bytes)
            declared = h.get("content-type", "").split(";")[0].strip().lower()
            ctype = _sniff(body) if declared in ("", "application/octet-stream") else declared
            try:
                envelope.check_payload(body, ctype or "", settings.worker.max_frame_bytes)
            except envelope.EnvelopeError as e:
                code = 415 if "content type" in e.reason else (413 if "too large" in e.reason else 400)
                if ctype is None and body:
                    e = envelope.EnvelopeError("unrecognised image data: send JPEG or PNG with its Content-Type",
                                               envelope.STAGE_DECODE)
                    code = 415
                raise _error(code, e.reason, e.stage) from e
            try:
                image = await run_in_threadpool(decode_image, body, content_type=ctype, limits=state.limits)
            except ImageError as e:
                code = 415 if "content type" in str(e) else 422
                raise _error(code, str(e), envelope.STAGE_DECODE) from e
            decode_ms = (time.perf_counter() - t_body) * 1e3
            job = batcher.submit_job(line, image, frame_id=frame_id)
            submitted = True
        finally:
            if not submitted:
                batcher.withdraw()
        try:
            insp: Inspection = await asyncio.wrap_future(job.future)
        except NoBankError as e:  # the line's bank was rolled back to none meanwhile
            raise _no_bank(e) from e
        except Exception as e:
            raise _error(500, f"inspection failed: {type(e).__name__}: {e}", envelope.STAGE_INSPECT) from e
        insp.timings["decode"] = decode_ms
        meta = envelope.FrameMeta(frame_id, line, camera, capture_ts, ctype or "", envelope.SCHEMA_VERSION)
        result = FrameResult.from_inspection(insp, meta, width=int(image.shape[1]), height=int(image.shape[0]),
                                             partition=None, offset=None, worker=state.server_id,
                                             bank_version=insp.bank_version)
        m.scores.labels(line).observe(insp.score)
        if insp.verdict:
            m.alerts.labels(line).inc()
        need_heatmap = want_heatmap or state.publisher is not None
        pngs = await run_in_threadpool(_render, image, insp, want_mask or state.publisher is not None, need_heatmap)
        published = False
        if state.publisher is not None:
            published = await run_in_threadpool(_publish, state, result, pngs, body)
        payload = {**result.to_json_dict(), "published": published}
        for k in ("partition", "offset"):
            payload.pop(k, None)
        if want_mask:
            payload["mask_png"] = base64.b64encode(pngs["mask"]).decode()
        if want_heatmap:
            payload["heatmap_png"] = base64.b64encode(pngs["heatmap"]).decode()
        return payload

    return app


def _check_meta(frame_id: str, camera: str, capture_ts: str | None) -> None:
    """Client-given ids follow the wire format's rules (400 with the DLQ's reason otherwise)."""
    headers = envelope.build_headers(frame_id, "x", camera, 10**18, "image/jpeg")
    if capture_ts is not None:
        headers = [(k, capture_ts.encode() if k == envelope.H_CAPTURE_TS else v) for k, v in headers]
    try:
        envelope.parse_meta(headers)
    except envelope.EnvelopeError as e:
        raise _error(400, e.reason.replace("header 'frame-id'", "X-Frame-Id").replace(
            "header 'camera-id'", "X-Camera-Id").replace("header 'capture-ts'", "X-Capture-Ts"), e.stage) from e


def _render(image: Any, insp: Inspection, want_mask: bool, want_heatmap: bool) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    if want_mask:
        out["mask"] = mask_png(insp.mask)
    if want_heatmap:
        lo, hi = insp.heatmap_range
        out["heatmap"] = heatmap_png(image, insp.anomaly_map, lo, hi, insp.mask)
    return out


def _publish(state: ServeState, result: FrameResult, pngs: dict[str, bytes], body: bytes) -> bool:
    """Store the result in Redis like a streamed frame; a Redis outage never costs the caller the verdict."""
    assert state.publisher is not None
    try:
        state.publisher.publish([FrameOutput(result, pngs["mask"], pngs["heatmap"], image=body)])
        state.metrics.published.labels("ok").inc()
        return True
    except Exception as e:
        log.warning("publishing frame %s to Redis failed: %s", result.frame_id, e)
        state.metrics.published.labels("failed").inc()
        return False


def serve(settings: Settings, *, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, token: str | None = None,
          allow_no_token: bool = False, publish: bool = False, max_batch: int | None = None,
          max_wait_ms: float | None = None) -> int:
    """Run the API until SIGINT/SIGTERM (uvicorn drains requests in flight, then the batcher finishes)."""
    import uvicorn

    token = check_token_policy(host, token, allow_no_token)
    publisher = ResultPublisher.from_settings(settings.redis, worker_id="") if publish else None
    state = ServeState(settings, token=token, publisher=publisher)
    if publisher is not None:
        publisher.worker_id = state.server_id
    app = create_app(state)
    state.load_in_background(max_batch=max_batch or settings.worker.max_batch,
                             max_wait_ms=settings.worker.max_wait_ms if max_wait_ms is None else max_wait_ms)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False))
    auth = "token required" if token else "no token"
    print(f"anoclip serve: http://{host}:{port}/v1/lines/LINE/inspect ({auth}; docs at /docs; "
          f"{'publishing to ' + settings.redis.url if publisher else 'not publishing'})", flush=True)
    # uvicorn drains, restores the handlers it found, then re-raises the signal: found no-ops let us finish
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: log.info("signal %d: stopped", signum))
    try:
        server.run()
    finally:
        state.close()
    return 0
