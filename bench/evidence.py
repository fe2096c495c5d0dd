"""The evidence floor of reasons, per dataset: what the plain evidence sentence (the server's fallback, and what the
model is trained to phrase) can say for held-out plays, checked against the ground truth. No model is needed, so
this runs on the full lastfm-2k and nowplaying-rs2020 catalogs in minutes.

    python bench/evidence.py [--dataset synthetic|lastfm|nowplaying|all] [--cases 500] [--run-root runs/bench-evidence]

Per dataset: faithfulness and hallucination rate of the evidence sentences (1.0 / 0.0 unless the builder or the
checker is wrong), the share of reasons with at least one checkable claim (issue #19's target: >= 0.95 on the real
catalogs), unique share (>= 0.5), claims per reason, and how often each kind of evidence is available. Prints a
table and writes JSON (`--out`).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd  # noqa: E402

from bench.quality import DATASETS, dataset_config  # noqa: E402
from data_prep.prepare import build_catalog  # noqa: E402
from eval.reasons import ground_truth, reason_metrics, sample_cases  # noqa: E402
from llmrec.evidence import phrase  # noqa: E402
from llmrec.io import atomic_write_json, open_run_dir  # noqa: E402
from llmrec.schema import load_catalog, load_song_attributes  # noqa: E402
from llmrec.split import positive_plays, split_catalog  # noqa: E402
from serve.reasons import ReasonWriter  # noqa: E402


def measure(name: str, cases_n: int, run_root: Path) -> dict:
    cfg = dataset_config(name, quick=False)
    run = open_run_dir(run_root / name)
    if not (run.catalog / "songs.parquet").is_file():
        build_catalog(cfg, run, progress=False)  # the catalog only: no training examples are needed
    catalog = load_catalog(run.catalog)
    split = split_catalog(catalog, cfg.eval.split, cfg.eval.valid_days)
    train = positive_plays(pd.concat([split.train, split.valid], ignore_index=True))
    t0 = time.perf_counter()
    cases, _ = sample_cases(catalog.songs, train, positive_plays(split.test), cases_n, cfg.seed, cfg.prompt)
    writer = ReasonWriter(cfg, {str(r["song_id"]): r for r in catalog.songs.to_dict("records")}, train)
    plans = [writer.plan(c.history, [c.song_id], c.user_id) for c in cases]
    shown = [p.cases[0][0].history_song_ids for p in plans]
    truth = ground_truth(writer, cases, shown, load_song_attributes(run.catalog))
    texts = [phrase(p.cases[0][1], bool(h)) for p, h in zip(plans, shown)]
    m = reason_metrics(texts, truth.check(texts))
    kinds = Counter(k for p in plans for k in {e.kind for e in p.cases[0][1]})
    return {"n": m["n"], "faithfulness": m["faithfulness"], "hallucination_rate": m["hallucination_rate"],
            "checkable_share": None if m["no_claim_share"] is None else 1 - m["no_claim_share"],
            "unique_share": m["unique_share"], "claims_per_reason": m["claims_per_reason"],
            "evidence_kinds": {k: round(v / max(len(plans), 1), 3) for k, v in sorted(kinds.items())},
            "samples": texts[:3], "seconds": round(time.perf_counter() - t0, 1)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", choices=[*DATASETS, "all"], default="all")
    p.add_argument("--cases", type=int, default=500)
    p.add_argument("--run-root", type=Path, default=Path("runs/bench-evidence"))
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    names = DATASETS if args.dataset == "all" else (args.dataset,)
    results = {name: measure(name, args.cases, args.run_root) for name in names}
    cols = ("n", "faithfulness", "hallucination_rate", "checkable_share", "unique_share", "claims_per_reason")
    print("| dataset | " + " | ".join(cols) + " | evidence kinds (share of reasons) |")
    print("|---" * (len(cols) + 2) + "|")
    for name, r in results.items():
        vals = [f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c]) for c in cols]
        print(f"| {name} | " + " | ".join(vals) + " | " + ", ".join(f"{k} {v}" for k, v in r["evidence_kinds"].items())
              + " |")
    out = args.out or args.run_root / "evidence.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, results)
    print(json.dumps({n: r["samples"] for n, r in results.items()}, indent=1, ensure_ascii=False))
    return results


if __name__ == "__main__":
    main()
