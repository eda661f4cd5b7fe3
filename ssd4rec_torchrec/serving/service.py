"""HTTP recommendation service over a serving bundle (FastAPI), with micro-batched user-tower calls.

Request flow: the JSON body is size-checked (413) and validated (422; malformed JSON 400), raw item ids are
mapped to item indices (unknown ids skipped and reported in ``warnings``), the history is truncated to its
most recent ``max_history`` known items (flagged), and the request is queued. A worker packs up to
``max_batch`` queued histories into ONE varlen tower call (values + offsets, no padding) once the batch is
full or ``max_wait_ms`` has passed since its first request, searches the item index for all of them, and
resolves each request's future. Tower and index run in a single worker thread, so the event loop stays
responsive. A history with no known item gets the popularity ranking instead (flagged ``fallback``).

Raw ids: an integer catalog accepts JSON integers, and also strings in canonical decimal form (``"12"``
is item 12; ``"012"`` and ``"12.0"`` are unknown); a string catalog accepts strings, and integers by their
decimal form. Responses use the catalog's own type. With ``exclude_seen`` every known item of the whole
(untruncated) history is excluded.

Operations: ``GET /metrics`` (Prometheus, see ``metrics``), one JSON access-log line per request, hot reload
(``POST /admin/reload``, SIGHUP; see ``reload``), an optional API key (``middleware.ApiKeyAuth``) and a
per-request deadline (503 with ``Retry-After``). Graceful shutdown is the server's (``apps/serve.py``).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import signal
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from .batching import MicroBatcher, Overloaded
from .metrics import ServiceMetrics
from .middleware import ApiKeyAuth, BodySizeLimit, ObservedRequests, error_response
from .recommender import MAX_K, Prepared, Recommender, RecommendRequest
from .reload import LiveModel, ReloadError, load_live_model

log = logging.getLogger(__name__)

MAX_BATCH_REQUESTS = 1024
DEFAULT_MAX_BODY_BYTES = 1 << 20


class BatchRequest(BaseModel):
    """``{"requests": [RecommendRequest, ...]}``."""

    model_config = ConfigDict(strict=True, extra="forbid")
    requests: list[RecommendRequest] = Field(max_length=MAX_BATCH_REQUESTS)


class ReloadRequest(BaseModel):
    """``{"bundle": PATH}`` (default: the path the server started with)."""

    model_config = ConfigDict(strict=True, extra="forbid")
    bundle: str | None = Field(None, min_length=1, max_length=4096)


class DeadlineExceeded(RuntimeError):
    """A request was not served within the request timeout."""


def is_loopback(host: str) -> bool:
    """Whether a bind address only accepts local connections (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _metadata(live: LiveModel) -> dict[str, Any]:
    rec = live.recommender
    manifest = rec.bundle.manifest
    return {
        "format_version": manifest.get("format_version"), "num_items": rec.bundle.num_items,
        "d_model": rec.bundle.d_model, "objective": manifest.get("objective"), "readout": manifest.get("readout"),
        "model": (manifest.get("config") or {}).get("model", {}).get("name"),
        "l2_normalize": manifest.get("l2_normalize"), "max_history": rec.max_history,
        "bundle_max_history": rec.bundle.max_history, "metrics": manifest.get("metrics"),
        "versions": manifest.get("versions"), "index": rec.index.kind, "tower": rec.bundle.tower_kind,
        "item_id_type": "int" if rec.int_ids else "str", "max_k": MAX_K, "max_batch_requests": MAX_BATCH_REQUESTS,
        "popular_item_ids": [rec.raw_ids[i - 1] for i in rec.popularity_order[:100]], "bundle": live.describe(),
    }


def _run_items(default: list[LiveModel], items: list[Any]) -> list[dict[str, Any]]:
    """The batch function: items are ``(Recommender, Prepared)`` (or a bare ``Prepared`` for the live model);
    each recommender's items go through one packed call of their own model."""
    groups: dict[int, tuple[Recommender, list[int]]] = {}
    for j, item in enumerate(items):
        rec, _ = item if isinstance(item, tuple) else (default[0].recommender, item)
        groups.setdefault(id(rec), (rec, []))[1].append(j)
    out: list[dict[str, Any]] = [{} for _ in items]
    for rec, rows in groups.values():
        prepared = [items[j][1] if isinstance(items[j], tuple) else items[j] for j in rows]
        for j, res in zip(rows, rec.run_batch(prepared)):
            out[j] = res
    return out


def create_app(recommender: Recommender, *, max_batch: int = 64, max_wait_ms: float = 2.0,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, max_queue: int = 10_000, bundle_path: str | None = None,
               api_key: str | None = None, bind_host: str = "127.0.0.1", request_timeout_ms: float | None = None,
               reload_on_sighup: bool = False) -> FastAPI:
    """The FastAPI app; ``app.state.batcher`` / ``app.state.recommender`` / ``app.state.live`` expose the
    internals. ``bundle_path``: what SIGHUP and a body-less reload load (default: the live bundle's path);
    ``bind_host``: without ``api_key`` the admin routes answer only when it is a loopback address."""
    if request_timeout_ms is not None and not request_timeout_ms > 0:
        raise ValueError(f"request_timeout_ms must be > 0, got {request_timeout_ms}")
    live = [LiveModel(recommender, str(bundle_path or recommender.bundle.path))]
    start_path = live[0].path
    metadata = [_metadata(live[0])]
    batcher: MicroBatcher[Any, dict[str, Any]] = MicroBatcher(lambda items: _run_items(live, items), max_batch,
                                                              max_wait_ms, max_queue)
    metrics = ServiceMetrics(batcher.depth)
    batcher.on_batch = metrics.batch_size.observe
    metrics.set_bundle(live[0].bundle_id, live[0].path, recommender.bundle.tower_kind)
    reload_lock = asyncio.Lock()
    reload_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reload")
    timeout = None if request_timeout_ms is None else request_timeout_ms / 1000.0

    async def reload(path: str) -> dict[str, Any]:
        if reload_lock.locked():
            raise ReloadError("another reload is in progress", status=409)
        async with reload_lock:
            old = live[0]
            rec = old.recommender
            t0 = time.perf_counter()
            try:
                new = await asyncio.get_running_loop().run_in_executor(
                    reload_pool, lambda: load_live_model(path, index=rec.index.kind, max_history=rec.max_history_option,
                                                         tower=rec.bundle.tower_kind, expect_d=rec.bundle.d_model))
            except ReloadError:
                metrics.reloads.labels(result="refused").inc()
                raise
            metadata[0], live[0] = _metadata(new), new  # the swap: requests prepared before keep `old`
            app.state.recommender, app.state.live = new.recommender, new
            metrics.set_bundle(new.bundle_id, new.path, new.recommender.bundle.tower_kind)
            metrics.reloads.labels(result="ok").inc()
            log.info("reloaded: bundle %s (%s) replaces %s (%s)", new.bundle_id, new.path, old.bundle_id, old.path)
            return {"status": "reloaded", "bundle": new.describe(), "previous": old.describe(),
                    "seconds": round(time.perf_counter() - t0, 3)}

    async def reload_logged(path: str) -> None:
        try:
            await reload(path)
        except ReloadError as e:
            log.error("reload of %s refused: %s (still serving %s)", path, e, live[0].bundle_id)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loop = asyncio.get_running_loop()
        if reload_on_sighup:
            loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(reload_logged(start_path)))
        yield
        if reload_on_sighup:
            loop.remove_signal_handler(signal.SIGHUP)
        await batcher.close()
        reload_pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="ssd4rec", lifespan=lifespan)
    app.state.recommender, app.state.batcher, app.state.live, app.state.metrics = recommender, batcher, live[0], metrics
    app.state.reload = reload
    app.add_middleware(BodySizeLimit, max_bytes=max_body_bytes)
    app.add_middleware(ApiKeyAuth, api_key=api_key, admin_open=is_loopback(bind_host))
    app.add_middleware(ObservedRequests, metrics=metrics, live_bundle_id=lambda: live[0].bundle_id)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
                  for e in exc.errors()]
        if any(e["type"] == "json_invalid" for e in errors):
            return error_response(400, [{**e, "msg": f"malformed JSON body: {e['msg']}"} for e in errors
                                        if e["type"] == "json_invalid"])
        return error_response(422, jsonable_encoder(errors))

    @app.exception_handler(Overloaded)
    async def overloaded(request: Request, exc: Overloaded) -> JSONResponse:
        return error_response(503, f"overloaded: {exc}", {"Retry-After": "1"})

    @app.exception_handler(DeadlineExceeded)
    async def deadline(request: Request, exc: DeadlineExceeded) -> JSONResponse:
        metrics.deadlines.inc()
        return error_response(503, f"deadline exceeded: {exc}", {"Retry-After": "1"})

    @app.exception_handler(ReloadError)
    async def refused(request: Request, exc: ReloadError) -> JSONResponse:
        return error_response(exc.status, f"reload refused: {exc}; still serving bundle {live[0].bundle_id} "
                                          f"({live[0].path})")

    async def serve(request: Request, reqs: Sequence[RecommendRequest]) -> list[dict[str, Any]]:
        model = live[0]
        request.state.bundle_id = model.bundle_id
        rec = model.recommender
        work = batcher.submit_many([(rec, rec.prepare(r)) for r in reqs])
        if timeout is None:
            results = await work
        else:
            left = timeout - (time.perf_counter() - request.state.t0)
            try:
                results = await asyncio.wait_for(work, max(left, 0.0))
            except asyncio.TimeoutError:
                raise DeadlineExceeded(f"not served within the request timeout of {request_timeout_ms:g} ms") from None
        metrics.count_results(results)
        return results

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        rec = live[0].recommender
        return JSONResponse({"status": "ok", "bundle_id": live[0].bundle_id, "tower_calls": rec.tower_calls,
                             "tower_histories": rec.tower_histories, "batches": batcher.batches,
                             "requests": batcher.items})

    @app.get("/metadata")
    async def get_metadata() -> JSONResponse:
        return JSONResponse(metadata[0])

    @app.get("/metrics")
    async def get_metrics() -> Response:
        return Response(metrics.exposition(), media_type=metrics.content_type)

    @app.post("/recommend")
    async def recommend(request: Request, req: RecommendRequest) -> JSONResponse:
        return JSONResponse((await serve(request, [req]))[0])

    @app.post("/recommend/batch")
    async def recommend_batch(request: Request, req: BatchRequest) -> JSONResponse:
        return JSONResponse({"results": await serve(request, req.requests) if req.requests else []})

    @app.post("/admin/reload")
    async def admin_reload(req: ReloadRequest) -> JSONResponse:
        return JSONResponse(await reload(req.bundle or start_path))

    return app


def load_service(bundle_path: str, *, index: str = "exact", max_history: int | None = None, tower: str = "exported",
                 **app_options: Any) -> FastAPI:
    """Load a bundle (verified and smoke-tested, as a reload is), build its index and return the app."""
    model = load_live_model(bundle_path, index=index, max_history=max_history, tower=tower)
    return create_app(model.recommender, bundle_path=bundle_path, **app_options)


__all__ = ["BatchRequest", "MicroBatcher", "Overloaded", "Prepared", "RecommendRequest", "Recommender", "create_app",
           "is_loopback", "load_service"]
