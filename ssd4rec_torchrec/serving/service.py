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
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import re
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Annotated, Any, Generic, TypeVar

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from .bundle_io import ServingBundle
from .index import ItemIndex

log = logging.getLogger(__name__)

MAX_K = 1000
MAX_BATCH_REQUESTS = 1024
MAX_REPORTED_UNKNOWN = 50
DEFAULT_MAX_BODY_BYTES = 1 << 20
_DECIMAL = re.compile(r"-?(0|[1-9][0-9]*)")

RawId = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)] | Annotated[str, StringConstraints(max_length=256)]


class RecommendRequest(BaseModel):
    """``{"history": [raw ids, oldest first], "k": 10, "exclude_seen": true}`` (strict types, no extra keys)."""

    model_config = ConfigDict(strict=True, extra="forbid")
    history: list[RawId]
    k: int = Field(10, ge=1, le=MAX_K)
    exclude_seen: bool = True


class BatchRequest(BaseModel):
    """``{"requests": [RecommendRequest, ...]}``."""

    model_config = ConfigDict(strict=True, extra="forbid")
    requests: list[RecommendRequest] = Field(max_length=MAX_BATCH_REQUESTS)


@dataclass
class Prepared:
    """A validated request mapped to item indices, ready for the tower."""

    history: list[int]  # known item indices fed to the tower (truncated, oldest first)
    exclude: set[int]
    k: int
    warnings: list[str] = field(default_factory=list)
    unknown: list[Any] = field(default_factory=list)
    truncated: bool = False


class Recommender:
    """The synchronous core: raw-id mapping, popularity fallback, packed tower call + index search."""

    def __init__(self, bundle: ServingBundle, index: ItemIndex, max_history: int | None = None) -> None:
        if index.num_items != bundle.num_items:
            raise ValueError(f"index has {index.num_items} items, bundle {bundle.num_items}")
        self.bundle, self.index = bundle, index
        self.max_history = int(max_history or bundle.max_history)
        if self.max_history < 1:
            raise ValueError(f"max_history must be >= 1, got {self.max_history}")
        if self.max_history > bundle.max_history:
            log.warning("max_history %d exceeds the bundle's %d (the model was not trained on such lengths)",
                        self.max_history, bundle.max_history)
        ids = bundle.item_ids
        self.int_ids = bool(np.issubdtype(ids.dtype, np.integer))
        raw = ids.tolist()
        self.raw_ids: list[Any] = raw
        self.lookup: dict[Any, int] = {r: i + 1 for i, r in enumerate(raw)}
        pop = bundle.popularity
        self.popularity_order = np.lexsort((np.arange(len(pop)), -pop)) + 1  # count desc, index asc
        self.popularity = pop
        self.tower_calls = 0
        self.tower_histories = 0

    def item_index(self, raw: Any) -> int | None:
        """Item index of a raw id from JSON, or None when unknown."""
        if self.int_ids:
            if isinstance(raw, str):
                if not _DECIMAL.fullmatch(raw):
                    return None
                raw = int(raw)
            return self.lookup.get(raw)
        return self.lookup.get(raw if isinstance(raw, str) else str(raw))

    def prepare(self, req: RecommendRequest) -> Prepared:
        known, unknown = [], []
        for raw in req.history:
            idx = self.item_index(raw)
            (unknown if idx is None else known).append(raw if idx is None else idx)
        p = Prepared(history=known[-self.max_history :], exclude=set(known) if req.exclude_seen else set(),
                     k=req.k, unknown=unknown[:MAX_REPORTED_UNKNOWN])
        if unknown:
            shown = ", ".join(json.dumps(u) for u in unknown[:MAX_REPORTED_UNKNOWN])
            more = f" (and {len(unknown) - MAX_REPORTED_UNKNOWN} more)" if len(unknown) > MAX_REPORTED_UNKNOWN else ""
            p.warnings.append(f"{len(unknown)} unknown item id(s) skipped: {shown}{more}")
        if len(known) > self.max_history:
            p.truncated = True
            p.warnings.append(f"history of {len(known)} known items truncated to the most recent {self.max_history}")
        if not known:
            p.warnings.append("no known item in the history: popularity fallback")
        return p

    def _popular(self, p: Prepared) -> list[tuple[int, float]]:
        out = []
        for idx in self.popularity_order:
            if int(idx) not in p.exclude:
                out.append((int(idx), float(self.popularity[idx - 1])))
                if len(out) == p.k:
                    break
        return out

    @torch.inference_mode()
    def user_vectors(self, histories: Sequence[list[int]]) -> torch.Tensor:
        """ONE packed tower call for all histories: (B, d) float32."""
        values = torch.tensor([i for h in histories for i in h], dtype=torch.long)
        lengths = torch.tensor([len(h) for h in histories], dtype=torch.long)
        offsets = torch.cat([lengths.new_zeros(1), torch.cumsum(lengths, 0)])
        self.tower_calls += 1
        self.tower_histories += len(histories)
        return self.bundle.tower(values, offsets).float()

    def run_batch(self, batch: Sequence[Prepared]) -> list[dict[str, Any]]:
        """Responses for a batch of prepared requests (one tower call for all those with a history)."""
        ranked: list[list[tuple[int, float]]] = [[] for _ in batch]
        modeled = [j for j, p in enumerate(batch) if p.history]
        if modeled:
            vectors = self.user_vectors([batch[j].history for j in modeled])
            kmax = max(batch[j].k for j in modeled)
            scores, items = self.index.search(vectors, kmax, [batch[j].exclude for j in modeled])
            for row, j in enumerate(modeled):
                ranked[j] = [(int(i), float(s)) for i, s in zip(items[row, : batch[j].k], scores[row, : batch[j].k])
                             if i > 0 and not math.isinf(s)]
        out = []
        for j, p in enumerate(batch):
            fallback = not p.history
            pairs = self._popular(p) if fallback else ranked[j]
            out.append({
                "items": [{"item_id": self.raw_ids[i - 1], "score": s} for i, s in pairs],
                "warnings": p.warnings,
                "fallback": "popularity" if fallback else None,
                "truncated": p.truncated,
                "unknown_item_ids": p.unknown,
            })
        return out

    def recommend(self, requests: Sequence[RecommendRequest]) -> list[dict[str, Any]]:
        """Synchronous, unbatched path (tests, offline use)."""
        return self.run_batch([self.prepare(r) for r in requests])


class Overloaded(RuntimeError):
    """The micro-batch queue is full."""


T = TypeVar("T")
R = TypeVar("R")


class MicroBatcher(Generic[T, R]):
    """Queues items from concurrent coroutines and runs ``fn`` on batches of up to ``max_batch`` of them in a
    worker thread, after at most ``max_wait_ms`` from a batch's first item."""

    def __init__(self, fn: Callable[[list[T]], list[R]], max_batch: int = 64, max_wait_ms: float = 2.0,
                 max_queue: int = 10_000) -> None:
        if max_batch < 1 or max_wait_ms < 0:
            raise ValueError("max_batch must be >= 1 and max_wait_ms >= 0")
        self.fn, self.max_batch, self.max_wait = fn, max_batch, max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tower")
        self.queue: asyncio.Queue[tuple[T, asyncio.Future[R]]] | None = None
        self.task: asyncio.Task[None] | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.batches = 0
        self.items = 0

    def _start(self) -> asyncio.Queue[tuple[T, asyncio.Future[R]]]:
        loop = asyncio.get_running_loop()
        if self.queue is None or self.loop is not loop or self.task is None or self.task.done():
            self.loop, self.queue = loop, asyncio.Queue()
            self.task = loop.create_task(self._worker())
        return self.queue

    async def submit_many(self, items: Sequence[T]) -> list[R]:
        queue = self._start()
        if queue.qsize() + len(items) > self.max_queue:
            raise Overloaded(f"{queue.qsize()} requests queued")
        futures = [asyncio.get_running_loop().create_future() for _ in items]
        for item, fut in zip(items, futures):
            queue.put_nowait((item, fut))
        return list(await asyncio.gather(*futures))

    async def submit(self, item: T) -> R:
        return (await self.submit_many([item]))[0]

    async def _collect(self, queue: asyncio.Queue[tuple[T, asyncio.Future[R]]]) -> list[tuple[T, asyncio.Future[R]]]:
        batch = [await queue.get()]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait
        while len(batch) < self.max_batch:
            if not queue.empty():
                batch.append(queue.get_nowait())
                continue
            left = deadline - loop.time()
            if left <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(queue.get(), left))
            except asyncio.TimeoutError:
                break
        return batch

    async def _worker(self) -> None:
        queue = self.queue
        assert queue is not None
        loop = asyncio.get_running_loop()
        while True:
            batch = [(item, fut) for item, fut in await self._collect(queue) if not fut.done()]
            if not batch:
                continue
            try:
                results = await loop.run_in_executor(self.executor, self.fn, [item for item, _ in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"batch function returned {len(results)} results for {len(batch)} items")
            except Exception as e:  # the requests get the error (500); the worker lives on
                log.exception("micro-batch of %d failed", len(batch))
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(e)
                continue
            self.batches += 1
            self.items += len(batch)
            for (_, fut), res in zip(batch, results):
                if not fut.done():
                    fut.set_result(res)

    async def close(self) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        self.executor.shutdown(wait=False, cancel_futures=True)


def _error(status: int, detail: Any) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status)


class BodySizeLimit:
    """ASGI middleware: request bodies over ``max_bytes`` get 413 (by Content-Length or while streaming)."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_big = _error(413, f"request body over {self.max_bytes} bytes")
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None:
            if not length.isdigit():
                await _error(400, "invalid Content-Length")(scope, receive, send)
                return
            if int(length) > self.max_bytes:
                await too_big(scope, receive, send)
                return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await too_big(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def create_app(recommender: Recommender, *, max_batch: int = 64, max_wait_ms: float = 2.0,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, max_queue: int = 10_000) -> FastAPI:
    """The FastAPI app; ``app.state.batcher`` / ``app.state.recommender`` expose the internals."""
    batcher: MicroBatcher[Prepared, dict[str, Any]] = MicroBatcher(recommender.run_batch, max_batch, max_wait_ms,
                                                                   max_queue)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await batcher.close()

    app = FastAPI(title="ssd4rec", lifespan=lifespan)
    app.state.recommender, app.state.batcher = recommender, batcher
    app.add_middleware(BodySizeLimit, max_bytes=max_body_bytes)
    manifest = recommender.bundle.manifest
    popular = [recommender.raw_ids[i - 1] for i in recommender.popularity_order[:100]]
    metadata = {
        "format_version": manifest.get("format_version"), "num_items": recommender.bundle.num_items,
        "d_model": recommender.bundle.d_model, "objective": manifest.get("objective"),
        "readout": manifest.get("readout"), "l2_normalize": manifest.get("l2_normalize"),
        "max_history": recommender.max_history, "bundle_max_history": recommender.bundle.max_history,
        "metrics": manifest.get("metrics"), "versions": manifest.get("versions"), "index": recommender.index.kind,
        "item_id_type": "int" if recommender.int_ids else "str", "max_k": MAX_K,
        "max_batch_requests": MAX_BATCH_REQUESTS, "popular_item_ids": popular,
    }

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
                  for e in exc.errors()]
        if any(e["type"] == "json_invalid" for e in errors):
            return _error(400, [{**e, "msg": f"malformed JSON body: {e['msg']}"} for e in errors
                                if e["type"] == "json_invalid"])
        return _error(422, jsonable_encoder(errors))

    @app.exception_handler(Overloaded)
    async def overloaded(request: Request, exc: Overloaded) -> JSONResponse:
        return JSONResponse({"detail": f"overloaded: {exc}"}, status_code=503, headers={"Retry-After": "1"})

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        return JSONResponse({"status": "ok", "tower_calls": recommender.tower_calls,
                             "tower_histories": recommender.tower_histories, "batches": batcher.batches,
                             "requests": batcher.items})

    @app.get("/metadata")
    async def get_metadata() -> JSONResponse:
        return JSONResponse(metadata)

    @app.post("/recommend")
    async def recommend(req: RecommendRequest) -> JSONResponse:
        return JSONResponse(await batcher.submit(recommender.prepare(req)))

    @app.post("/recommend/batch")
    async def recommend_batch(req: BatchRequest) -> JSONResponse:
        results = await batcher.submit_many([recommender.prepare(r) for r in req.requests]) if req.requests else []
        return JSONResponse({"results": results})

    return app


def load_service(bundle_path: str, *, index: str = "exact", max_history: int | None = None,
                 **app_options: Any) -> FastAPI:
    """Load a bundle, build its index and return the app."""
    from .bundle_io import load_serving_bundle
    from .index import build_index

    bundle = load_serving_bundle(bundle_path)
    recommender = Recommender(bundle, build_index(index, bundle.item_vectors), max_history)
    return create_app(recommender, **app_options)


__all__ = ["BatchRequest", "MicroBatcher", "Prepared", "RecommendRequest", "Recommender", "create_app",
           "load_service"]
