"""ASGI middleware in front of the endpoints, outermost first: `LoadShed` (503 at the door while the queue is
full), `BodyLimit` (413 for a body over `serve.max_body_bytes`) and `guard` (the bearer token, the request metrics
and a 500 that keeps the server serving whatever one request does)."""
from __future__ import annotations

import logging
import secrets
import time

from fastapi import Request

from serve.errors import error
from serve.state import ServerState

log = logging.getLogger("llmrec.serve")
OPEN_PATHS = {"/health"}  # answered without a token (load balancer probes)
# The kinds of engine work each API call needs (`BatchedEngine.admit`).
API_ROUTES = {"/v1/embeddings": ("embed",), "/v1/recommendations": ("embed", "generate"),
              "/v1/explanations": ("generate",)}
ROUTES = set(API_ROUTES) | {"/health", "/metrics"}


def route_label(path: str) -> str:
    """The `endpoint` label: bounded values, whatever paths clients try."""
    return path if path in ROUTES else "other"


class BodyLimit:
    """ASGI middleware: refuse bodies over `limit` bytes with 413, from Content-Length or while streaming
    (a chunked upload without a length is cut off as soon as it passes the limit)."""

    def __init__(self, app, limit: int, observe=None):
        # observe(path, status): counts the refusals in /metrics (this middleware answers before the route's own
        # accounting runs)
        self.app, self.limit, self.observe = app, limit, observe or (lambda path, status: None)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        refuse = error(413, f"request body over {self.limit} bytes (serve.max_body_bytes)")

        async def too_big(scope, receive, send):
            self.observe(scope["path"], 413)
            await refuse(scope, receive, send)

        try:
            if length is not None and int(length) > self.limit:
                return await too_big(scope, receive, send)
        except ValueError:
            return await error(400, "invalid Content-Length header")(scope, receive, send)
        seen, responded = 0, False

        async def limited():
            nonlocal seen, responded
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit and not responded:
                    responded = True
                    await too_big(scope, receive, send)
                    raise _BodyTooLarge()
            return message

        async def send_unless_answered(message):
            if not responded:
                await send(message)

        try:
            await self.app(scope, limited, send_unless_answered)
        except Exception as e:  # noqa: BLE001
            if not (responded and body_too_large(e)):
                raise


class LoadShed:
    """ASGI middleware, outermost: while a kind of work an API call needs (embedding, generation) already has
    `serve.max_queue` items queued, or more work waiting than its wait budget (`serve.max_embed_queue_wait_s`,
    `serve.max_generate_queue_wait_s`), refuse the call with 503 + Retry-After (the expected wait, at least 1 s)
    before its body is read, parsed or authenticated. A call let in counts as waiting work until it has queued its
    work (`BatchedEngine.admission`), so a burst cannot all pass the door while the queue is still short. Under
    overload most calls are refused, and refusing them at the door leaves the event loop's time to the calls it
    serves."""

    def __init__(self, app, state: "ServerState"):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        ops = API_ROUTES.get(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        batched = self.state.batched
        why = batched.admit(ops) if ops else None
        if why is not None:
            self.state.metrics.observe(scope["path"], 503, 0.0)
            busy = error(503, f"server busy: {why}; retry later",
                         headers={"Retry-After": str(batched.retry_after(ops))})
            return await busy(scope, receive, send)
        if not ops:
            return await self.app(scope, receive, send)
        with batched.admission(ops):
            return await self.app(scope, receive, send)


class _BodyTooLarge(Exception):
    pass


def body_too_large(e: BaseException) -> bool:
    """True for the BodyLimit signal, also when a task group wrapped it (Starlette's BaseHTTPMiddleware does)."""
    if isinstance(e, BaseExceptionGroup):
        return e.subgroup(_BodyTooLarge) is not None
    return isinstance(e, _BodyTooLarge)


def guard(state: ServerState):
    """`@app.middleware("http")`: the bearer token (when `state.api_key` is set), the request count and latency
    by endpoint and status, and a 500 for anything an endpoint raises."""

    async def guarded(request: Request, call_next):
        t0 = time.perf_counter()
        path = request.url.path
        label = route_label(path)
        if state.api_key and path not in OPEN_PATHS:
            auth = request.headers.get("authorization", "")
            token = auth[7:] if auth[:7].lower() == "bearer " else ""
            if not secrets.compare_digest(token.encode(), state.api_key.encode()):
                response = error(401, "missing or wrong bearer token (Authorization: Bearer <key>)",
                                 headers={"WWW-Authenticate": "Bearer"})
                state.metrics.observe(label, 401, time.perf_counter() - t0)
                return response
        try:
            response = await call_next(request)
        except Exception as e:  # noqa: BLE001 - the server keeps serving whatever one request does
            if body_too_large(e):
                raise  # already answered with 413 by BodyLimit
            log.exception("unhandled error on %s", path)
            response = error(500, "internal error; see the server log")
        state.metrics.observe(label, response.status_code, time.perf_counter() - t0)
        return response

    return guarded
