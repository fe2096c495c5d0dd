"""What checking reasons costs at serving time: `/v1/recommendations` (k reasons per request) with one answer per
reason (`serve.reason_samples=1`: the greedy answer, still checked) and with the default two (greedy + one sampled),
on the same run, side by side, at one concurrency.

    python bench/reasons.py --run-dir runs/demo [--engines hf,vllm] [--k 10] [--concurrency 8] [--seconds 30]

Issue #19's latency target: p50 with verified reasons (the default) <= 2x the p50 of the unchecked greedy reason of
before. That path no longer exists (its prompt had no evidence lines: ~190 instead of ~300 SmolLM2 tokens on the
demo), so the nearest reference measured here is `reason_samples=1`. Prints a table and one JSON line; reports where
each reason came from (`reason_source`) as the server counted it.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402
import numpy as np  # noqa: E402

from bench.serve import Server, free_port  # noqa: E402
from llmrec.io import RunDir  # noqa: E402
from llmrec.schema import load_catalog  # noqa: E402


async def load(url: str, users: list[str], k: int, concurrency: int, seconds: float, seed: int) -> dict:
    latencies, sources, errors = [], Counter(), Counter()
    stop_at = time.perf_counter() + seconds

    async def client(i: int, http: httpx.AsyncClient):
        rng = random.Random(seed * 1000 + i)
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            r = await http.post("/v1/recommendations", json={"user_id": rng.choice(users), "k": k})
            if r.status_code != 200:
                errors[r.status_code] += 1
                continue
            latencies.append(time.perf_counter() - t0)
            sources.update(item.get("reason_source", "none") for item in r.json()["data"])

    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        await asyncio.gather(*(client(i, http) for i in range(concurrency)))
    lat = np.array(latencies) if latencies else np.array([np.nan])
    total = sum(sources.values()) or 1
    return {"requests": len(latencies), "p50_ms": round(float(np.percentile(lat, 50)) * 1000, 1),
            "p99_ms": round(float(np.percentile(lat, 99)) * 1000, 1), "errors": dict(errors),
            "sources": {s: round(n / total, 3) for s, n in sorted(sources.items())}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", required=True, help="a trained run with an index (llmrec demo / serve --build-index)")
    ap.add_argument("--engines", default="hf")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--startup-timeout", type=float, default=600.0)
    ap.add_argument("--timeout", type=float, default=900.0, help="serve.request_timeout_s of the servers")
    args = ap.parse_args()
    run = RunDir(Path(args.run_dir))
    catalog = load_catalog(run.catalog)
    users = sorted(catalog.interactions["user_id"].astype(str).unique())
    results: dict = {}
    for engine in [e.strip() for e in args.engines.split(",") if e.strip()]:
        for samples in (1, 2):
            server = Server(run, engine, free_port(), run.root / f"bench-reasons-{engine}-{samples}.log",
                            # CPU answers to k=10 reasons take tens of seconds: no 504 at the default 30 s
                            [f"serve.reason_samples={samples}", f"serve.request_timeout_s={args.timeout}"])
            try:
                server.wait(args.startup_timeout)
                asyncio.run(load(server.url, users, args.k, 1, 1.0, seed=99))  # warm-up, not reported
                res = asyncio.run(load(server.url, users, args.k, args.concurrency, args.seconds, seed=samples))
            finally:
                server.stop()
            results[f"{engine}/samples={samples}"] = res
            print(f"{engine:5s} reason_samples={samples}  {res['requests']:4d} requests  p50 {res['p50_ms']:8.1f} ms  "
                  f"p99 {res['p99_ms']:8.1f} ms  sources {res['sources']}  errors {res['errors'] or 0}", flush=True)
        one, two = results[f"{engine}/samples=1"], results[f"{engine}/samples=2"]
        results[f"{engine}/p50_ratio"] = round(two["p50_ms"] / one["p50_ms"], 3) if one["p50_ms"] else None
    print(json.dumps({"k": args.k, "concurrency": args.concurrency, "seconds": args.seconds, **results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
