"""The serve step of `llmrec demo`: a real uvicorn on 127.0.0.1 (free port, background thread), every endpoint
called over HTTP, one recommendation list with reasons and one cold-start neighbour list printed, then stopped."""
from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import httpx
import uvicorn

from llmrec.config import Config
from llmrec.io import MissingArtefactError, RunDir
from serve.app import create_app
from serve.build_index import build_index
from serve.index import StaleIndexError, load_index
from serve.inputs import SONG_LIST_FIELDS, SONG_TEXT_FIELDS
from serve.state import bundle_dir, load_state


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class BackgroundServer:
    """uvicorn in a thread of this process (the engine is already loaded here), stopped via `should_exit`."""

    def __init__(self, app, host: str = "127.0.0.1", port: int | None = None):
        self.host, self.port = host, port or free_port(host)
        self.server = uvicorn.Server(uvicorn.Config(app, host=self.host, port=self.port, log_level="warning",
                                                    lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, name="llmrec-uvicorn", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> "BackgroundServer":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"uvicorn did not start on {self.url}")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def ensure_index(cfg: Config, run: RunDir, engine, progress: bool):
    try:
        return load_index(run.index, engine.bundle_hash), False
    except (MissingArtefactError, StaleIndexError):
        return build_index(cfg, run, engine, progress), True


def cold_song(catalog) -> dict:
    """A song released after the split (no plays before it), as a new-song request body would carry it."""
    from llmrec.schema import split_time

    songs = catalog.songs
    cut = split_time(catalog)
    if cut is not None and "release_date" in songs:
        dates = songs["release_date"].astype("datetime64[ns]").dt.tz_localize(None)
        new = songs[dates >= cut.tz_localize(None)]
        songs = new if len(new) else songs
    row = songs.iloc[0].to_dict()
    body = {k: str(row[k]) for k in SONG_TEXT_FIELDS if row.get(k) is not None and str(row[k]) not in ("", "NaT")}
    body.update({k: [str(v) for v in row[k]] for k in SONG_LIST_FIELDS if row.get(k) is not None})
    body["release_date"] = str(row.get("release_date"))[:10]
    files = {}
    for kind, col in (("audio", "audio_path"), ("cover", "cover_path")):
        path = catalog.media_path(row.get(col))
        if path is not None and Path(path).is_file():
            files[kind] = (Path(path).name, Path(path).read_bytes(), "application/octet-stream")
    return {"song_id": row["song_id"], "body": body, "files": files}


def run_demo(cfg: Config, run: RunDir, progress: bool = True) -> dict:
    from llmrec.schema import load_catalog
    from serve.engines import load_engine

    engine = load_engine(bundle_dir(run), cfg.serve)
    index, built = ensure_index(cfg, run, engine, progress)
    state = load_state(cfg, run, engine=engine, index=index)
    catalog = load_catalog(run.catalog)
    headers = {"Authorization": f"Bearer {state.api_key}"} if state.api_key else {}
    user = next((u for u, h in state.inputs.histories.items() if len(h) >= 3), None)
    cold = cold_song(catalog)
    out: dict = {"index": f"{run.index} ({len(index)} songs, {'built now' if built else 'reused'})"}
    try:
        with BackgroundServer(create_app(state), "127.0.0.1") as server, \
                httpx.Client(base_url=server.url, headers=headers, timeout=120) as http:
            health = http.get("/health").raise_for_status().json()
            print(f"[serve] {server.url}: {health['engine']} engine, {health['index']['songs']} songs indexed")
            emb = http.post("/v1/embeddings", json={"input": index.song_ids[:4]}).raise_for_status().json()
            print(f"[serve] /v1/embeddings: {len(emb['data'])} x {len(emb['data'][0]['embedding'])} "
                  f"({emb['usage']['prompt_tokens']} prompt tokens)")
            recs = http.post("/v1/recommendations", json={"user_id": user, "k": 5}).raise_for_status().json()
            print(f"[serve] /v1/recommendations for {user} (recent plays: "
                  f"{', '.join(recs['history_used'][:3])}, ...):")
            for r in recs["data"]:
                print(f"  {r['rank']}. {r['song_id']} {r['title']!r} by {r['artist']} ({r['score']:.3f})\n"
                      f"     reason: {r['reason']}")
            exp = http.post("/v1/explanations", json={"user_id": user, "song_id": recs["data"][0]["song_id"]})
            print(f"[serve] /v1/explanations: {exp.raise_for_status().json()['reason']}")
            resp = http.post("/v1/embeddings", data={"input": json.dumps(cold["body"]), "neighbours": "5"},
                             files=cold["files"]).raise_for_status().json()
            nb = resp["data"][0]["neighbours"]
            uploads = " + ".join(["metadata", *cold["files"]])
            print(f"[serve] cold start: new song {cold['body'].get('title')!r} ({uploads} uploaded, never played) "
                  f"lands next to:")
            for n in nb:
                print(f"  {n['song_id']} {n['title']!r} by {n['artist']} ({n['score']:.3f})")
            metrics = http.get("/metrics").raise_for_status().text
            served = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                         if line.startswith("llmrec_requests_total"))
            out.update({"server": f"{server.url} ({health['engine']} engine), stopped",
                        "recommendations": f"{len(recs['data'])} for {user}, each with a reason",
                        "cold start neighbours": ", ".join(n["song_id"] for n in nb),
                        "requests served": int(served)})
    finally:
        state.engine.close()
    return out
