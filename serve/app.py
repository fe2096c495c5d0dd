"""`llmrec serve`: the HTTP app (FastAPI + uvicorn) in front of one engine and the song index.

Endpoints
- `POST /v1/embeddings`: OpenAI-shaped. `input` is a catalog song id, a new song (metadata, lyrics, comments and
  optional `audio`/`cover` as base64 or paths under `serve.media_roots`), or a list of those; multipart requests
  carry a new song as the form field `input` (JSON) plus `audio` / `cover` file parts. `neighbours: k` adds the k
  nearest catalog songs to each embedding (the cold-start use: where does a brand-new song land?).
- `POST /v1/recommendations`: `user_id` or `history` (recent song ids, most recent first) -> top-k songs from the
  index (seen songs excluded unless `exclude_seen: false`), each with a generated reason.
- `POST /v1/explanations`: `user_id` or `history` + `song_id` -> a reason.
- `GET /health`, `GET /metrics` (Prometheus text).

Hostile input is normal: every client mistake is a 4xx JSON `{"error": {"message", "type", "field"}}` that names
the field; the server keeps serving. Limits: body size (413), items per request and text length (422), upload
type (415) and size (413), queue length (503 + Retry-After; checked at the door before a body is read, then per
operation), request time (504). Text passes through the sanitiser; file paths must lie inside `serve.media_roots`;
optional bearer token (`serve.api_key` or env `LLMREC_API_KEY`); CORS off unless `serve.cors_origins` is set; binds
127.0.0.1 unless told otherwise.
"""
from __future__ import annotations

import argparse
import base64
import logging
import os
import secrets
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool
from pydantic import BaseModel, ValidationError
from pydantic_core import from_json
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmrec.claims import ServedReason
from llmrec.config import Config
from llmrec.io import RunDir
from llmrec.model.mm_lm import prompt_token_ids
from llmrec.ranking import HISTORY_FOR_QUERY, history_query, recent_histories
from llmrec.split import positive_plays
from serve.batching import BatchedEngine, Overloaded, RequestTimeout
from serve.engines.base import Engine
from serve.index import SongIndex, load_index
from serve.inputs import MediaCodec, RequestError, SongInputs, SongMedia, resolve_media_path
from serve.metrics import Metrics
from serve.reasons import ReasonWriter
from serve.requests import RequestModels, describe, request_models

log = logging.getLogger("llmrec.serve")
API_KEY_ENV = "LLMREC_API_KEY"
OPEN_PATHS = {"/health"}  # answered without a token (load balancer probes)


# ------------------------------------------------------------------------------------------------ state

@dataclass
class ServerState:
    cfg: Config
    run: RunDir
    engine: Engine
    batched: BatchedEngine
    inputs: SongInputs
    index: SongIndex
    codec: MediaCodec
    reasons: ReasonWriter
    model_name: str
    metrics: Metrics = field(default_factory=Metrics)
    api_key: str | None = None


def bundle_dir(run: RunDir) -> Path:
    return run.require(run.model / "bundle", "train")


def user_histories(catalog) -> dict[str, list[str]]:
    """user id -> distinct song ids, most recent first (every user of the log is known)."""
    return recent_histories(catalog.interactions, catalog.users["user_id"])


def song_inputs(cfg: Config, run: RunDir, bdir: Path, with_histories: bool = False, catalog=None) -> SongInputs:
    """The catalogue as the engines see it: songs, media feature rows, text feature rows where the bundle fuses
    them, and (for the server) the users' listening histories."""
    from transformers import AutoTokenizer

    from llmrec.features import load_media_features, load_text_features
    from llmrec.model.bundle import read_bundle_meta
    from llmrec.model.mm_lm import read_mm_config
    from llmrec.schema import load_catalog

    mm = read_mm_config(bdir)
    catalog = catalog if catalog is not None else load_catalog(run.require(run.catalog, "prepare"))
    features = load_media_features(run.require(run.features, "features"))
    text = load_text_features(run.features) if mm.text_dim else None
    tokenizer = AutoTokenizer.from_pretrained(bdir / read_bundle_meta(bdir)["lm"])
    return SongInputs(cfg, tokenizer, mm, catalog.songs.to_dict("records"), features,
                      user_histories(catalog) if with_histories else None, text)


def load_state(cfg: Config, run: RunDir, engine: Engine | None = None, index: SongIndex | None = None
               ) -> ServerState:
    """Everything the app serves from a run directory. A stale index is refused here, before binding a port."""
    from llmrec.perception import load_perceived
    from llmrec.schema import load_catalog
    from serve.engines import load_engine

    bdir = bundle_dir(run)
    engine = engine or load_engine(bdir, cfg.serve)
    index = index or load_index(run.index, engine.bundle_hash)
    catalog = load_catalog(run.require(run.catalog, "prepare"))
    inputs = song_inputs(cfg, run, bdir, with_histories=True, catalog=catalog)
    # Co-listening evidence counts every positive play the server knows (the histories it serves come from the
    # same log); the eval counts training plays only.
    perceived, labels = load_perceived(run, inputs.features)
    reasons = ReasonWriter(cfg, inputs.songs, positive_plays(catalog.interactions), perceived,
                           {"perceived": labels} if labels else None)
    added_media = inputs.load_added_media(run.index) if index.added else {}
    for sid, row in index.added.items():  # songs added after the build, with the media rows they were added with
        inputs.add_song(sid, row, added_media.get(sid) or inputs.empty_media())
    s = cfg.serve
    batched = BatchedEngine(engine, max_batch=s.max_batch, max_wait_s=s.max_wait_ms / 1000, max_queue=s.max_queue,
                            timeout_s=s.request_timeout_s, embed_burst=s.embed_burst)
    return ServerState(cfg, run, engine, batched, inputs, index, MediaCodec(cfg, run.features / "encoders"), reasons,
                       model_name=f"llmrec-{cfg.name}-{engine.bundle_hash[:12]}",
                       api_key=s.api_key or os.environ.get(API_KEY_ENV) or None)


# ------------------------------------------------------------------------------------------------ errors

def error(status: int, message: str, field: str | None = None, headers: dict | None = None) -> JSONResponse:
    kind = {401: "authentication_error", 404: "not_found_error", 413: "request_too_large",
            503: "overloaded_error", 504: "timeout_error"}.get(status, "invalid_request_error")
    return JSONResponse({"error": {"message": message, "type": kind, "field": field}}, status, headers=headers)


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
    `serve.max_queue` items queued, refuse the call with 503 + Retry-After before its body is read, parsed or
    authenticated. Under overload most calls are refused, and refusing them at the door leaves the event loop's
    time to the calls it serves."""

    def __init__(self, app, state: "ServerState"):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        ops = API_ROUTES.get(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        if ops and not self.state.batched.admit(ops):
            self.state.metrics.observe(scope["path"], 503, 0.0)
            busy = error(503, f"server busy: {', '.join(f'{self.state.batched.queued(op)} {op}' for op in ops)} "
                              f"items queued (limit {self.state.batched.max_queue}); retry later",
                         headers={"Retry-After": "1"})
            return await busy(scope, receive, send)
        return await self.app(scope, receive, send)


class _BodyTooLarge(Exception):
    pass


def body_too_large(e: BaseException) -> bool:
    """True for the BodyLimit signal, also when a task group wrapped it (Starlette's BaseHTTPMiddleware does)."""
    if isinstance(e, BaseExceptionGroup):
        return e.subgroup(_BodyTooLarge) is not None
    return isinstance(e, _BodyTooLarge)


# ------------------------------------------------------------------------------------------------ parsing

def history_for(state: ServerState, body: BaseModel) -> tuple[list[str], str | None]:
    """(history, user id) from `user_id` or `history`; unknown ids are refused."""
    if ("user_id" in body.model_fields_set) == ("history" in body.model_fields_set):
        raise RequestError("user_id", "give exactly one of `user_id` or `history` (recent song ids)")
    if "user_id" in body.model_fields_set:
        history = state.inputs.history(body.user_id)
        if not history:
            raise RequestError("user_id", f"user {body.user_id!r} has no plays yet: give a `history` instead")
        return history, body.user_id
    for i, sid in enumerate(body.history):
        state.inputs.song(sid, f"history[{i}]")
        if sid not in state.index.position:
            raise RequestError(f"history[{i}]", f"song {sid!r} is not in the index", 404)
    return list(dict.fromkeys(body.history)), None


# ------------------------------------------------------------------------------------------------ new songs

@dataclass
class NewSong:
    row: dict
    audio: bytes | Path | None = None
    cover: bytes | Path | None = None


def parse_new_song(state: ServerState, body: BaseModel, field: str, files: dict | None = None) -> NewSong:
    """`body`: a validated new song (`RequestModels.new_song`); `files`: its multipart uploads."""
    media: dict[str, bytes | Path | None] = {}
    for kind in ("audio", "cover"):
        raw, path, upload = getattr(body, kind), getattr(body, f"{kind}_path"), (files or {}).get(kind)
        if sum(x is not None for x in (raw, path, upload)) > 1:
            raise RequestError(f"{field}.{kind}", f"give {kind} once: base64, a {kind}_path or a file part")
        if path is not None:
            media[kind] = resolve_media_path(path, state.cfg.serve.media_roots, f"{field}.{kind}_path")
        else:
            media[kind] = raw if raw is not None else upload
        if media[kind] == b"":
            raise RequestError(f"{field}.{kind}", "empty upload")
    return NewSong(state.inputs.new_song(body.model_extra, field), media["audio"], media["cover"])


def encode_new_song(state: ServerState, song: NewSong, field: str) -> SongMedia:
    """Decode + encode the uploads with the run's frozen encoders (runs in a worker thread)."""
    media = state.inputs.empty_media()
    if song.audio is not None:
        kw = {"path": song.audio} if isinstance(song.audio, Path) else {"data": song.audio}
        media.audio, media.audio_present = state.codec.audio(field=f"{field}.audio", **kw), True
    if song.cover is not None:
        kw = {"path": song.cover} if isinstance(song.cover, Path) else {"data": song.cover}
        media.cover, media.cover_present = state.codec.cover(field=f"{field}.cover", **kw), True
    if state.inputs.text_codec is not None:
        media.text = state.inputs.text_codec.encode(song.row)
    return media


UPLOAD_TYPES = {"audio": ("audio/",), "cover": ("image/",)}


async def read_multipart(state: ServerState, request: Request) -> tuple[dict, dict]:
    limit = state.cfg.serve.max_upload_bytes
    try:
        form = await request.form(max_files=2, max_fields=8, max_part_size=limit + 1)
    except Exception as e:  # noqa: BLE001 - python-multipart/starlette raise several types for broken bodies
        raise RequestError("body", f"malformed multipart body ({e})", 400) from None
    unknown = sorted(set(form.keys()) - {"input", "audio", "cover", "neighbours", "add_to_index"})
    if unknown:
        raise RequestError(unknown[0], "unknown form field; use input (JSON), audio, cover, neighbours")
    try:
        data = from_json(form.get("input") or "")  # Pydantic's parser: deep nesting is an error, not a recursion
    except (ValueError, TypeError):
        raise RequestError("input", "form field `input` must be a JSON object with the song's metadata") from None
    files = {}
    for kind in ("audio", "cover"):
        part = form.get(kind)
        if part is None:
            continue
        if isinstance(part, str):
            raise RequestError(kind, "expected a file part")
        ctype = (part.content_type or "application/octet-stream").lower()
        if not ctype.startswith(UPLOAD_TYPES[kind]) and ctype != "application/octet-stream":
            raise RequestError(kind, f"content type {ctype!r} is not accepted for {kind} "
                                     f"(expected {UPLOAD_TYPES[kind][0]}*)", 415)
        blob = await part.read(limit + 1)
        if len(blob) > limit:
            raise RequestError(kind, f"upload over {limit} bytes (serve.max_upload_bytes)", 413)
        files[kind] = blob
    body = {"input": data}
    if "neighbours" in form:
        try:
            body["neighbours"] = int(form["neighbours"])
        except ValueError:
            raise RequestError("neighbours", "expected an integer") from None
    if "add_to_index" in form:
        body["add_to_index"] = str(form["add_to_index"]).lower() in ("1", "true", "yes")
    return body, files


# ------------------------------------------------------------------------------------------------ endpoints

def song_card(state: ServerState, sid: str, score: float) -> dict:
    row = state.inputs.songs.get(sid, {})
    return {"song_id": sid, "score": round(score, 6), "title": row.get("title"), "artist": row.get("artist")}


async def embeddings(state: ServerState, models: RequestModels, request: Request) -> dict:
    files = None
    if request.headers.get("content-type", "").startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        data, files = await read_multipart(state, request)
        body = models.embeddings.model_validate(data)
    else:
        body = models.embeddings.model_validate_json(await request.body())
    many = isinstance(body.input, list)
    items = body.input if many else [body.input]
    if files and not isinstance(body.input, BaseModel):
        raise RequestError("input", "file parts go with exactly one new song object")
    fmt, k, add = body.encoding_format, body.neighbours, body.add_to_index
    engine_items, new_rows = [], {}
    for i, item in enumerate(items):
        where = f"input[{i}]" if many else "input"
        if isinstance(item, str):
            engine_items.append(state.inputs.catalog_embed_input(item, where))
        else:
            song = parse_new_song(state, item, where, files)
            media = await run_in_threadpool(encode_new_song, state, song, where)
            engine_items.append(state.inputs.embed_input(song.row, media))
            new_rows[i] = (song.row, media)
    if add:
        for i, (row, _) in new_rows.items():
            sid = row.get("song_id")
            if not sid or sid in state.index.position or sid in state.inputs.songs:
                raise RequestError(f"input[{i}].song_id" if many else "input.song_id",
                                   "add_to_index needs a new, unused song_id", 409 if sid else 422)
    emb = await state.batched.embed(engine_items)
    if add and new_rows:
        await run_in_threadpool(add_songs, state, [(new_rows[i], emb[i]) for i in sorted(new_rows)])
    hits = state.index.search(emb, k) if k else None
    data_out = []
    for i, vec in enumerate(emb):
        entry: dict[str, Any] = {"object": "embedding", "index": i}
        entry["embedding"] = base64.b64encode(vec.astype("<f4").tobytes()).decode() if fmt == "base64" \
            else [float(x) for x in vec]
        if hits is not None:
            entry["neighbours"] = [song_card(state, s, sc) for s, sc in hits[i]]
        data_out.append(entry)
    tokens = sum(prompt_tokens(state, it.prompt) for it in engine_items)
    return {"object": "list", "data": data_out, "model": state.model_name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def prompt_tokens(state: ServerState, prompt: str) -> int:
    mm = state.inputs.mm
    return len(prompt_token_ids(state.inputs.tokenizer, prompt, mm.audio_tokens, mm.cover_tokens))


def add_songs(state: ServerState, rows: list[tuple[tuple[dict, SongMedia], np.ndarray]]) -> None:
    """Add new songs to the live index and persist it (atomic directory swap); no rebuild."""
    ids = [row["song_id"] for (row, _), _ in rows]
    meta = [{k: v for k, v in row.items() if k not in ("audio_path", "cover_path")} for (row, _), _ in rows]
    state.index.add(np.stack([e for _, e in rows]), ids, meta)
    for ((row, media), _), sid in zip(rows, ids):
        state.inputs.add_song(sid, row, media)
    state.index.save(state.run.index, extra=state.inputs.save_added_media)


async def reasons_for(state: ServerState, history: list[str], song_ids: list[str], max_new_tokens: int,
                      user: str | None) -> list[ServedReason]:
    """Verified reasons (serve/reasons.py): evidence prompts, greedy + sampled answers, the claim check."""
    plan = state.reasons.plan(history, song_ids, user)
    # A prompt the model's context cannot hold (+ the answer) is not generated: that candidate gets the plain
    # evidence sentence instead of failing the whole request.
    room = state.engine.max_positions - max_new_tokens
    fits = [i for i, (prompt, _) in enumerate(plan.requests) if prompt_tokens(state, prompt.text) <= room]
    state.reasons.counts["prompt_too_long"] += len(plan.requests) - len(fits)
    items = [state.inputs.reason_input(*plan.requests[i]) for i in fits]
    texts: list[str | None] = [None] * len(plan.requests)
    for i, text in zip(fits, await state.batched.generate(items, max_new_tokens)):
        texts[i] = text
    return state.reasons.finish(plan, texts)


async def recommendations(state: ServerState, body: BaseModel) -> dict:
    history, user = history_for(state, body)
    k, exclude_seen, with_reasons, with_evidence, n_tokens = (body.k, body.exclude_seen, body.reasons, body.evidence,
                                                              body.max_new_tokens)
    known = [s for s in history if s in state.index.position][:HISTORY_FOR_QUERY]
    if not known:
        raise RequestError("user_id", f"none of user {user!r}'s songs are in the index")
    query = history_query(state.index.vectors(known))  # the report's `llmrec` (eval.user_tower=history) too
    seen = set(history) if exclude_seen else set()
    hits = state.index.search(query, k, [seen])[0]
    reasons = await reasons_for(state, history, [s for s, _ in hits], n_tokens, user) if with_reasons and hits \
        else []
    items = [{"rank": r + 1, **song_card(state, s, sc), **(reasons[r].as_json(with_evidence) if reasons else {})}
             for r, (s, sc) in enumerate(hits)]
    return {"object": "list", "data": items, "user_id": user, "history_used": history[: state.cfg.prompt.history_len],
            "model": state.model_name}


async def explanations(state: ServerState, body: BaseModel) -> dict:
    history, user = history_for(state, body)
    sid, n_tokens, with_evidence = body.song_id, body.max_new_tokens, body.evidence
    state.inputs.song(sid, "song_id")
    reason = (await reasons_for(state, history, [sid], n_tokens, user))[0]
    return {"object": "explanation", "song_id": sid, "user_id": user, **reason.as_json(with_evidence),
            "model": state.model_name}


# ------------------------------------------------------------------------------------------------ app

def create_app(state: ServerState) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app):
        yield
        state.batched.close()

    app = FastAPI(title="llmrec", version="1", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.llmrec = state
    m = state.metrics

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        # Starlette's own 404/405 in the documented shape ({"error": {...}}), not FastAPI's {"detail": ...}
        return error(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    m.gauge("llmrec_queue_items", "Items waiting for the engine.", state.batched.queued)
    m.gauge("llmrec_index_songs", "Songs in the ANN index.", lambda: len(state.index))
    m.counter("llmrec_engine_batches_total", "Engine calls by operation.",
              lambda: {op: s["batches"] for op, s in state.batched.stats().items()}, label="op")
    m.counter("llmrec_engine_items_total", "Items computed by operation.",
              lambda: {op: s["items"] for op, s in state.batched.stats().items()}, label="op")
    m.counter("llmrec_overloaded_total", "Requests refused with 503 (queue full).", state.batched.overloaded)
    m.counter("llmrec_timeouts_total", "Requests answered with 504.",
              lambda: sum(s["timeouts"] for s in state.batched.stats().values()))
    m.counter("llmrec_sanitizer_repairs_total", "Repairs made by the text sanitiser on request text, by kind.",
              lambda: dict(state.inputs.stats), label="kind")
    m.counter("llmrec_reasons_total", "Reasons returned by source (model: a verified answer; evidence: the plain "
              "evidence sentence; generic: no evidence), and answers not generated because the prompt overflowed.",
              lambda: dict(sorted(state.reasons.counts.items())), label="source")

    @app.middleware("http")
    async def guard(request: Request, call_next):
        t0 = time.perf_counter()
        path = request.url.path
        label = path if path in ROUTES else "other"  # bounded label values, whatever paths clients try
        if state.api_key and path not in OPEN_PATHS:
            auth = request.headers.get("authorization", "")
            token = auth[7:] if auth[:7].lower() == "bearer " else ""
            if not secrets.compare_digest(token.encode(), state.api_key.encode()):
                response = error(401, "missing or wrong bearer token (Authorization: Bearer <key>)",
                                 headers={"WWW-Authenticate": "Bearer"})
                m.observe(label, 401, time.perf_counter() - t0)
                return response
        try:
            response = await call_next(request)
        except Exception as e:  # noqa: BLE001 - the server keeps serving whatever one request does
            if body_too_large(e):
                raise  # already answered with 413 by BodyLimit
            log.exception("unhandled error on %s", path)
            response = error(500, "internal error; see the server log")
        m.observe(label, response.status_code, time.perf_counter() - t0)
        return response

    # Client errors in the documented shape: a body the models refuse, and what the endpoints refuse after it.
    @app.exception_handler(ValidationError)
    async def invalid_body(request: Request, exc: ValidationError):
        status, field, message = describe(exc)
        return error(status, message, field)

    @app.exception_handler(RequestError)
    async def refused(request: Request, exc: RequestError):
        return error(exc.status, str(exc), exc.field)

    @app.exception_handler(Overloaded)
    async def overloaded(request: Request, exc: Overloaded):
        return error(503, str(exc), headers={"Retry-After": "1"})

    @app.exception_handler(RequestTimeout)
    async def timed_out(request: Request, exc: RequestTimeout):
        return error(504, str(exc))

    @app.exception_handler(ValueError)
    async def not_for_the_engine(request: Request, exc: ValueError):  # e.g. a prompt over the context
        return error(422, str(exc))

    models = request_models(state.cfg.serve)

    @app.post("/v1/embeddings")
    async def embeddings_route(request: Request):
        return await embeddings(state, models, request)

    @app.post("/v1/recommendations")
    async def recommendations_route(request: Request):
        return await recommendations(state, models.recommendations.model_validate_json(await request.body()))

    @app.post("/v1/explanations")
    async def explanations_route(request: Request):
        return await explanations(state, models.explanations.model_validate_json(await request.body()))

    @app.get("/health")
    async def health():
        return {"status": "ok", "engine": state.engine.name, "model": state.model_name,
                "bundle_hash": state.engine.bundle_hash, "index": {"songs": len(state.index), "kind": state.index.kind},
                "queued": state.batched.queued()}

    @app.get("/metrics")
    async def metrics():
        return Response(m.render(), media_type=CONTENT_TYPE_LATEST)

    if state.cfg.serve.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=state.cfg.serve.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(BodyLimit, limit=state.cfg.serve.max_body_bytes,
                       observe=lambda path, status: m.observe(path if path in ROUTES else "other", status, 0.0))
    app.add_middleware(LoadShed, state=state)  # added last = runs first
    return app


# The kinds of engine work each API call needs (`BatchedEngine.admit`).
API_ROUTES = {"/v1/embeddings": ("embed",), "/v1/recommendations": ("embed", "generate"),
              "/v1/explanations": ("generate",)}
ROUTES = set(API_ROUTES) | {"/health", "/metrics"}


# ------------------------------------------------------------------------------------------------ CLI

def build_index(cfg: Config, run: RunDir, engine: Engine | None = None, progress: bool = True) -> SongIndex:
    """Embed the whole catalogue in batches with the serving engine and write runs/<name>/index/ atomically."""
    from tqdm import tqdm

    from llmrec.model.bundle import read_bundle_meta
    from serve.engines import load_engine

    bdir = bundle_dir(run)
    engine = engine or (load_engine(bdir, cfg.serve) if cfg.features.engine != "ray" else None)
    inputs = song_inputs(cfg, run, bdir)
    ids = sorted(inputs.songs)
    chunks = [[inputs.catalog_embed_input(s, s) for s in ids[i : i + cfg.serve.embed_batch]]
              for i in range(0, len(ids), cfg.serve.embed_batch)]
    if cfg.features.engine == "ray":
        rows = embed_on_ray(chunks, bdir, cfg)
    else:
        rows = [engine.embed(c) for c in tqdm(chunks, desc="embedding the catalogue", disable=not progress)]
    s = cfg.serve
    index = SongIndex.build(np.concatenate(rows), ids, read_bundle_meta(bdir)["content_hash"], s.index,
                            nlist=s.ivf_nlist, nprobe=s.ivf_nprobe, hnsw_m=s.hnsw_m)
    index.save(run.index)
    return index


def embed_on_ray(chunks: list[list], bdir: Path, cfg: Config) -> list[np.ndarray]:
    """Bulk embedding with `features.engine: ray` (as feature extraction scales out): one engine per Ray actor
    (`features.workers` of them, one CPU each, or the cluster named by RAY_ADDRESS), chunks in order."""
    try:
        import ray
        from ray.util import ActorPool
    except ImportError:
        raise RuntimeError('features.engine=ray needs Ray: pip install "llmrec[ray]"') from None
    from llmrec.parallel import resolve_workers

    workers = resolve_workers(cfg.features.workers)
    started = not ray.is_initialized()
    if started:
        kw = {} if os.environ.get("RAY_ADDRESS") else {"num_cpus": workers, "include_dashboard": False}
        ray.init(log_to_driver=False, **kw)
    try:
        embedder = ray.remote(num_cpus=1)(RayEmbedder)
        pool = ActorPool([embedder.remote(str(bdir), cfg.serve) for _ in range(workers)])
        return list(pool.map(lambda actor, chunk: actor.embed.remote(chunk), chunks))
    finally:
        if started:
            ray.shutdown()


class RayEmbedder:
    """One engine in a Ray actor process."""

    def __init__(self, bdir: str, serve_cfg):
        import torch

        from serve.engines import load_engine

        torch.set_num_threads(1)  # Ray gives each actor one CPU: parallelism comes from the actors
        self.engine = load_engine(bdir, serve_cfg)

    def embed(self, items):
        return self.engine.embed(items)


def serve_engine_name(cfg: Config, demo: bool) -> str:
    """The demo stays fast: the transformers engine unless the config asks for vLLM by name."""
    return "hf" if demo and cfg.serve.engine == "auto" else cfg.serve.engine


def run_serve(cfg: Config, run: RunDir, args: argparse.Namespace | None = None) -> dict:
    import uvicorn

    progress = not getattr(args, "no_progress", False)
    if getattr(args, "host", None):
        cfg.serve.host = args.host
    if getattr(args, "port", None):
        cfg.serve.port = args.port
    demo = bool(getattr(args, "demo", False))
    cfg.serve.engine = serve_engine_name(cfg, demo)
    if getattr(args, "build_index", False):
        index = build_index(cfg, run, progress=progress)
        return {"index": f"{run.index} ({len(index)} songs, {index.kind}, bundle {index.bundle_hash[:12]})"}
    if demo:
        from serve.demo import run_demo

        return run_demo(cfg, run, progress)
    state = load_state(cfg, run)
    print(f"llmrec serve: {state.engine.name} engine, {len(state.index)} songs indexed, "
          f"http://{cfg.serve.host}:{cfg.serve.port} (auth {'on' if state.api_key else 'off'})")
    uvicorn.run(create_app(state), host=cfg.serve.host, port=cfg.serve.port, log_level="info")
    state.engine.close()
    return {"served": f"http://{cfg.serve.host}:{cfg.serve.port}"}
