"""Feature-extraction throughput: one process vs a pool of single-threaded workers.

    python bench/features.py [--quick] [--workers N] [--songs N] [--rounds R]

On the synthetic catalog (generated into a temporary directory) with the tiny encoders, measures songs/s of
  1. one process, one torch thread, pinned to one core (the unit of the ideal; also reported unpinned, where
     its decode thread borrows an idle core);
  2. one process, torch threads = cores (intra-op parallelism);
  3. N independent processes at once, one thread each, each pinned to its own core with a fixed 1/N of the
     songs: what the machine delivers for N concurrent one-core extractions (`IndependentProcesses`);
  4. a pool of N worker processes with one torch thread each (what `llmrec features` runs), both in steady state
     (workers started and encoders loaded) and including worker start-up;
  5. cold, end to end, each in a fresh process (encoder loading and pool start-up included): the media alone, and
     the stage's whole work (media + text features) in one process with all cores, in the pool with the text
     after the media, and in the pool with the fork server started first and the text features computed while it
     imports torch (what `llmrec features` does);
and compares the pool with the ideal N x (single-thread rate). Modes 1-4 run in R interleaved rounds (each
round runs every mode once); the ratios are taken within each round and their median is reported with the
per-round values: on a shared host, back-to-back single runs spread as widely as the effect measured. Every mode
decodes, encodes and writes real shards with the code of data_prep/feature_workers.py. Prints a table, the peak RSS per
worker, and as its last line one JSON object with the figures.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, wait
from functools import partial
from pathlib import Path
from typing import Iterable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from data_prep import feature_workers, shards  # noqa: E402
from data_prep.synthetic import generate_catalog  # noqa: E402
from llmrec.config import Config, load_config  # noqa: E402
from llmrec.model.encoders import MediaEncoder, save_encoder  # noqa: E402
from llmrec.schema import Catalog  # noqa: E402
from llmrec.text_features import build_text_features  # noqa: E402


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def setup(cfg: Config, work: Path, songs: int | None
          ) -> tuple[list[shards.ShardTask], feature_workers.WorkerSpec, Catalog]:
    """Catalog + seeded tiny encoders saved as a run would have them; returns the shard plan and worker spec."""
    catalog = generate_catalog(cfg.synthetic, work / "catalog", seed=cfg.seed, progress=False)
    if songs:
        catalog.songs = catalog.songs.sort_values("song_id").head(songs)
    enc = MediaEncoder.load(cfg.model, seed=cfg.seed)
    save_encoder(enc.audio_model, work / "encoders" / "audio")
    save_encoder(enc.image_model, work / "encoders" / "image")
    spec = feature_workers.WorkerSpec(cfg.model, str(work / "encoders"), cfg.seed, "bench",
                                      cfg.features.max_audio_seconds, cfg.features.min_audio_seconds,
                                      cfg.features.max_image_pixels)
    return shards.plan_shards(catalog, cfg.features.shard_size, work), spec, catalog


def retarget(tasks: list[shards.ShardTask], out: Path) -> list[shards.ShardTask]:
    out.mkdir(parents=True, exist_ok=True)
    return [shards.ShardTask(t.index, str(out / shards.shard_name(t.index)), t.songs) for t in tasks]


def timed_in_process(spec, tasks, threads: int, one_core: bool = False) -> dict:
    """Encoders loaded and a warm-up shard written first (not timed), then every shard decoded, encoded and
    written in this process.

    `one_core`: pinned to one CPU, so that the rate is one core's. With one torch thread the process still runs a
    decode thread (ShardExtractor overlaps decoding with encoding), which, unpinned, uses another core; a pool
    worker's decode thread has no idle core to use, so only the pinned rate is a fair unit for the ideal."""
    before = os.sched_getaffinity(0)
    if one_core:
        os.sched_setaffinity(0, {min(before)})  # this thread; the decode thread, started below, inherits it
    try:
        torch.set_num_threads(threads)
        # a fresh one, so that its decode thread starts under `one_core`
        extractor = feature_workers.ShardExtractor(spec)
        extractor.write_shard(tasks[0])  # warm-up: first-call allocations, lazy imports
        t0 = time.perf_counter()
        n = sum(len(extractor.write_shard(t)["song_ids"]) for t in tasks)
        seconds = time.perf_counter() - t0
    finally:
        os.sched_setaffinity(0, before)
    return {"songs_per_s": n / seconds, "seconds": seconds}


def _ping(delay: float) -> int:
    time.sleep(delay)
    return os.getpid()


def start_pool(spec, workers: int, start_method: str) -> tuple[ProcessPoolExecutor, float]:
    """The pool `llmrec features` runs, started and with the encoders loaded in every worker; returns it and the
    seconds that took."""
    t_start = time.perf_counter()
    # the context `llmrec features` uses (server preloads included)
    ctx = feature_workers.start_fork_server(start_method)
    ex = ProcessPoolExecutor(workers, mp_context=ctx, initializer=feature_workers.init_worker,
                             initargs=(spec, os.getpid()))
    pids: set[int] = set()
    while len(pids) < workers:  # each ping holds a worker, so `workers` pings reach every worker
        pids |= {f.result() for f in [ex.submit(_ping, 0.3) for _ in range(workers)]}
    return ex, time.perf_counter() - t_start


def peak_by_pid(readings: Iterable[tuple[int, float]]) -> dict[int, float]:
    """The highest peak-RSS reading (MB) of each worker process, from (pid, MB) pairs."""
    peaks: dict[int, float] = {}
    for pid, mb in readings:
        peaks[pid] = max(peaks.get(pid, 0.0), mb)
    return peaks


def timed_pool(ex: ProcessPoolExecutor, tasks) -> dict:
    """Steady state: every shard through the started pool."""
    t0 = time.perf_counter()
    futures = [ex.submit(feature_workers.run_shard, t) for t in tasks]
    wait(futures)
    seconds = time.perf_counter() - t0
    results = [f.result() for f in futures]
    n = sum(len(r["song_ids"]) for r in results)
    return {"songs_per_s": n / seconds, "seconds": seconds,
            "peak_rss_mb": peak_by_pid((r["pid"], r["peak_rss_mb"]) for r in results)}


def _independent_worker(spec, core: int, conn) -> None:
    """One of `IndependentProcesses`: pinned to `core`, one torch thread, encoders loaded once; writes each list
    of shards it is sent and answers (songs, start, end) on the shared monotonic clock."""
    os.sched_setaffinity(0, {core})  # before the decode thread starts, so that it inherits the pinning
    torch.set_num_threads(1)
    feature_workers.quiet_hf_progress()
    extractor = feature_workers.ShardExtractor(spec)
    conn.send("ready")
    while (tasks := conn.recv()) is not None:
        t0 = time.perf_counter()  # CLOCK_MONOTONIC: one clock for every process of this machine
        n = sum(len(extractor.write_shard(t)["song_ids"]) for t in tasks)
        conn.send((n, t0, time.perf_counter()))


class IndependentProcesses:
    """N single-thread processes, each pinned to its own core and given a fixed 1/N of the songs, sharing
    nothing (no pool, no queue, no fork server): what this machine delivers when N one-core extractions run at
    once. The issue's ideal (N x one process alone) assumes that running N at once costs nothing; on a VM whose
    cores share a host's caches, memory bandwidth or clock boost it does, and this mode measures by how much, so
    that the pool's own overhead (pool / this) can be told apart from the hardware's (this / ideal)."""

    def __init__(self, spec, workers: int):
        ctx = mp.get_context("spawn")
        allowed = sorted(os.sched_getaffinity(0))
        self.conns, self.procs = [], []
        for i in range(workers):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_independent_worker, args=(spec, allowed[i % len(allowed)], child), daemon=True)
            proc.start()
            self.conns.append(parent)
            self.procs.append(proc)
        for conn in self.conns:
            if conn.recv() != "ready":
                raise RuntimeError("an independent bench process failed to start")

    def split(self, tasks, out: Path) -> list[list[shards.ShardTask]]:
        """Worker i gets songs i, i+N, ... of every shard, so that each has the same number of songs (+-1)."""
        n = len(self.conns)
        parts = []
        for i in range(n):
            (out / f"process_{i}").mkdir(parents=True, exist_ok=True)
            parts.append([shards.ShardTask(t.index, str(out / f"process_{i}" / shards.shard_name(t.index)),
                                            t.songs[i::n]) for t in tasks if t.songs[i::n]])
        return parts

    def run(self, tasks, out: Path) -> dict:
        for conn, part in zip(self.conns, self.split(tasks, out)):
            conn.send(part)
        answers = [conn.recv() for conn in self.conns]
        n = sum(a[0] for a in answers)
        seconds = max(a[2] for a in answers) - min(a[1] for a in answers)
        return {"songs_per_s": n / seconds, "seconds": seconds}

    def close(self) -> None:
        for conn in self.conns:
            conn.send(None)
        for proc in self.procs:
            proc.join(timeout=30)


STEADY_MODES = ["one_core", "unpinned", "all_cores", "independent", "pool"]


def steady_rounds(tasks, spec, workers: int, n_cores: int, start_method: str, rounds: int, work: Path) -> dict:
    """The steady-state modes, interleaved: each round runs every mode once over the whole catalog, so that a
    change in the shared host's speed hits all modes of a round alike, and the ratios are taken within a round.
    Encoders are loaded (in this process and in each worker) before any clock starts."""
    independent = IndependentProcesses(spec, workers)
    independent.run(tasks[:1], work / "independent_warmup")  # first-call allocations, lazy imports
    ex, startup = start_pool(spec, workers, start_method)
    runs: dict[str, list[dict]] = {m: [] for m in STEADY_MODES}
    try:
        for r in range(rounds):
            out = work / f"round_{r}"
            runs["one_core"].append(timed_in_process(spec, retarget(tasks, out / "one_core"), 1, one_core=True))
            runs["unpinned"].append(timed_in_process(spec, retarget(tasks, out / "unpinned"), 1))
            runs["all_cores"].append(timed_in_process(spec, retarget(tasks, out / "all_cores"), n_cores))
            runs["independent"].append(independent.run(tasks, out / "independent"))
            torch.set_num_threads(1)
            runs["pool"].append(timed_pool(ex, retarget(tasks, out / "pool")))
            rates = {m: runs[m][-1]["songs_per_s"] for m in STEADY_MODES}
            print(f"round {r + 1}/{rounds}: " + ", ".join(f"{m} {v:.1f}" for m, v in rates.items())
                  + f" songs/s; pool / ideal {rates['pool'] / (workers * rates['one_core']):.3f}, "
                  f"pool / independent {rates['pool'] / rates['independent']:.3f}, "
                  f"pool / all cores {rates['pool'] / rates['all_cores']:.3f}", flush=True)
    finally:
        ex.shutdown()
        independent.close()
    rss = peak_by_pid(item for run in runs["pool"] for item in run["peak_rss_mb"].items())
    return {"runs": runs, "startup_s": startup, "peak_rss_mb": rss}


def per_round(runs: dict, numerator: str, denominator: str, factor: float = 1.0) -> list[float]:
    return [a["songs_per_s"] / (factor * b["songs_per_s"]) for a, b in zip(runs[numerator], runs[denominator])]


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
    feature_workers.quiet_hf_progress()
    torch.set_num_threads(cores())  # text features and the one-process media use every core; pool shards use one
    t0 = time.perf_counter()
    songs = []
    on_done = lambda record: songs.append(len(record["song_ids"]))  # noqa: E731
    text = partial(build_text_features, catalog, cfg, out_dir, progress=False)
    if use_pool and text_when == "before":
        feature_workers.start_fork_server("forkserver")
    if text_when == "before":
        text()
    if use_pool:
        feature_workers.run_pool(tasks, spec, workers, on_done)
    else:
        feature_workers.run_in_process(tasks, spec, on_done, threads=cores())
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
    ap.add_argument("--rounds", type=int, default=3,
                    help="interleaved rounds of the steady-state modes; ratios are per round, then the median")
    args = ap.parse_args()

    overrides = [f"features.shard_size={args.shard_size}"] if args.shard_size else []
    cfg = load_config(extra_presets=["quick"] if args.quick else [], overrides=overrides)
    feature_workers.quiet_hf_progress()
    n_cores = cores()
    workers = args.workers or n_cores
    with tempfile.TemporaryDirectory(prefix="bench-features-") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        tasks, spec, catalog = setup(cfg, work, args.songs or None)
        n_songs = len(catalog.songs)
        print(f"catalog: {n_songs} songs of {cfg.synthetic.audio_seconds:g} s audio + {cfg.synthetic.cover_size} px "
              f"covers, {len(tasks)} shards of {min(len(t.songs) for t in tasks)}-{max(len(t.songs) for t in tasks)} "
              f"songs "
              f"(shard_size {cfg.features.shard_size}); set up in {time.perf_counter() - t0:.1f}s; "
              f"{n_cores} cores, load average {os.getloadavg()[0]:.2f}", flush=True)
        steady = steady_rounds(tasks, spec, workers, n_cores, args.start_method, max(1, args.rounds), work)
        cold = {}
        for i, mode in enumerate(COLD_MODES):
            out_dir = work / f"cold_{i}"
            cold[mode[0]] = end_to_end(retarget(tasks, out_dir), spec, mode, workers, catalog, cfg, out_dir)
            print(f"cold, end to end, {mode[0]}: {cold[mode[0]]['seconds']:.1f}s", flush=True)
    runs = steady["runs"]
    median = {m: statistics.median(r["songs_per_s"] for r in runs[m]) for m in STEADY_MODES}
    efficiency = per_round(runs, "pool", "one_core", workers)
    vs_all_cores = per_round(runs, "pool", "all_cores")
    vs_independent = per_round(runs, "pool", "independent")
    capacity = per_round(runs, "independent", "one_core", workers)
    ideal = workers * median["one_core"]
    pool_seconds = statistics.median(r["seconds"] for r in runs["pool"])
    with_startup = n_songs / (pool_seconds + steady["startup_s"])
    main_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0

    def rate_row(name: str, mode: str, rss: str = "") -> tuple:
        rates = [r["songs_per_s"] for r in runs[mode]]
        return (name, median[mode], f"{min(rates):.1f}-{max(rates):.1f}", f"{median[mode] / median['one_core']:.2f}",
                rss)

    rows = [
        rate_row("1 process x 1 thread, one core", "one_core", f"{main_rss:.0f} (main process)"),
        rate_row("1 process x 1 thread, unpinned (decode: 2nd core)", "unpinned"),
        rate_row(f"1 process x {n_cores} threads", "all_cores", f"{main_rss:.0f} (main process)"),
        rate_row(f"{workers} independent pinned processes at once", "independent"),
        rate_row(f"{workers}-worker pool x 1 thread", "pool",
                 ", ".join(f"{v:.0f}" for v in steady["peak_rss_mb"].values())),
        (f"  incl. worker start-up ({steady['startup_s']:.1f}s)", with_startup, "",
         f"{with_startup / median['one_core']:.2f}", ""),
        (f"ideal: {workers} x single-thread rate", ideal, "", f"{workers:.2f}", ""),
        *[(f"cold {mode}", r["songs_per_s"], "", f"{r['songs_per_s'] / median['one_core']:.2f}", "")
          for mode, r in cold.items()],
    ]
    print()
    print(f"steady state: median of {len(efficiency)} interleaved rounds (range across rounds); cold: one run each")
    print(f"{'mode':50s} {'songs/s':>9s} {'range':>11s} {'x 1 thread':>10s}  peak RSS MB per worker")
    for name, rate, spread, speed, rss in rows:
        print(f"{name:50s} {rate:9.1f} {spread:>11s} {speed:>10s}  {rss}")
    print(f"pool / ideal per round: {', '.join(f'{e:.3f}' for e in efficiency)}; "
          f"pool / all-cores process per round: {', '.join(f'{v:.3f}' for v in vs_all_cores)}")
    print(f"what running {workers} at once costs the hardware (independent / ideal) per round: "
          f"{', '.join(f'{v:.3f}' for v in capacity)}; the pool's own overhead (pool / independent) per round: "
          f"{', '.join(f'{v:.3f}' for v in vs_independent)}")
    result = {
        "songs": n_songs,
        "cores": n_cores,
        "workers": workers,
        "start_method": args.start_method,
        "rounds": len(efficiency),
        "one_thread_songs_per_s": round(median["one_core"], 2),
        "one_thread_unpinned_songs_per_s": round(median["unpinned"], 2),
        "one_process_all_cores_songs_per_s": round(median["all_cores"], 2),
        "pool_songs_per_s": round(median["pool"], 2),
        "pool_songs_per_s_with_startup": round(with_startup, 2),
        "pool_startup_s": round(steady["startup_s"], 2),
        "ideal_songs_per_s": round(ideal, 2),
        "speedup_vs_one_process": round(statistics.median(vs_all_cores), 3),
        "speedup_vs_one_process_per_round": [round(v, 3) for v in vs_all_cores],
        "speedup_vs_one_thread": round(statistics.median(per_round(runs, "pool", "one_core")), 3),
        "efficiency_vs_ideal": round(statistics.median(efficiency), 3),
        "efficiency_vs_ideal_per_round": [round(e, 3) for e in efficiency],
        "independent_processes_songs_per_s": round(median["independent"], 2),
        "independent_vs_ideal": round(statistics.median(capacity), 3),
        "independent_vs_ideal_per_round": [round(v, 3) for v in capacity],
        "pool_vs_independent": round(statistics.median(vs_independent), 3),
        "pool_vs_independent_per_round": [round(v, 3) for v in vs_independent],
        "efficiency_vs_ideal_from_unpinned": round(statistics.median(per_round(runs, "pool", "unpinned", workers)), 3),
        "cold_end_to_end_songs_per_s": {m: round(r["songs_per_s"], 2) for m, r in cold.items()},
        "cold_media_speedup_vs_one_process": ratio(cold, "media: pool", "media: one process"),
        "cold_stage_speedup_vs_one_process": ratio(cold, "stage: pool, text while the pool starts",
                                                   "stage: one process"),
        "cold_stage_gain_of_early_pool_start": ratio(cold, "stage: pool, text while the pool starts",
                                                     "stage: pool, text after the media"),
        "peak_rss_mb_per_worker": {str(k): round(v, 1) for k, v in steady["peak_rss_mb"].items()},
        "load_average_1min": round(os.getloadavg()[0], 2),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
