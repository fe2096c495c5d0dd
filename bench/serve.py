"""Serving load test: a real `llmrec serve` on 127.0.0.1 per engine, closed-loop clients at several concurrencies.

    python bench/serve.py [--quick] [--engines hf,vllm] [--seconds S] [--concurrency 1,8,32]
                          [--hidden 128 --layers 2] [--run-dir DIR] [--reasons-in-flight N]
    python bench/serve.py --verified-reasons 8 [--reason-samples N] [--engines hf,vllm] [--run-dir DIR]

Without --run-dir it builds, in a temporary directory, the quick synthetic catalog with random media features and
an untrained tiny bundle (`testkit.tiny_bundle`; `--hidden/--layers` make the backbone wider), builds the index
once, then for each engine starts `python -m llmrec.cli serve` as a subprocess (the real CLI + uvicorn path) and
measures:
  - embeddings: `POST /v1/embeddings` with one catalog song per request;
  - reasons: `POST /v1/explanations` with 1-5 history songs (prompt ~60-250 tokens) and an answer budget of
    8, 32 or 96 tokens (an untrained model rarely stops early, so answers use their budget);
each for `--seconds` at every concurrency level (closed loop: each client sends its next request when the last
one is answered; after a 503 it first waits the Retry-After the server sent, unless --ignore-retry-after). With
`--reasons-in-flight N`, N reason clients (unreported) run alongside every embeddings level: embedding latency
while generation is busy.
With `--verified-reasons C`, instead: `POST /v1/recommendations` (k = 10, a reason each) at concurrency C on two
servers per engine, `serve.reason_samples=1` (the greedy reason only) and `--reason-samples` (default: the config's),
and the ratio of their p50s: what checking reasons and writing more than one costs.
The clients are aiohttp sessions: with httpx, one client process on these 2 shared cores could not keep 192
connections going (measured: client p50 6.3 s against the server's own 2.1 s at c=192; with aiohttp the two agree).
Reported: requests/s, p50/p99 latency of the answered requests as the client sees them, the server's own p50 (door
to response, from its `/metrics` histogram: a gap to the client's p50 is time spent outside the app), error counts
by status, useful tokens/s for reasons (tokens of the returned text), embeddings/s next to a matmul bound measured
in this run (bf16 and fp32 GEMM FLOP/s divided by 2 x LM parameters x mean prompt tokens: what the forward pass
would cost at peak GEMM speed), and the vLLM/HF ratios when both engines ran. Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
import httpx  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from llmrec.config import load_config  # noqa: E402
from llmrec.io import RunDir  # noqa: E402

ANSWER_BUDGETS = (8, 32, 96)
RECOMMENDATIONS_K = 10
RECOMMENDATION_REASON_TOKENS = 48  # serve.max_new_tokens' default


# ------------------------------------------------------------------------------------------------ setup

def build_run(work: Path, hidden: int, layers: int, quick: bool) -> RunDir:
    from data_prep.synthetic import generate_catalog
    from serve.build_index import build_index
    from serve.engines.hf import HFEngine
    from testkit.tiny_bundle import TINY_LM, build_tiny_bundle, make_serve_run, wide_lm

    cfg = load_config(extra_presets=["quick"], overrides=["synthetic.audio_seconds=1.0"])
    cfg.name = "bench-serve"
    cfg.serve.engine = "hf"
    cfg.serve.request_timeout_s = 120.0
    cfg.serve.max_new_tokens = max(ANSWER_BUDGETS)
    generate_catalog(cfg.synthetic, work / "catalog", seed=0, progress=False)
    lm = TINY_LM if (hidden, layers) == (TINY_LM.hidden_size, TINY_LM.num_layers) else wide_lm(hidden, layers)
    build_tiny_bundle(work / "bundle", lm_cfg=lm)
    run = make_serve_run(work / "run", work / "catalog", work / "bundle", cfg)
    engine = HFEngine(run.model / "bundle")
    build_index(cfg, run, engine, progress=False)
    return run


def matmul_flops(dtype: torch.dtype, n: int = 1024, reps: int = 5) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # warm-up
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def lm_params(run: RunDir) -> int:
    from safetensors import safe_open

    total = 0
    for f in (run.model / "bundle" / "lm").glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                if "lm_head" not in k and "embed_tokens" not in k:  # lookups, not GEMMs, for embeddings
                    total += int(np.prod(st.get_slice(k).get_shape()))
    return total


# ------------------------------------------------------------------------------------------------ server

class Server:
    def __init__(self, run: RunDir, engine: str, port: int, log: Path, overrides: list[str] = ()):
        self.url = f"http://127.0.0.1:{port}"
        self.log = open(log, "w")
        cmd = [sys.executable, "-m", "llmrec.cli", "serve", "--run-dir", str(run.root), "--port", str(port),
               "--set", f"serve.engine={engine}", "--set", f"serve.max_new_tokens={max(ANSWER_BUDGETS)}",
               "--no-progress", *(a for o in overrides for a in ("--set", o))]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; see {self.log.name}")
            try:
                return httpx.get(self.url + "/health", timeout=2).json()
            except httpx.HTTPError:
                time.sleep(0.5)
        raise RuntimeError(f"server not up after {timeout:.0f}s; see {self.log.name}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)  # uvicorn shuts down cleanly on SIGINT
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


def free_port() -> int:
    from serve.demo import free_port as fp

    return fp()


# ------------------------------------------------------------------------------------------------ load

LATENCY, REQUESTS = "llmrec_request_seconds", "llmrec_requests"


def server_latency(url: str, endpoint: str) -> tuple[dict[float, float], float]:
    """The server's own latency histogram for `endpoint` (upper bound -> cumulative count, from `/metrics`) and
    how many of those requests were refused with 503 (observed as 0 s at the door)."""
    from prometheus_client.parser import text_string_to_metric_families

    buckets, refused = {}, 0.0
    for family in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=30).text):
        for sample in family.samples:
            if sample.labels.get("endpoint") != endpoint:
                continue
            if sample.name == LATENCY + "_bucket":
                buckets[float(sample.labels["le"])] = sample.value
            elif sample.name == REQUESTS + "_total" and sample.labels.get("status") == "503":
                refused = sample.value
    return buckets, refused


def server_p50_ms(before: tuple[dict[float, float], float], after: tuple[dict[float, float], float]) -> float | None:
    """The median latency the server itself measured (door to response) for the requests it answered between two
    scrapes: Prometheus' `histogram_quantile` (linear inside a bucket), with the refused requests taken out of the
    lowest bucket. On these shared cores the gap to the client's p50 is time outside the app: the load generator
    and the HTTP server before the door."""
    refused = after[1] - before[1]
    bounds = sorted(after[0])
    counts = [after[0][b] - before[0].get(b, 0.0) - refused for b in bounds]
    total = counts[-1]
    if total <= 0:
        return None
    lower, below = 0.0, 0.0
    for bound, cumulative in zip(bounds, counts):
        if cumulative >= total / 2:
            if bound == float("inf"):
                return round(lower * 1000, 1)
            inside = cumulative - below
            return round((lower + (bound - lower) * (total / 2 - below) / inside) * 1000, 1)
        lower, below = bound, cumulative
    return None

def make_request(kind: str, ids: list[str], rng: random.Random) -> tuple[str, dict]:
    if kind == "embeddings":
        return "/v1/embeddings", {"input": [rng.choice(ids)]}
    history = rng.sample(ids, rng.randint(1, 5))
    if kind == "recommendations":  # top 10 with a reason each, at the server's default answer length
        return "/v1/recommendations", {"history": history, "k": RECOMMENDATIONS_K, "reasons": True,
                                       "max_new_tokens": RECOMMENDATION_REASON_TOKENS}
    return "/v1/explanations", {"history": history, "song_id": rng.choice(ids),
                                "max_new_tokens": rng.choice(ANSWER_BUDGETS)}


async def load(url: str, kind: str, ids: list[str], concurrency: int, seconds: float, tokenizer, seed: int,
               honour_retry_after: bool = True) -> dict:
    latencies, statuses, tokens, prompt_tokens = [], {}, 0, []
    stop_at = time.perf_counter() + seconds

    async def client(i: int, http: httpx.AsyncClient):
        nonlocal tokens
        rng = random.Random(seed * 1000 + i)
        while time.perf_counter() < stop_at:
            path, body = make_request(kind, ids, rng)
            t0 = time.perf_counter()
            data, retry_after = None, None
            try:
                async with http.post(path, json=body) as r:
                    code = r.status
                    retry_after = r.headers.get("retry-after")
                    data = await r.json() if code == 200 else await r.read()
            except aiohttp.ClientError as e:
                code = type(e).__name__
            dt = time.perf_counter() - t0
            statuses[code] = statuses.get(code, 0) + 1
            if code == 200:
                latencies.append(dt)
                if kind == "embeddings":
                    prompt_tokens.append(data["usage"]["prompt_tokens"])
                elif kind == "reasons":
                    tokens += len(tokenizer(data["reason"], add_special_tokens=False).input_ids)
            elif code == 503 and honour_retry_after:  # as a well-behaved client does (and no later than the end)
                wait = float(retry_after or 1)
                await asyncio.sleep(min(wait, max(0.0, stop_at - time.perf_counter())))

    t_start = time.perf_counter()
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(url, connector=connector, timeout=aiohttp.ClientTimeout(total=300)) as http:
        await asyncio.gather(*(client(i, http) for i in range(concurrency)))
    wall = time.perf_counter() - t_start
    lat = np.array(latencies) if latencies else np.array([np.nan])
    ok = statuses.get(200, 0)
    return {"concurrency": concurrency, "requests": sum(statuses.values()), "ok": ok,
            "errors": {str(k): v for k, v in statuses.items() if k != 200}, "seconds": round(wall, 2),
            "rps": round(ok / wall, 2), "p50_ms": round(float(np.percentile(lat, 50)) * 1000, 1),
            "p99_ms": round(float(np.percentile(lat, 99)) * 1000, 1),
            "tokens_per_s": round(tokens / wall, 1) if kind == "reasons" else None,
            "mean_prompt_tokens": round(float(np.mean(prompt_tokens)), 1) if prompt_tokens else None}


async def load_beside_reasons(url: str, ids: list[str], concurrency: int, seconds: float, tokenizer, seed: int,
                              reasons: int, honour_retry_after: bool) -> dict:
    """The embeddings load while `reasons` closed-loop explanation clients keep generation busy (not reported)."""
    emb, _ = await asyncio.gather(
        load(url, "embeddings", ids, concurrency, seconds, tokenizer, seed, honour_retry_after),
        load(url, "reasons", ids, reasons, seconds, tokenizer, seed + 7919, honour_retry_after))
    return emb


def bench_engine(run: RunDir, engine: str, levels: list[int], seconds: float, tokenizer, ids: list[str],
                 startup_timeout: float, overrides: list[str] = (), honour_retry_after: bool = True,
                 reasons_in_flight: int = 0) -> dict:
    server = Server(run, engine, free_port(), run.root / f"server-{engine}.log", overrides)
    try:
        t0 = time.perf_counter()
        health = server.wait(startup_timeout)
        startup = time.perf_counter() - t0
        asyncio.run(load(server.url, "reasons", ids, 2, 1.0, tokenizer, seed=99))  # warm-up, not reported
        out = {"engine": health["engine"], "startup_s": round(startup, 1), "embeddings": [], "reasons": []}
        for kind in ("embeddings", "reasons"):
            endpoint = "/v1/embeddings" if kind == "embeddings" else "/v1/explanations"
            for c in levels:
                before = server_latency(server.url, endpoint)
                if kind == "embeddings" and reasons_in_flight:
                    res = asyncio.run(load_beside_reasons(server.url, ids, c, seconds, tokenizer, c,
                                                          reasons_in_flight, honour_retry_after))
                else:
                    res = asyncio.run(load(server.url, kind, ids, c, seconds, tokenizer, seed=c,
                                           honour_retry_after=honour_retry_after))
                res["server_p50_ms"] = server_p50_ms(before, server_latency(server.url, endpoint))
                out[kind].append(res)
                print(f"  {engine:5s} {kind:10s} c={c:<3d} {res['rps']:8.2f} req/s  p50 {res['p50_ms']:8.1f} ms  "
                      f"(server {res['server_p50_ms']} ms)  p99 {res['p99_ms']:8.1f} ms  errors {res['errors'] or 0}"
                      + (f"  {res['tokens_per_s']:.0f} tok/s" if kind == "reasons" else ""), flush=True)
        return out
    finally:
        server.stop()


def bench_verified_reasons(run: RunDir, engine: str, levels: list[int], seconds: float, tokenizer, ids: list[str],
                           startup_timeout: float, overrides: list[str], samples: int) -> dict:
    """`/v1/recommendations` (k = 10, a reason each) on two servers, one after the other: `serve.reason_samples=1`
    (the greedy reason alone; the closest to the unverified reasons before evidence checking, whose evidence
    building and claim check cost microseconds beside generation) and `serve.reason_samples=samples` (the greedy
    reason and samples - 1 sampled ones, the first whose claims all hold returned). Returns both levels' results and
    the p50 ratio per concurrency."""
    out: dict = {}
    for n in sorted({1, samples}):
        server = Server(run, engine, free_port(), run.root / f"server-{engine}-samples{n}.log",
                        [*overrides, f"serve.reason_samples={n}"])
        try:
            server.wait(startup_timeout)
            asyncio.run(load(server.url, "recommendations", ids, 1, 1.0, tokenizer, seed=99))  # warm-up
            out[n] = {}
            for c in levels:
                res = asyncio.run(load(server.url, "recommendations", ids, c, seconds, tokenizer, seed=c))
                out[n][c] = res
                print(f"  {engine:5s} recommendations reason_samples={n} c={c:<3d} {res['rps']:6.2f} req/s  "
                      f"p50 {res['p50_ms']:8.1f} ms  p99 {res['p99_ms']:8.1f} ms  errors {res['errors'] or 0}",
                      flush=True)
        finally:
            server.stop()
    ratio = {c: round(out[samples][c]["p50_ms"] / out[1][c]["p50_ms"], 3) for c in levels}
    return {"levels": {f"samples{n}_c{c}": {k: r[k] for k in ("rps", "p50_ms", "p99_ms", "errors")}
                       for n, by_c in out.items() for c, r in by_c.items()},
            "p50_verified_over_greedy_only": {f"c{c}": v for c, v in ratio.items()}}


# ------------------------------------------------------------------------------------------------ main

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="3 s per level instead of --seconds")
    ap.add_argument("--engines", default="hf", help="comma-separated: hf, vllm")
    ap.add_argument("--seconds", type=float, default=20.0, help="duration of each (workload, concurrency) level")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--hidden", type=int, default=128, help="backbone width of the untrained bundle")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--run-dir", help="serve this run (bundle + index + catalog + features) instead of a tiny one")
    ap.add_argument("--startup-timeout", type=float, default=600.0)
    ap.add_argument("--serve-set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override for every server, e.g. serve.vllm_max_num_batched_tokens=512")
    ap.add_argument("--ignore-retry-after", action="store_true",
                    help="clients resend at once after a 503 instead of waiting Retry-After (a hostile overload)")
    ap.add_argument("--reasons-in-flight", type=int, default=0, metavar="N",
                    help="N reason clients run alongside each embeddings level (embedding latency under generation)")
    ap.add_argument("--verified-reasons", metavar="C1,C2",
                    help="instead of the embeddings/reasons levels: /v1/recommendations (k = 10 with reasons) at "
                         "these concurrencies, with serve.reason_samples=1 vs --reason-samples, p50 ratio")
    ap.add_argument("--reason-samples", type=int, default=None,
                    help="reasons written per candidate for --verified-reasons (default: serve.reason_samples)")
    args = ap.parse_args()
    seconds = 3.0 if args.quick else args.seconds
    levels = [int(c) for c in args.concurrency.split(",")]
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]

    bounds = {"bf16": matmul_flops(torch.bfloat16), "fp32": matmul_flops(torch.float32)}
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        run = RunDir(Path(args.run_dir)) if args.run_dir else build_run(Path(tmp), args.hidden, args.layers, args.quick)
        from transformers import AutoTokenizer

        from serve.index import read_index_meta

        tokenizer = AutoTokenizer.from_pretrained(run.model / "bundle" / "lm")
        ids = read_index_meta(run.index)["song_ids"]
        params = lm_params(run)
        print(f"bundle: {params / 1e6:.2f}M LM parameters (GEMM), {len(ids)} songs; {seconds:g} s per level; "
              f"GEMM bound bf16 {bounds['bf16'] / 1e9:.1f} GFLOP/s, fp32 {bounds['fp32'] / 1e9:.1f} GFLOP/s")
        if args.verified_reasons:
            samples = args.reason_samples or load_config().serve.reason_samples
            rec_levels = [int(c) for c in args.verified_reasons.split(",")]
            verified = {e: bench_verified_reasons(run, e, rec_levels, seconds, tokenizer, ids, args.startup_timeout,
                                                  args.serve_set, samples) for e in engines}
            print(json.dumps({"lm_params": params, "songs": len(ids), "seconds_per_level": seconds,
                              "reason_samples": samples, "engines": verified,
                              "load_average_1min": round(os.getloadavg()[0], 2)}))
            return 0
        results = {e: bench_engine(run, e, levels, seconds, tokenizer, ids, args.startup_timeout, args.serve_set,
                                   honour_retry_after=not args.ignore_retry_after,
                                   reasons_in_flight=args.reasons_in_flight) for e in engines}

    print(f"\n{'engine':6s} {'workload':10s} {'conc':>4s} {'req/s':>8s} {'p50 ms':>8s} {'p99 ms':>8s} "
          f"{'tok/s':>7s} {'emb/s':>7s} {'GEMM bound':>10s} {'of bound':>8s}  errors")
    summary: dict = {"lm_params": params, "songs": len(ids), "seconds_per_level": seconds,
                     "clients_honour_retry_after": not args.ignore_retry_after,
                     "reasons_in_flight_during_embeddings": args.reasons_in_flight,
                     "gemm_gflops": {k: round(v / 1e9, 2) for k, v in bounds.items()}, "engines": {}}
    for e, res in results.items():
        eng = summary["engines"][e] = {"startup_s": res["startup_s"]}
        for kind in ("embeddings", "reasons"):
            for r in res[kind]:
                per_song = 2 * params * (r["mean_prompt_tokens"] or 0)  # forward FLOPs of one embedding
                bound = {k: v / per_song for k, v in bounds.items()} if kind == "embeddings" and per_song else None
                best = max(bound.values()) if bound else None
                of_bound = f"{r['rps'] / best:.3f}" if best else "-"
                print(f"{e:6s} {kind:10s} {r['concurrency']:4d} {r['rps']:8.2f} {r['p50_ms']:8.1f} {r['p99_ms']:8.1f} "
                      f"{(r['tokens_per_s'] or 0):7.0f} {(r['rps'] if kind == 'embeddings' else 0):7.1f} "
                      f"{(f'{best:.0f}' if best else '-'):>10s} {of_bound:>8s}  {r['errors'] or 0}")
                key = f"{kind}_c{r['concurrency']}"
                eng[key] = {k: r[k] for k in ("rps", "p50_ms", "server_p50_ms", "p99_ms", "errors", "tokens_per_s")
                            if r[k] is not None}
                if bound:
                    eng[key].update({"mean_prompt_tokens": r["mean_prompt_tokens"],
                                     "bf16_bound_emb_per_s": round(bound["bf16"], 1),
                                     "fp32_bound_emb_per_s": round(bound["fp32"], 1),
                                     "of_bf16_bound": round(r["rps"] / bound["bf16"], 4),
                                     "of_best_gemm_bound": round(r["rps"] / best, 4)})
    if "hf" in results and "vllm" in results:
        top = max(levels)
        hf, vl = summary["engines"]["hf"], summary["engines"]["vllm"]
        summary["vllm_over_hf"] = {
            f"reason_tokens_per_s_c{top}": round(vl[f"reasons_c{top}"]["tokens_per_s"] /
                                                 max(hf[f"reasons_c{top}"]["tokens_per_s"], 1e-9), 3),
            f"reason_p99_c{top}": round(vl[f"reasons_c{top}"]["p99_ms"] / hf[f"reasons_c{top}"]["p99_ms"], 3),
            f"embeddings_per_s_c{top}": round(vl[f"embeddings_c{top}"]["rps"] /
                                              max(hf[f"embeddings_c{top}"]["rps"], 1e-9), 3),
        }
    summary["errors_total"] = sum(sum(r["errors"].values()) for res in results.values()
                                  for kind in ("embeddings", "reasons") for r in res[kind])
    summary["load_average_1min"] = round(os.getloadavg()[0], 2)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
