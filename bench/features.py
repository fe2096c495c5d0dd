"""Feature-extraction throughput: one process vs a pool of single-threaded workers.

    python bench/features.py [--quick] [--workers N] [--songs N]

On the synthetic catalog (generated into a temporary directory) with the tiny encoders, measures songs/s of
  1. one process, one torch thread, pinned to one core (the unit of the ideal; also reported unpinned, where
     its decode thread borrows an idle core);
  2. one process, torch threads = cores (intra-op parallelism);
  3. a pool of N worker processes with one torch thread each (what `llmrec features` runs), both in steady state
     (workers started and encoders loaded) and including worker start-up;
  4. cold, end to end, each in a fresh process (encoder loading and pool start-up included): the media alone, and
     the stage's whole work (media + text features) in one process with all cores, in the pool with the text
     after the media, and in the pool with the fork server started first and the text features computed while it
     imports torch (what `llmrec features` does);
and compares the pool with the ideal N x (single-thread rate). Every mode decodes, encodes and writes real
shards with the code of data_prep/extract.py. Prints a table, the peak RSS per worker, and as its last line one
JSON object with the figures.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, wait
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from data_prep import extract  # noqa: E402
from data_prep.synthetic import generate_catalog  # noqa: E402
from llmrec.config import Config, load_config  # noqa: E402
from llmrec.schema import Catalog  # noqa: E402
from llmrec.model.encoders import MediaEncoder, save_encoder  # noqa: E402


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def setup(cfg: Config, work: Path, songs: int | None) -> tuple[list[extract.ShardTask], extract.WorkerSpec, Catalog]:
    """Catalog + seeded tiny encoders saved as a run would have them; returns the shard plan and worker spec."""
    catalog = generate_catalog(cfg.synthetic, work / "catalog", seed=cfg.seed, progress=False)
    if songs:
        catalog.songs = catalog.songs.sort_values("song_id").head(songs)
    enc = MediaEncoder.load(cfg.model, seed=cfg.seed)
    save_encoder(enc.audio_model, work / "encoders" / "audio")
    save_encoder(enc.image_model, work / "encoders" / "image")
    spec = extract.WorkerSpec(cfg.model, str(work / "encoders"), cfg.seed, "bench", cfg.features.max_audio_seconds,
                              cfg.features.max_image_pixels)
    return extract.plan_shards(catalog, cfg.features.shard_size, work), spec, catalog


def retarget(tasks: list[extract.ShardTask], out: Path) -> list[extract.ShardTask]:
    out.mkdir(parents=True, exist_ok=True)
    return [extract.ShardTask(t.index, str(out / extract.shard_name(t.index)), t.songs) for t in tasks]


def in_process(tasks, spec, threads: int, one_core: bool = False) -> dict:
    """Encoders loaded first (not timed), then every shard decoded, encoded and written in this process.

    `one_core`: pinned to one CPU, so that the rate is one core's. With one torch thread the process still runs a
    decode thread (ShardExtractor overlaps decoding with encoding), which, unpinned, uses another core; a pool
    worker's decode thread has no idle core to use, so only the pinned rate is a fair unit for the ideal."""
    before = os.sched_getaffinity(0)
    if one_core:
        os.sched_setaffinity(0, {min(before)})  # this thread; the decode thread, started below, inherits it
    try:
        torch.set_num_threads(threads)
        extractor = extract.ShardExtractor(spec)
        extractor.write_shard(tasks[0])  # warm-up: first-call allocations, lazy imports
        t0 = time.perf_counter()
        n = sum(len(extractor.write_shard(t)["song_ids"]) for t in tasks)
        seconds = time.perf_counter() - t0
    finally:
        os.sched_setaffinity(0, before)
    return {"songs_per_s": n / seconds, "seconds": seconds, "peak_rss_mb": {os.getpid(): extract.peak_rss_mb()}}


def _ping(delay: float) -> int:
    time.sleep(delay)
    return os.getpid()


def pool(tasks, spec, workers: int, start_method: str) -> dict:
    """Steady state: the workers are started and have loaded the encoders before the clock starts."""
    t_start = time.perf_counter()
    ctx = extract.start_fork_server(start_method)  # the context `llmrec features` uses (server preloads included)
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=extract.init_worker,
                             initargs=(spec, os.getpid())) as ex:
        pids: set[int] = set()
        while len(pids) < workers:  # each ping holds a worker, so `workers` pings reach every worker
            pids |= {f.result() for f in [ex.submit(_ping, 0.3) for _ in range(workers)]}
        startup = time.perf_counter() - t_start
        t0 = time.perf_counter()
        futures = [ex.submit(extract.run_shard, t) for t in tasks]
        wait(futures)
        seconds = time.perf_counter() - t0
    results = [f.result() for f in futures]
    n = sum(len(r["song_ids"]) for r in results)
    rss: dict[int, float] = {}
    for r in results:
        rss[r["pid"]] = max(rss.get(r["pid"], 0.0), r["peak_rss_mb"])
    return {"songs_per_s": n / seconds, "seconds": seconds, "startup_s": startup,
            "songs_per_s_with_startup": n / (seconds + startup), "peak_rss_mb": rss}


# Cold, end-to-end modes: (name, pool?, when the text features run: None, "before" or "after" the media)
COLD_MODES = [
    ("media: one process", False, None),
    ("media: pool", True, None),
    ("stage: one process", False, "before"),
    ("stage: pool, text after the media", True, "after"),
    ("stage: pool, text while the pool starts", True, "before"),
]


def _end_to_end_child(tasks, spec, mode: tuple, workers: int, catalog, cfg, out_dir: Path, out) -> None:
    """In a fresh process (so the fork server starts cold, as in a real `llmrec features` run): encoders loaded,
    the pool started, every shard, and (for the `stage` modes) the text features on all cores, before or after the
    media. The clock starts after this process's imports, like a CLI run whose torch is already imported. With
    the text first, the pool modes start the fork server before it, as `llmrec features` does."""
    _, use_pool, text_when = mode
    extract._quiet_hf_progress()
    torch.set_num_threads(cores())  # text features and the one-process media use every core; pool shards use one
    t0 = time.perf_counter()
    songs = []
    on_done = lambda record: songs.append(len(record["song_ids"]))  # noqa: E731
    text = partial(extract.build_text_features, catalog, cfg, out_dir, progress=False)
    if use_pool and text_when == "before":
        extract.start_fork_server("forkserver")
    if text_when == "before":
        text()
    if use_pool:
        extract.run_pool(tasks, spec, workers, on_done)
    else:
        extract.run_in_process(tasks, spec, on_done, threads=cores())
    if text_when == "after":
        text()
    seconds = time.perf_counter() - t0
    out.put({"songs_per_s": sum(songs) / seconds, "seconds": seconds})


def end_to_end(tasks, spec, mode: tuple, workers: int, catalog, cfg, out_dir: Path) -> dict:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    proc = ctx.Process(target=_end_to_end_child, args=(tasks, spec, mode, workers, catalog, cfg, out_dir, out))
    proc.start()
    result = out.get()
    proc.join()
    return result


def ratio(cold: dict, a: str, b: str) -> float:
    return round(cold[a]["songs_per_s"] / cold[b]["songs_per_s"], 3)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the quick catalog (144 songs) instead of the default")
    ap.add_argument("--workers", type=int, default=0, help="pool size (default: one per core)")
    ap.add_argument("--songs", type=int, default=0, help="use only the first N songs")
    ap.add_argument("--shard-size", type=int, default=0,
                    help="songs per shard (default: features.shard_size; few shards per worker cap the pool's balance)")
    ap.add_argument("--start-method", default="forkserver", choices=["forkserver", "spawn"])
    args = ap.parse_args()

    overrides = [f"features.shard_size={args.shard_size}"] if args.shard_size else []
    cfg = load_config(extra_presets=["quick"] if args.quick else [], overrides=overrides)
    extract._quiet_hf_progress()
    n_cores = cores()
    workers = args.workers or n_cores
    with tempfile.TemporaryDirectory(prefix="bench-features-") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        tasks, spec, catalog = setup(cfg, work, args.songs or None)
        n_songs = len(catalog.songs)
        print(f"catalog: {n_songs} songs of {cfg.synthetic.audio_seconds:g} s audio + {cfg.synthetic.cover_size} px "
              f"covers, {len(tasks)} shards of {cfg.features.shard_size}; set up in {time.perf_counter() - t0:.1f}s; "
              f"{n_cores} cores, load average {os.getloadavg()[0]:.2f}", flush=True)
        one = in_process(retarget(tasks, work / "one_thread"), spec, threads=1, one_core=True)
        print(f"1 process x 1 thread, one core: {one['songs_per_s']:.1f} songs/s", flush=True)
        unpinned = in_process(retarget(tasks, work / "one_thread_unpinned"), spec, threads=1)
        print(f"1 process x 1 thread, unpinned: {unpinned['songs_per_s']:.1f} songs/s", flush=True)
        multi = in_process(retarget(tasks, work / "all_cores"), spec, threads=n_cores)
        print(f"1 process x {n_cores} threads: {multi['songs_per_s']:.1f} songs/s", flush=True)
        torch.set_num_threads(1)
        pooled = pool(retarget(tasks, work / "pool"), spec, workers, args.start_method)
        cold = {}
        for i, mode in enumerate(COLD_MODES):
            out_dir = work / f"cold_{i}"
            cold[mode[0]] = end_to_end(retarget(tasks, out_dir), spec, mode, workers, catalog, cfg, out_dir)
            print(f"cold, end to end, {mode[0]}: {cold[mode[0]]['seconds']:.1f}s", flush=True)
    ideal = workers * one["songs_per_s"]
    main_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0

    rows = [
        ("1 process x 1 thread, one core", one["songs_per_s"], one["seconds"], "1.00",
         f"{main_rss:.0f} (main process)"),
        ("1 process x 1 thread, unpinned (decode: 2nd core)", unpinned["songs_per_s"], unpinned["seconds"],
         f"{unpinned['songs_per_s'] / one['songs_per_s']:.2f}", ""),
        (f"1 process x {n_cores} threads", multi["songs_per_s"], multi["seconds"],
         f"{multi['songs_per_s'] / one['songs_per_s']:.2f}", f"{main_rss:.0f} (main process)"),
        (f"{workers}-worker pool x 1 thread", pooled["songs_per_s"], pooled["seconds"],
         f"{pooled['songs_per_s'] / one['songs_per_s']:.2f}",
         ", ".join(f"{v:.0f}" for v in pooled["peak_rss_mb"].values())),
        (f"  incl. worker start-up ({pooled['startup_s']:.1f}s)", pooled["songs_per_s_with_startup"],
         pooled["seconds"] + pooled["startup_s"], f"{pooled['songs_per_s_with_startup'] / one['songs_per_s']:.2f}", ""),
        (f"ideal: {workers} x single-thread rate", ideal, n_songs / ideal, f"{workers:.2f}", ""),
        *[(f"cold {mode}", r["songs_per_s"], r["seconds"], f"{r['songs_per_s'] / one['songs_per_s']:.2f}", "")
          for mode, r in cold.items()],
    ]
    print()
    print(f"{'mode':50s} {'songs/s':>9s} {'seconds':>8s} {'x 1 thread':>10s}  peak RSS MB per worker")
    for name, rate, sec, speed, rss in rows:
        print(f"{name:50s} {rate:9.1f} {sec:8.2f} {speed:>10s}  {rss}")
    result = {
        "songs": n_songs,
        "cores": n_cores,
        "workers": workers,
        "start_method": args.start_method,
        "one_thread_songs_per_s": round(one["songs_per_s"], 2),
        "one_thread_unpinned_songs_per_s": round(unpinned["songs_per_s"], 2),
        "one_process_all_cores_songs_per_s": round(multi["songs_per_s"], 2),
        "pool_songs_per_s": round(pooled["songs_per_s"], 2),
        "pool_songs_per_s_with_startup": round(pooled["songs_per_s_with_startup"], 2),
        "pool_startup_s": round(pooled["startup_s"], 2),
        "ideal_songs_per_s": round(ideal, 2),
        "speedup_vs_one_process": round(pooled["songs_per_s"] / multi["songs_per_s"], 3),
        "speedup_vs_one_thread": round(pooled["songs_per_s"] / one["songs_per_s"], 3),
        "efficiency_vs_ideal": round(pooled["songs_per_s"] / ideal, 3),
        "efficiency_vs_ideal_from_unpinned": round(pooled["songs_per_s"] / (workers * unpinned["songs_per_s"]), 3),
        "cold_end_to_end_songs_per_s": {m: round(r["songs_per_s"], 2) for m, r in cold.items()},
        "cold_media_speedup_vs_one_process": ratio(cold, "media: pool", "media: one process"),
        "cold_stage_speedup_vs_one_process": ratio(cold, "stage: pool, text while the pool starts",
                                                   "stage: one process"),
        "cold_stage_gain_of_early_pool_start": ratio(cold, "stage: pool, text while the pool starts",
                                                     "stage: pool, text after the media"),
        "peak_rss_mb_per_worker": {str(k): round(v, 1) for k, v in pooled["peak_rss_mb"].items()},
        "load_average_1min": round(os.getloadavg()[0], 2),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
