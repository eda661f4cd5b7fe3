"""ASGI middleware of the service: access log + metrics, API-key check, request-body size limit."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from fastapi.responses import JSONResponse

from .metrics import ServiceMetrics

access_log = logging.getLogger("ssd4rec_torchrec.serving.access")

ROUTES = ("/recommend", "/recommend/batch", "/healthz", "/metadata", "/metrics", "/admin/reload")
OPEN_ROUTES = ("/healthz",)
ADMIN_PREFIX = "/admin/"
DISCARD_MIN_BYTES = 16 << 20
LINGER_SECONDS = 2.0


def error_response(status: int, detail: Any, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def route_of(path: str) -> str:
    """The metrics label of a path: a known route, or ``other`` (bounded label cardinality)."""
    return path if path in ROUTES else "other"


class ObservedRequests:
    """Outermost middleware: one JSON access-log line per request (no bodies, no query strings, no headers)
    and the request counters / latency histogram. Puts the arrival time in ``scope["state"]["t0"]`` (the
    request deadline counts from there) and reads ``scope["state"]["bundle_id"]`` set by the handlers."""

    def __init__(self, app: Any, metrics: ServiceMetrics, live_bundle_id: Callable[[], str]) -> None:
        self.app, self.metrics, self.live_bundle_id = app, metrics, live_bundle_id

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        state = scope.setdefault("state", {})
        state["t0"] = t0
        status, sent = 500, 0

        async def observed_send(message: dict[str, Any]) -> None:
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status = int(message["status"])
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        finally:
            seconds = time.perf_counter() - t0
            path = scope.get("path", "")
            route = route_of(path)
            self.metrics.observe_request(route, status, seconds)
            if access_log.isEnabledFor(logging.INFO):
                client = scope.get("client") or ("", 0)
                length = dict(scope.get("headers") or []).get(b"content-length", b"")
                access_log.info(json.dumps({
                    "ts": round(time.time(), 3), "method": scope.get("method"), "path": path[:200], "route": route,
                    "status": status, "ms": round(1000 * seconds, 2), "client": client[0],
                    "bytes_in": int(length) if length.isdigit() else None, "bytes_out": sent,
                    "bundle_id": state.get("bundle_id") or self.live_bundle_id(),
                }))


def _digest(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()


class ApiKeyAuth:
    """``Authorization: Bearer <key>`` on every route but ``/healthz`` when a key is configured (compared in
    constant time: digests of equal length, ``hmac.compare_digest``); 401 without any detail about the key.
    Without a key, ``/admin/*`` answers 403 unless ``admin_open`` (the server is bound to loopback)."""

    def __init__(self, app: Any, api_key: str | None, admin_open: bool) -> None:
        self.app = app
        self.key_digest = _digest(api_key.encode()) if api_key else None
        self.admin_open = admin_open

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or path in OPEN_ROUTES:
            await self.app(scope, receive, send)
            return
        if self.key_digest is not None:
            header = dict(scope.get("headers") or []).get(b"authorization", b"")
            scheme, _, token = header.partition(b" ")
            ok = hmac.compare_digest(_digest(token.strip()), self.key_digest) and scheme.lower() == b"bearer"
            if not ok:
                await _drain(receive, DISCARD_MIN_BYTES, LINGER_SECONDS)
                await error_response(401, "unauthorized", {"WWW-Authenticate": "Bearer"})(scope, receive, send)
                return
        elif path.startswith(ADMIN_PREFIX) and not self.admin_open:
            await _drain(receive, DISCARD_MIN_BYTES, LINGER_SECONDS)
            await error_response(403, "admin routes are disabled: start the server with --api-key-file, or bind "
                                      "it to loopback")(scope, receive, send)
            return
        await self.app(scope, receive, send)


async def _drain(receive: Callable, limit: int, linger_s: float) -> bool:
    """Read and discard the rest of a request body: up to ``limit`` bytes or ``linger_s`` seconds, so a
    client still sending gets the error response instead of a connection reset. True when it all came."""
    got, deadline = 0, time.monotonic() + linger_s
    while got <= limit:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        try:
            message = await asyncio.wait_for(receive(), left)
        except asyncio.TimeoutError:
            return False
        if message["type"] == "http.disconnect":
            return False
        got += len(message.get("body", b""))
        if not message.get("more_body", False):
            return True
    return False


class BodySizeLimit:
    """Request bodies over ``max_bytes`` get 413 (by Content-Length or while streaming). The rest of an
    oversized body is read and discarded (up to ``max(16 MiB, 4 x max_bytes)`` or 2 s) before the answer,
    and the connection is closed after it, so the client reads its 413 and the connection ends cleanly
    (instead of a reset, or a connection left waiting for a body nobody reads)."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes
        self.discard_bytes = max(DISCARD_MIN_BYTES, 4 * max_bytes)

    async def _too_big(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        await _drain(receive, self.discard_bytes, LINGER_SECONDS)
        await error_response(413, f"request body over {self.max_bytes} bytes",
                             {"Connection": "close"})(scope, receive, send)

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None:
            if not length.isdigit():
                await error_response(400, "invalid Content-Length", {"Connection": "close"})(scope, receive, send)
                return
            if int(length) > self.max_bytes:
                await self._too_big(scope, receive, send)
                return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                if message.get("more_body", False):
                    await self._too_big(scope, receive, send)
                else:
                    await error_response(413, f"request body over {self.max_bytes} bytes")(scope, receive, send)
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


__all__ = ["ApiKeyAuth", "BodySizeLimit", "ObservedRequests", "error_response", "route_of"]
