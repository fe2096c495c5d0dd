"""Training examples for stages 1 and 2, built by `llmrec prepare` into `runs/<name>/examples/`.

```
examples/stage1/   {song_id, prompt, answer, audio_song_ids, cover_song_ids}          one caption per song
examples/stage2/   {user_id, song_id, timestamp, history_song_ids, history_timestamps, prompt, answer,
                    evidence, audio_song_ids, cover_song_ids}                          recommendation reasons
examples/pairs/    {song_id, cf_factor, pos_song_id}                                  CF alignment + co-listening
examples/meta.json counts, skips, sanitiser stats, the split, the prompt/example config
```

Leakage rule: everything built from interactions — stage-2 histories and candidates, ALS factors, co-listened
positives — comes from the TRAIN part of `llmrec.split.split_catalog` (the split eval uses), positives only
(`skip` events are not plays), minus the validation plays eval tunes on (`llmrec.split.tuning_split`; keep them
with `examples.hold_out_tuning_plays: false`, e.g. for a final production model that is not tuned afterwards).
Stage-1 captions use song content only, and by default leave out cold songs (first play at/after the split time, or
released at/after it), so the cold-start slice stays unseen.

Answers are grounded. Stage-1 captions: on the synthetic catalog from the ground truth in `song_attributes.parquet`
(audio attributes only when the song has audio, mood only when it has a cover); on real catalogs from genres and
the artist only. Stage-2 reasons state only evidence the prompt lists (`llmrec.evidence`); `evidence` holds those
items as JSON, one per string.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from llmrec.config import Config
from llmrec.evidence import EvidenceBuilder, reason_example
from llmrec.io import RunDir, atomic_dir, atomic_write_json
from llmrec.schema import Catalog, load_catalog
from llmrec.split import Split, example_plays, positive_plays, split_catalog
from llmrec.text import SongText, build_stage1_prompt, sanitize_song, song_media

# The modality a model needs to perceive each caption attribute (a caption states audio attributes only when the
# song has audio, mood only when it has a cover).
NEEDS = {"tempo_class": "audio", "instrument": "audio", "mode": "audio", "mood": "cover"}
TEMPO_WORDS = {"slow": "slow", "medium": "mid-tempo", "fast": "fast"}
INSTRUMENT_WORDS = {"strings": "string"}
GENRE_WORDS = {"hiphop": "hip-hop", "rnb": "R&B"}


@dataclass
class Examples:
    stage1: list[dict[str, Any]]
    stage2: list[dict[str, Any]]
    pairs: list[dict[str, Any]]
    meta: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------- attributes

def song_attributes(songs: dict[str, SongText], truth: pd.DataFrame | None = None) -> dict[str, dict[str, str]]:
    """Per song, the attributes answers may state. Synthetic: the ground truth (genre, instrument, tempo_class,
    mood, mode) plus the artist; real catalogs: the first genre and the artist (sanitised as in the prompt)."""
    attrs: dict[str, dict[str, str]] = {}
    for s in songs.values():
        a = {"artist": s.artist}
        if s.genres:
            a["genre"] = s.genres[0]
        attrs[s.song_id] = a
    if truth is not None:
        for row in truth.to_dict("records"):
            if row["song_id"] in attrs:
                attrs[row["song_id"]].update({k: str(row[k]) for k in ("genre", "instrument", "tempo_class", "mood",
                                                                       "mode") if k in row and not pd.isna(row[k])})
    return attrs


def _visible(attrs: dict[str, str], song: SongText) -> dict[str, str]:
    """The attributes a model can perceive for this song: drop audio-only ones without audio, mood without a cover."""
    audio, cover = song_media(song)
    have = {"audio": audio, "cover": cover}
    return {k: v for k, v in attrs.items() if have.get(NEEDS.get(k, ""), True)}


def describe(attrs: dict[str, str], keys: list[str] | tuple[str, ...], plural: bool = False, noun: str = "song") -> str:
    """A noun phrase for the given attributes: "a slow piano rock song in a minor key, with a calm cover", or
    plural "slow piano rock songs, with calm covers"."""
    adj = []
    if "tempo_class" in keys and "tempo_class" in attrs:
        adj.append(TEMPO_WORDS.get(attrs["tempo_class"], attrs["tempo_class"]))
    if "instrument" in keys and "instrument" in attrs:
        adj.append(INSTRUMENT_WORDS.get(attrs["instrument"], attrs["instrument"]))
    if "genre" in keys and "genre" in attrs:
        adj.append(GENRE_WORDS.get(attrs["genre"], attrs["genre"]))
    head = " ".join(adj + [noun + ("s" if plural else "")])
    suffix = []
    if "mode" in keys and "mode" in attrs:
        suffix.append(f"in {attrs['mode']} keys" if plural else f"in a {attrs['mode']} key")
    if "mood" in keys and "mood" in attrs:
        suffix.append(f"with {attrs['mood']} covers" if plural else f"with {_a(attrs['mood'])} {attrs['mood']} cover")
    if "artist" in keys and "artist" in attrs:
        suffix.append(f"by {attrs['artist']}")
    phrase = ", ".join([head + (" " + suffix[0] if suffix else "")] + suffix[1:])
    return phrase if plural else f"{_a(phrase)} {phrase}"


def _a(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def caption(attrs: dict[str, str], rng: np.random.Generator) -> str:
    """The stage-1 answer: a description stating exactly the (visible) attributes."""
    keys = ["tempo_class", "instrument", "genre", "mode", "mood"]
    desc = describe(attrs, keys)
    artist = attrs.get("artist")
    templates = ["{D}.", "This is {d}.", "{D}." if not artist else "{D}, by {artist}."]
    text = str(rng.choice(templates)).format(D=desc[0].upper() + desc[1:], d=desc, artist=artist)
    return text


# --------------------------------------------------------------------------------------------------- builders

def _iso(ts: Any) -> str:
    return pd.Timestamp(ts).isoformat()


def _positives(plays: pd.DataFrame) -> pd.DataFrame:
    """Positive plays in time order per user (log order breaks ties)."""
    train = positive_plays(plays)
    train = train.assign(timestamp=pd.to_datetime(train["timestamp"], utc=True), _pos=np.arange(len(train)))
    return train.sort_values(["user_id", "timestamp", "_pos"], kind="stable").reset_index(drop=True)


def _stage1_song_ids(catalog: Catalog, split: Split, include_cold: bool) -> list[str]:
    """Songs to caption: all, or (default) all but cold songs and songs released at/after the split time."""
    cutoff = split.split_time.date() if split.split_time is not None else None
    out = []
    for sid, released in zip(catalog.songs["song_id"], catalog.songs["release_date"]):
        late = cutoff is not None and not pd.isna(released) and pd.Timestamp(released).date() >= cutoff
        if include_cold or (sid not in split.cold_songs and not late):
            out.append(sid)
    return out


def build_stage1(catalog: Catalog, songs: dict[str, SongText], split: Split, attrs: dict[str, dict[str, str]],
                 cfg: Config, skipped: Counter, progress: bool = False) -> list[dict[str, Any]]:
    rng = np.random.default_rng([cfg.seed, 1])
    rows = []
    song_ids = _stage1_song_ids(catalog, split, cfg.examples.stage1_include_cold)
    skipped["stage1_cold_songs_left_out"] = len(songs) - len(song_ids)
    for sid in tqdm(song_ids, desc="stage-1 examples", disable=not progress):
        song = songs[sid]
        prompt = build_stage1_prompt(song, config=cfg.prompt)
        rows.append({"song_id": sid, "prompt": prompt.text, "answer": caption(_visible(attrs[sid], song), rng),
                     "audio_song_ids": prompt.audio_song_ids, "cover_song_ids": prompt.cover_song_ids})
    return rows


def _user_candidates(g: pd.DataFrame, history_len: int,
                     time_axis: bool = True) -> tuple[list[tuple[int, list[tuple[str, Any]]]], int]:
    """Candidates in one user's time-ordered train log: [(row, history)], one per distinct song (its latest play,
    which has the most history); history = distinct songs played strictly earlier, most recent first, excluding
    the candidate, with the time of their latest earlier play. Also returns how many songs had no history.
    Without a time axis (placeholder timestamps) "earlier" means earlier in the log."""
    songs, times = g["song_id"].tolist(), g["timestamp"].tolist()
    latest: dict[str, int] = {}
    for i, s in enumerate(songs):
        latest[s] = i
    out = []
    for s, i in latest.items():
        hist, seen = [], {s}
        for j in range(i - 1, -1, -1):
            if len(hist) >= history_len:
                break
            if (times[j] < times[i] or not time_axis) and songs[j] not in seen:
                seen.add(songs[j])
                hist.append((songs[j], times[j]))
        if hist:
            out.append((i, hist))
    return sorted(out), len(latest) - len(out)


def build_stage2(songs: dict[str, SongText], plays: pd.DataFrame, cfg: Config, skipped: Counter,
                 progress: bool = False, time_axis: bool = True) -> list[dict[str, Any]]:
    """One reason per sampled (user, candidate): the prompt lists the evidence (`llmrec.evidence`: co-listening from
    these training plays without the user, shared artist/album/genres/tags, the candidate's own facts) and the
    answer states some of it in varied words (`llmrec.evidence.phrase`), so the model learns to phrase evidence,
    and every answer passes the server's claim check by construction."""
    rng = np.random.default_rng([cfg.seed, 2])
    train = _positives(plays)
    builder = EvidenceBuilder(songs, train, prompt_config=cfg.prompt)
    rows = []
    groups = list(train.groupby("user_id", sort=True))
    for user, g in tqdm(groups, desc="stage-2 examples", disable=not progress):
        cands, no_history = _user_candidates(g, cfg.prompt.history_len, time_axis)
        skipped["stage2_candidates_without_history"] += no_history
        skipped["stage2_candidates_over_user_cap"] += max(0, len(cands) - cfg.examples.stage2_per_user)
        if len(cands) > cfg.examples.stage2_per_user:
            keep = rng.choice(len(cands), size=cfg.examples.stage2_per_user, replace=False)
            cands = [cands[k] for k in sorted(keep)]
        for i, hist in cands:
            sid, ts = g["song_id"].iat[i], g["timestamp"].iat[i]
            example = reason_example(builder, [h for h, _ in hist], sid, str(user), rng)
            when = dict(hist)
            rows.append({"user_id": str(user), "song_id": sid, "timestamp": _iso(ts),
                         "history_timestamps": [_iso(when[h]) for h in example["history_song_ids"]], **example})
    return rows


def fit_als(train: pd.DataFrame, cfg: Config) -> tuple[list[str], np.ndarray]:
    """ALS (implicit, CPU) on the positive train interactions; returns (song ids, item factors) for warm songs.
    Confidence = total play count of the (user, song) pair."""
    import scipy.sparse as sp
    from implicit.als import AlternatingLeastSquares
    from threadpoolctl import threadpool_limits

    if "play_count" not in train.columns:
        train = train.assign(play_count=1)
    agg = train.groupby(["user_id", "song_id"], sort=True)["play_count"].sum().reset_index()
    users, u_idx = np.unique(agg["user_id"].to_numpy(dtype=object), return_inverse=True)
    items, i_idx = np.unique(agg["song_id"].to_numpy(dtype=object), return_inverse=True)
    matrix = sp.csr_matrix((agg["play_count"].to_numpy(dtype=np.float32), (u_idx, i_idx)),
                           shape=(len(users), len(items)))
    with threadpool_limits(1, "blas"):  # implicit's own threads; a threaded BLAS underneath only slows it down
        model = AlternatingLeastSquares(factors=cfg.examples.als_factors,
                                        regularization=cfg.examples.als_regularization,
                                        iterations=cfg.examples.als_iterations, random_state=cfg.seed,
                                        num_threads=cfg.examples.als_threads, use_gpu=False)
        model.fit(matrix, show_progress=False)
    return [str(s) for s in items], np.asarray(model.item_factors, dtype=np.float32)


def build_pairs(plays: pd.DataFrame, cfg: Config, skipped: Counter) -> list[dict[str, Any]]:
    """One row per warm song (x `pairs_per_song`): its ALS item factor and a co-listened song — another song a
    user played in the train period, sampled in proportion to the number of users who played both. Songs nobody
    co-listened keep their factor with `pos_song_id` None (counted)."""
    import scipy.sparse as sp

    train = _positives(plays)
    if train.empty:
        return []
    song_ids, factors = fit_als(train, cfg)
    index = {s: k for k, s in enumerate(song_ids)}
    pairs = train[["user_id", "song_id"]].drop_duplicates()
    users, u_idx = np.unique(pairs["user_id"].to_numpy(dtype=object), return_inverse=True)
    i_idx = pairs["song_id"].map(index).to_numpy()
    played = sp.csr_matrix((np.ones(len(pairs), dtype=np.float32), (u_idx, i_idx)), shape=(len(users), len(song_ids)))
    co = (played.T @ played).tocsr()
    co.setdiag(0)
    co.eliminate_zeros()
    rng = np.random.default_rng([cfg.seed, 3])
    rows = []
    for k, sid in enumerate(song_ids):
        start, end = co.indptr[k], co.indptr[k + 1]
        cols, weights = co.indices[start:end], co.data[start:end].astype(np.float64)
        factor = factors[k].tolist()
        if len(cols) == 0:
            skipped["pairs_without_positive"] += 1
            rows.append({"song_id": sid, "cf_factor": factor, "pos_song_id": None})
            continue
        n = min(cfg.examples.pairs_per_song, len(cols))
        for j in rng.choice(cols, size=n, replace=False, p=weights / weights.sum()):
            rows.append({"song_id": sid, "cf_factor": factor, "pos_song_id": song_ids[int(j)]})
    return rows


def make_examples(catalog: Catalog, cfg: Config, truth: pd.DataFrame | None = None,
                  progress: bool = False) -> Examples:
    """Build all three example sets in memory (see the module docstring)."""
    split = split_catalog(catalog, cfg.eval.split, cfg.eval.valid_days)
    # Each song is sanitised once; the counts say what was repaired across the catalog, once per text.
    stats: Counter = Counter()
    songs = {s["song_id"]: sanitize_song(s, cfg.prompt, stats) for s in catalog.songs.to_dict("records")}
    attrs = song_attributes(songs, truth)
    skipped: Counter = Counter()
    stage1 = build_stage1(catalog, songs, split, attrs, cfg, skipped, progress)
    time_axis = catalog.meta.get("time_axis") is not False  # lastfm-2k: timestamps are placeholders
    plays, held_out = example_plays(split, cfg.examples.hold_out_tuning_plays, cfg.seed)
    stage2 = build_stage2(songs, plays, cfg, skipped, progress, time_axis)
    pairs = build_pairs(plays, cfg, skipped)
    meta = {
        "counts": {"stage1": len(stage1), "stage2": len(stage2), "pairs": len(pairs),
                   "stage2_users": len({r["user_id"] for r in stage2}),
                   "pairs_songs": len({r["song_id"] for r in pairs})},
        "skipped": dict(sorted(skipped.items())),
        "sanitizer": dict(sorted(stats.items())),
        "split": split.summary(),
        "tuning_holdout": held_out,
        "answers_from": {"stage1": ("synthetic ground truth (song_attributes.parquet)" if truth is not None
                                    else "genres and artist"),
                         "stage2": "evidence (llmrec.evidence)"},
        "config": {"prompt": asdict(cfg.prompt), "examples": asdict(cfg.examples), "seed": cfg.seed},
    }
    return Examples(stage1, stage2, pairs, meta)


def _features():
    from datasets import Features, List, Value

    strings = List(Value("string"))
    return {
        "stage1": Features({"song_id": Value("string"), "prompt": Value("string"), "answer": Value("string"),
                            "audio_song_ids": strings, "cover_song_ids": strings}),
        "stage2": Features({"user_id": Value("string"), "song_id": Value("string"), "timestamp": Value("string"),
                            "history_song_ids": strings, "history_timestamps": strings,
                            "prompt": Value("string"), "answer": Value("string"), "evidence": strings,
                            "audio_song_ids": strings, "cover_song_ids": strings}),
        "pairs": Features({"song_id": Value("string"), "cf_factor": List(Value("float32")),
                           "pos_song_id": Value("string")}),
    }


def save_examples(examples: Examples, directory: str | Path, progress: bool = False) -> Path:
    """Write stage1/, stage2/, pairs/ (`datasets.Dataset.save_to_disk`) and meta.json, swapped in atomically."""
    from datasets import Dataset
    from datasets.utils import logging as ds_logging

    directory = Path(directory)
    # Saving three small tables takes well under a second: their per-shard bars are noise even with progress on.
    bars_were_on = ds_logging.is_progress_bar_enabled()
    ds_logging.disable_progress_bar()
    try:
        with atomic_dir(directory) as tmp:
            for name, features in _features().items():
                rows = getattr(examples, name)
                columns = {col: [r[col] for r in rows] for col in features}
                Dataset.from_dict(columns, features=features).save_to_disk(str(tmp / name))
            atomic_write_json(tmp / "meta.json", examples.meta)
    finally:
        if bars_were_on:
            ds_logging.enable_progress_bar()
    return directory


def load_examples(directory: str | Path) -> dict[str, Any]:
    """The saved datasets by name, plus "meta" (what `save_examples` wrote)."""
    from datasets import load_from_disk

    directory = Path(directory)
    out: dict[str, Any] = {name: load_from_disk(str(directory / name)) for name in ("stage1", "stage2", "pairs")}
    out["meta"] = json.loads((directory / "meta.json").read_text())
    return out


def build_examples(cfg: Config, run: RunDir, progress: bool = True) -> dict[str, Any]:
    """`llmrec prepare`'s second step: examples from the run's catalog into `runs/<name>/examples/`."""
    from llmrec.schema import load_song_attributes

    catalog = load_catalog(run.require(run.catalog, "prepare"))
    truth = load_song_attributes(run.catalog) if catalog.meta.get("source") == "synthetic" else None
    examples = make_examples(catalog, cfg, truth, progress=progress)
    save_examples(examples, run.examples, progress=progress)
    c = examples.meta["counts"]
    stats = examples.meta["sanitizer"]
    return {
        "examples": f"{run.examples} (stage1 {c['stage1']}, stage2 {c['stage2']}, pairs {c['pairs']})",
        "sanitised": ", ".join(f"{k} {v}" for k, v in stats.items()) or "nothing to repair",
    }
