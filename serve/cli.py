"""`llmrec serve`: build the index (`--build-index`), run the demo's serve step (`--demo`), or serve over HTTP with
uvicorn."""
from __future__ import annotations

import argparse

from llmrec.config import Config
from llmrec.io import RunDir
from serve.app import create_app
from serve.build_index import build_index
from serve.demo import run_demo
from serve.state import load_state


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
        return run_demo(cfg, run, progress)
    state = load_state(cfg, run)
    print(f"llmrec serve: {state.engine.name} engine, {len(state.index)} songs indexed, "
          f"http://{cfg.serve.host}:{cfg.serve.port} (auth {'on' if state.api_key else 'off'})")
    uvicorn.run(create_app(state), host=cfg.serve.host, port=cfg.serve.port, log_level="info")
    state.engine.close()
    return {"served": f"http://{cfg.serve.host}:{cfg.serve.port}"}
