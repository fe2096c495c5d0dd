"""The HTTP app (FastAPI) in front of one engine and the song index: `create_app(state)` and its endpoints,
`/v1/embeddings`, `/v1/recommendations`, `/v1/explanations`, `/health` and `/metrics`. What each takes and returns,
the limits and the error format: README.md, "Serving".

Requests are validated by the models of serve/requests.py and refused in the documented error shape by one handler
per kind of error; the middleware (serve/middleware.py) sheds load, caps the body, checks the token and counts.
"""
from __future__ import annotations

import base64
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmrec.claims import ServedReason
from llmrec.model.mm_lm import prompt_token_ids
from llmrec.ranking import HISTORY_FOR_QUERY, history_query
from serve.batching import Overloaded, RequestTimeout
from serve.errors import error
from serve.inputs import RequestError
from serve.metrics import read_server_counts
from serve.middleware import BodyLimit, LoadShed, guard, route_label
from serve.new_songs import add_songs, encode_new_song, parse_new_song, read_multipart
from serve.requests import RequestModels, describe, request_models
from serve.state import ServerState


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


async def reasons_for(state: ServerState, history: list[str], song_ids: list[str], max_new_tokens: int,
                      user: str | None) -> list[ServedReason]:
    """Verified reasons (serve/reasons.py): evidence prompts, greedy + sampled answers, the claim check."""
    plan = state.reasons.plan(history, song_ids, user)
    # A prompt the model's context cannot hold (+ the answer) is not generated: that candidate gets the plain
    # evidence sentence instead of failing the whole request.
    room = state.engine.max_positions - max_new_tokens
    texts: list[str | None] = [None] * len(plan.requests)
    for wanted in state.reasons.rounds(plan, texts):  # greedy answers, then samples where they are needed
        fits = [i for i in wanted if prompt_tokens(state, plan.requests[i][0].text) <= room]
        state.reasons.counts["prompt_too_long"] += len(wanted) - len(fits)
        items = [state.inputs.reason_input(*plan.requests[i]) for i in fits]
        for i, text in zip(fits, await state.batched.generate(items, max_new_tokens) if items else ()):
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


def create_app(state: ServerState) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app):
        yield
        state.batched.close()

    app = FastAPI(title="llmrec", version="1", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.llmrec = state
    read_server_counts(state.metrics, state)
    models = request_models(state.cfg.serve)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        # Starlette's own 404/405 in the documented shape ({"error": {...}}), not FastAPI's {"detail": ...}
        return error(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

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
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    app.middleware("http")(guard(state))
    if state.cfg.serve.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=state.cfg.serve.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(BodyLimit, limit=state.cfg.serve.max_body_bytes,
                       observe=lambda path, status: state.metrics.observe(route_label(path), status, 0.0))
    app.add_middleware(LoadShed, state=state)  # added last = runs first
    return app
