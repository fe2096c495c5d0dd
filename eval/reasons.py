"""Reason quality: does a generated reason state things that are true of the song and the listener?

A reason ("Recommended because you played "Golden Harbor", and this is a fast hip-hop song just like it.") is
checked claim by claim against the catalog:

* attribute claims — genre, mood, instrument, tempo class, key (mode) and artist — are found by matching the
  catalog's own vocabularies (the values in `songs.parquet` and, on the synthetic catalog, the ground truth in
  `song_attributes.parquet`), plus the surface words the training-example generator writes for them
  (`data_prep.examples`: "hip-hop" for `hiphop`, "mid-tempo" for `medium`, "string" for `strings`). A claim is
  true when the candidate song has that value;
* history claims — a quoted title ("you played "X"") — are true when X is one of the history songs the prompt
  showed. A sentence that names history songs presents its attributes as shared with them ("... just like it"),
  so each attribute claim in it must then also hold for at least one of the songs it names; a sentence that names
  none ("Unlike that one, this is a calm piano song.") is about the candidate alone.

Text inside quotes is never searched for attributes (a title such as "Dark Horse" is not a mood claim), and the
longest match wins ("Lady Jazz Parade" is an artist, not the genre jazz). A fact stated twice counts once. Words
that happen to be vocabulary values ("happy to share") count as claims, and negation is not understood ("not a
rock song" claims rock): the checker is deliberately literal, so it errs towards reporting hallucinations.
Language is not checked (the data has codes such as `en`, not words a reason would use).

Metrics (`reason_metrics`): faithfulness (true claims / all claims), hallucination rate (reasons with at least one
false claim / reasons), claims per reason, corpus distinct-1/2 (distinct n-grams / n-grams, Li et al. 2016), the
share of distinct reasons, mean length in words, and the shares of empty and degenerate reasons.

`evaluate_reasons` generates reasons for a seeded sample of held-out (user, song) plays with the run's serving
bundle — prompts from the listener's TRAINING history only, exactly as `llmrec prepare` builds stage-2 prompts —
scores them, and scores the example generator's template reasons for the same pairs as a reference ceiling.
"""
from __future__ import annotations

import re
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from data_prep.examples import GENRE_WORDS, INSTRUMENT_WORDS, TEMPO_WORDS
from llmrec.config import PromptConfig
from llmrec.text import Prompt, SongText, build_stage2_prompt, history_title, sanitize_song

WORD_RE = re.compile(r"\w+")
QUOTE_RE = re.compile(r'"([^"\n]{1,200})"|\u201c([^\u201d\n]{1,200})\u201d')
SENTENCE_END_RE = re.compile(r"[.!?]+(?=\s|$)")
ATTRIBUTE_KEYS = ("genre", "mood", "instrument", "tempo_class", "mode")  # checked when the data has the column
TITLE = "history_title"
# Surface words the example generator uses for a value, next to the value itself.
SURFACE = {"genre": GENRE_WORDS, "tempo_class": TEMPO_WORDS, "instrument": INSTRUMENT_WORDS}
# Bare "major"/"minor" are everyday words: a key claim needs "key" after it ("in a minor key").
PHRASE_FORMS = {"mode": ("{} key", "{} keys")}
MAX_PHRASE_WORDS = 8
MIN_WORDS = 3  # shorter reasons are degenerate
LOOP_NGRAM, LOOP_REPEATS = 3, 3  # a word 3-gram seen 3 times in one reason: generation is looping


def words(text: str) -> list[str]:
    return WORD_RE.findall(text.casefold())


def _key(text: str) -> tuple[str, ...]:
    return tuple(words(text))


def sentences(text: str) -> list[str]:
    """`text` cut after each run of . ! ? that ends a sentence (followed by a space or the end), except inside a
    quoted title ("Mr. Brown. Live")."""
    quotes = [m.span() for m in QUOTE_RE.finditer(text)]
    out, start = [], 0
    for end in SENTENCE_END_RE.finditer(text):
        if not any(a <= end.start() < b for a, b in quotes):
            out.append(text[start:end.end()])
            start = end.end()
    if text[start:].strip():
        out.append(text[start:])
    return out


# ------------------------------------------------------------------------------------------------ checker


@dataclass(frozen=True)
class Claim:
    kind: str  # an attribute key ("genre", ..., "artist") or "history_title"
    value: str  # canonical value (casefolded) or the quoted title
    text: str  # as written in the reason
    true: bool
    on_candidate: bool | None = None  # attribute claims: true of the candidate?
    on_history: bool | None = None  # attribute claims in a reason naming history songs: true of one of them?


@dataclass
class SongFacts:
    title_keys: set[tuple[str, ...]]
    values: dict[str, set[str]] = field(default_factory=dict)


class ReasonChecker:
    """Extracts the claims of a reason and checks them against the catalog (see the module docstring).

    `songs`: the catalog's songs table (song_id, title, artist, genres); `attributes`: the synthetic ground truth
    (`song_attributes.parquet`) or None. Only title, artist and genres of each song are read (sanitised as in the
    prompts, so that what the model saw is what is matched)."""

    def __init__(self, songs: pd.DataFrame, attributes: pd.DataFrame | None = None,
                 prompt_config: PromptConfig | None = None):
        self.cfg = prompt_config or PromptConfig()
        self.facts: dict[str, SongFacts] = {}
        self.phrases: dict[tuple[str, ...], tuple[str, str]] = {}  # word tuple -> (kind, canonical value)
        self._exact_case: dict[tuple[str, ...], str] = {}  # one-word artist names must match with their case
        cols = [c for c in ("song_id", "title", "artist", "genres") if c in songs.columns]
        artists: list[str] = []
        for row in songs[cols].to_dict("records"):
            s = sanitize_song(row, self.cfg)
            titles = {_key(s.title), _key(history_title(s, self.cfg))}
            values = {"genre": {g.casefold() for g in s.genres}}
            if s.artist and not s.artist.startswith("("):  # "(unknown artist)" is the sanitiser's placeholder
                values["artist"] = {s.artist.casefold()}
                artists.append(s.artist)
            self.facts[s.song_id] = SongFacts(titles, values)
        vocab: dict[str, set[str]] = {"genre": {g for f in self.facts.values() for g in f.values["genre"]}}
        if attributes is not None:
            for key in ATTRIBUTE_KEYS:
                if key not in attributes.columns:
                    continue
                for sid, value in zip(attributes["song_id"].astype(str), attributes[key]):
                    if sid in self.facts and not pd.isna(value):
                        self.facts[sid].values.setdefault(key, set()).add(str(value).casefold())
                vocab.setdefault(key, set()).update(str(v).casefold() for v in attributes[key].dropna().unique())
        # Attribute words first: on a clash (an artist called "Jazz") the attribute reading wins.
        for key, values in vocab.items():
            for value in sorted(values):
                surfaces = [form.format(value) for form in PHRASE_FORMS.get(key, ("{}",))]
                alias = SURFACE.get(key, {}).get(value)
                if alias:
                    surfaces += [form.format(alias) for form in PHRASE_FORMS.get(key, ("{}",))]
                for surface in surfaces:
                    self._add_phrase(_key(surface), key, value)
        for artist in artists:
            phrase = _key(artist)
            if self._add_phrase(phrase, "artist", artist.casefold()) and len(phrase) == 1:
                self._exact_case[phrase] = artist

    def _add_phrase(self, phrase: tuple[str, ...], kind: str, value: str) -> bool:
        if not phrase or len(phrase) > MAX_PHRASE_WORDS or phrase in self.phrases:
            return False
        self.phrases[phrase] = (kind, value)
        return True

    @classmethod
    def from_catalog(cls, catalog, attributes: pd.DataFrame | None = None,
                     prompt_config: PromptConfig | None = None) -> "ReasonChecker":
        return cls(catalog.songs, attributes, prompt_config)

    # -------------------------------------------------------------------------------------------- extraction
    def quoted(self, text: str) -> list[str]:
        return [a or b for a, b in QUOTE_RE.findall(text)]

    def mentions(self, text: str) -> list[tuple[str, str, str]]:
        """(kind, canonical value, surface text) of every attribute mention outside quotes, longest match first,
        non-overlapping, in reading order; repeats of the same (kind, value) are dropped."""
        out, seen = [], set()
        for segment in QUOTE_RE.split(text)[::3]:  # split() interleaves the two quote groups: keep the outside
            toks = [(m.group(), m.group().casefold()) for m in WORD_RE.finditer(segment)]
            i = 0
            while i < len(toks):
                for n in range(min(MAX_PHRASE_WORDS, len(toks) - i), 0, -1):
                    phrase = tuple(t for _, t in toks[i:i + n])
                    hit = self.phrases.get(phrase)
                    if hit and (phrase not in self._exact_case or toks[i][0] == self._exact_case[phrase]):
                        if hit not in seen:
                            seen.add(hit)
                            out.append((*hit, " ".join(t for t, _ in toks[i:i + n])))
                        i += n
                        break
                else:
                    i += 1
        return out

    # -------------------------------------------------------------------------------------------- checking
    def _facts(self, song_id: str) -> SongFacts:
        try:
            return self.facts[str(song_id)]
        except KeyError:
            raise KeyError(f"song {song_id!r} is not in the catalog the reason checker was built from") from None

    def check(self, text: str, candidate: str, history: Sequence[str] = ()) -> list[Claim]:
        """Every claim of `text` about `candidate` (a song id) and the listener's `history` (song ids shown)."""
        cand = self._facts(candidate)
        hist = [(h, self._facts(h)) for h in history]
        claims: list[Claim] = []
        seen_titles, seen_facts = set(), set()
        for sentence in sentences(text):
            anchors: list[SongFacts] = []  # the history songs this sentence names
            for title in self.quoted(sentence):
                key = _key(title)
                if not key:
                    continue
                named = [f for _, f in hist if key in f.title_keys]
                anchors += named
                if key in seen_titles or (not named and key in cand.title_keys):
                    continue  # said before, or names the candidate itself: no new claim about the history
                seen_titles.add(key)
                claims.append(Claim(TITLE, title, f'"{title}"', bool(named)))
            for kind, value, surface in self.mentions(sentence):
                if (kind, value) in seen_facts:
                    continue  # a fact stated twice counts once
                seen_facts.add((kind, value))
                on_cand = value in cand.values.get(kind, ())
                on_hist = any(value in f.values.get(kind, ()) for f in anchors) if anchors else None
                claims.append(Claim(kind, value, surface, on_cand and on_hist is not False, on_cand, on_hist))
        return claims


# ------------------------------------------------------------------------------------------------ metrics


def distinct_n(texts: Iterable[str], n: int) -> float | None:
    """Distinct n-grams / all n-grams over the whole set of texts (corpus-level distinct-n); None without any."""
    grams: Counter = Counter()
    for text in texts:
        w = words(text)
        grams.update(tuple(w[i:i + n]) for i in range(len(w) - n + 1))
    total = sum(grams.values())
    return len(grams) / total if total else None


def is_degenerate(text: str) -> bool:
    """Empty, shorter than MIN_WORDS words, or looping (a word 3-gram repeated LOOP_REPEATS times)."""
    w = words(text)
    if len(w) < MIN_WORDS:
        return True
    grams = Counter(tuple(w[i:i + LOOP_NGRAM]) for i in range(len(w) - LOOP_NGRAM + 1))
    return max(grams.values(), default=0) >= LOOP_REPEATS


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None


def reason_metrics(texts: Sequence[str], claims: Sequence[Sequence[Claim]]) -> dict[str, Any]:
    """Quality of a set of reasons and their checked claims (one list per reason). Rates over no claims or no
    reasons are None, never 0."""
    if len(texts) != len(claims):
        raise ValueError(f"reason_metrics: {len(texts)} reasons but {len(claims)} claim lists")
    flat = [c for cs in claims for c in cs]
    per_kind: dict[str, dict[str, Any]] = {}
    for kind in sorted({c.kind for c in flat}):
        of_kind = [c for c in flat if c.kind == kind]
        per_kind[kind] = {"n": len(of_kind), "faithfulness": _mean([c.true for c in of_kind])}
        # Attribute claims split in two: is the attribute right about the candidate (what the model perceives
        # from the candidate's text, audio or cover), and about the history song the reason relates it to?
        for side in ("on_candidate", "on_history"):
            checked = [getattr(c, side) for c in of_kind if getattr(c, side) is not None]
            if checked:
                per_kind[kind][f"true_{side}"] = _mean(checked)
    return {
        "n": len(texts),
        "faithfulness": _mean([c.true for c in flat]),
        "hallucination_rate": _mean([any(not c.true for c in cs) for cs in claims]),
        "claims_per_reason": len(flat) / len(texts) if texts else None,
        "grounded_share": _mean([bool(cs) and all(c.true for c in cs) for cs in claims]),  # >=1 claim, all true
        "by_kind": per_kind,
        # Distinct reasons / reasons (case and punctuation ignored): a collapsed model writes one reason for all,
        # and then faithfulness only says how often that one sentence happens to be true.
        "unique_share": len({" ".join(words(t)) for t in texts}) / len(texts) if texts else None,
        "distinct_1": distinct_n(texts, 1),
        "distinct_2": distinct_n(texts, 2),
        "mean_words": _mean([len(words(t)) for t in texts]),
        "empty_share": _mean([not words(t) for t in texts]),
        "degenerate_share": _mean([is_degenerate(t) for t in texts]),
    }


def score_reasons(checker: ReasonChecker, texts: Sequence[str], candidates: Sequence[str],
                  histories: Sequence[Sequence[str]]) -> tuple[dict[str, Any], list[list[Claim]]]:
    claims = [checker.check(t, c, h) for t, c, h in zip(texts, candidates, histories, strict=True)]
    return reason_metrics(texts, claims), claims


# ------------------------------------------------------------------------------------------------ sampling


@dataclass
class ReasonCase:
    """One held-out play to explain: the prompt is built from the listener's training plays only."""

    user_id: str
    song_id: str
    prompt: Prompt

    @property
    def history(self) -> list[str]:
        return self.prompt.history_song_ids


def sample_cases(songs: pd.DataFrame, train_df: pd.DataFrame, test_df: pd.DataFrame, n: int, seed: int,
                 prompt_config: PromptConfig | None = None) -> tuple[list[ReasonCase], dict[str, int]]:
    """Up to `n` distinct held-out (user, song) plays, sampled with `seed`, each with its stage-2 prompt.

    History = the user's distinct TRAINING songs, most recent first (log order breaks timestamp ties), without
    the candidate — never a test interaction. Pairs the user already played in training (eval masks those) and
    users without training plays are skipped and counted."""
    cfg = prompt_config or PromptConfig()
    test = test_df[["user_id", "song_id"]].astype(str).drop_duplicates()
    train = train_df.assign(user_id=train_df["user_id"].astype(str), song_id=train_df["song_id"].astype(str))
    played = set(zip(train["user_id"], train["song_id"]))
    has_history = set(train["user_id"])
    repeat = np.array([p in played for p in zip(test["user_id"], test["song_id"])], dtype=bool)
    no_history = ~test["user_id"].isin(has_history).to_numpy()
    unknown = ~test["song_id"].isin(set(songs["song_id"].astype(str))).to_numpy()
    pool = test[~repeat & ~no_history & ~unknown].sort_values(["user_id", "song_id"], kind="stable")
    skipped = {"repeat_pairs": int(repeat.sum()), "users_without_history": int((no_history & ~repeat).sum()),
               "songs_not_in_catalog": int((unknown & ~repeat & ~no_history).sum())}
    if pool.empty or n <= 0:
        return [], skipped
    pick = np.sort(np.random.default_rng([seed, 11]).choice(len(pool), size=min(n, len(pool)), replace=False))
    pool = pool.iloc[pick]
    users = set(pool["user_id"])
    mine = train[train["user_id"].isin(users)]
    if "timestamp" in mine.columns:
        mine = mine.assign(_t=pd.to_datetime(mine["timestamp"], utc=True), _pos=np.arange(len(mine)))
        mine = mine.sort_values(["_t", "_pos"], kind="stable")
    recent = {u: list(dict.fromkeys(g["song_id"].tolist()[::-1])) for u, g in mine.groupby("user_id", sort=False)}
    rows = songs.assign(song_id=songs["song_id"].astype(str)).set_index("song_id", drop=False)
    texts: dict[str, SongText] = {}

    def text(sid: str) -> SongText:
        if sid not in texts:
            texts[sid] = sanitize_song(rows.loc[sid].to_dict(), cfg)
        return texts[sid]

    cases = []
    for user, sid in zip(pool["user_id"], pool["song_id"]):
        history = [h for h in recent[user] if h != sid and h in rows.index][: cfg.history_len]
        prompt = build_stage2_prompt([text(h) for h in history], text(sid), config=cfg)
        cases.append(ReasonCase(user, sid, prompt))
    return cases, skipped


def template_reasons(cases: Sequence[ReasonCase], songs: pd.DataFrame, attributes: pd.DataFrame | None, seed: int,
                     prompt_config: PromptConfig | None = None) -> list[str]:
    """What the training-example generator (`data_prep.examples.reason`) would answer for each case: the
    reference ceiling of the same checks (it only states attributes it knows to be shared)."""
    from data_prep.examples import _visible, reason, song_attributes

    cfg = prompt_config or PromptConfig()
    need = {s for c in cases for s in (c.song_id, *c.history)}
    rows = songs[songs["song_id"].astype(str).isin(need)]
    texts = {str(r["song_id"]): sanitize_song(r, cfg) for r in rows.to_dict("records")}
    attrs = song_attributes(texts, attributes)
    rng = np.random.default_rng([seed, 12])
    out = []
    for c in cases:
        shown = [(history_title(texts[h], cfg), _visible(attrs[h], texts[h])) for h in c.history]
        out.append(reason(_visible(attrs[c.song_id], texts[c.song_id]), shown, rng)[0])
    return out


# ------------------------------------------------------------------------------------------------ generation


def generate_reasons(engine, features, prompts: Sequence[Prompt], max_new_tokens: int, batch_size: int = 16,
                     max_length: int = 1024) -> tuple[list[str | None], float]:
    """Greedy reasons from a serving engine (`serve.engines`: the transformers engine over the run's bundle), in
    batches, so that the eval scores exactly what `/v1/explanations` returns: the same tokenisation, left padding,
    splicing and decoding (`Engine.decode`).

    Media rows come from the run's features in placeholder order (`train.collate.media_rows`). A prompt longer
    than `max_length` tokens gives None. Returns (texts, seconds spent generating)."""
    from llmrec.model.mm_lm import MediaBatch
    from serve.engines.base import EngineInput, prompt_token_ids
    from train.collate import media_rows

    fits = [len(prompt_token_ids(engine.model, p.text)) <= max_length for p in prompts]
    todo = [i for i, ok in enumerate(fits) if ok]  # the others are counted by the caller as None
    out: list[str | None] = [None] * len(prompts)
    seconds = 0.0
    for start in range(0, len(todo), batch_size):
        batch = todo[start:start + batch_size]
        items = [EngineInput(prompts[i].text, MediaBatch(*media_rows(features, prompts[i].audio_song_ids, "audio"),
                                                          *media_rows(features, prompts[i].cover_song_ids, "cover")))
                 for i in batch]
        t0 = time.perf_counter()
        texts = engine.generate(items, max_new_tokens)
        seconds += time.perf_counter() - t0
        for i, text in zip(batch, texts):
            out[i] = text
    return out, seconds


def prompt_dependence(model, features, prompts: Sequence[Prompt], answers: Sequence[str], batch_size: int = 16,
                      max_length: int = 1024) -> dict[str, float | None]:
    """Does the model read its prompt? The answer loss (per answer token, teacher-forced) of each reference
    answer after its own prompt, and after the next case's prompt (answers rotated by one). A model that writes
    the same sentence whatever it is shown scores the two alike; `prompt_gain` = other - own is how much the
    prompt tells it. Needs two cases or more; prompts over `max_length` tokens are left out."""
    import torch

    from train.collate import MultimodalCollator

    collate = MultimodalCollator(model.tokenizer, features, model.cfg.audio_tokens, model.cfg.cover_tokens,
                                 max_length)
    rows = []
    for p, a in zip(prompts, answers):
        try:
            collate.encode(p.text, None)
        except ValueError:
            continue
        rows.append({"prompt": p.text, "answer": a, "audio_song_ids": p.audio_song_ids,
                     "cover_song_ids": p.cover_song_ids})
    if len(rows) < 2:
        return {"answer_loss": None, "answer_loss_other_prompt": None, "prompt_gain": None}

    @torch.inference_mode()
    def mean_loss(pairs: list[dict]) -> float:
        total, tokens = 0.0, 0
        for start in range(0, len(pairs), batch_size):
            batch = collate(pairs[start:start + batch_size])
            n = int((batch["labels"][:, 1:] != -100).sum())  # tokens the shifted causal-LM loss averages over
            out = model(batch["input_ids"], batch["attention_mask"], batch["labels"], batch["media"])
            total, tokens = total + float(out.loss) * n, tokens + n
        return total / max(tokens, 1)

    own = mean_loss(rows)
    other = mean_loss([{**r, "answer": rows[(i + 1) % len(rows)]["answer"]} for i, r in enumerate(rows)])
    return {"answer_loss": own, "answer_loss_other_prompt": other, "prompt_gain": other - own}


# ------------------------------------------------------------------------------------------------ the report section

N_SAMPLES = 8  # reasons shown in report.json (report.md shows 5)
GEN_BATCH = 16  # prompts per generate() call: latency_ms_per_reason is the batched wall time / reasons


def _claims_json(claims: Sequence[Claim]) -> list[dict[str, Any]]:
    return [{k: v for k, v in asdict(c).items() if v is not None} for c in claims]


def evaluate_reasons(cfg, run, catalog, train_df: pd.DataFrame, test_df: pd.DataFrame,
                     progress: bool = False) -> dict[str, Any]:
    """The `reasons` section of report.json: checks of reasons generated by the run's bundle for
    `cfg.eval.reasons` sampled held-out plays, plus the template reasons for the same plays ("template").
    Without a bundle the section says so ("skipped") and still carries the template reference."""
    from data_prep.synthetic import load_song_attributes

    # Every key of the section is always there (None when not measured), so readers need no special cases.
    empty = {**reason_metrics([], []), "latency_ms_per_reason": None, "samples": [],
             "prompt_dependence": {"answer_loss": None, "answer_loss_other_prompt": None, "prompt_gain": None}}
    n = int(cfg.eval.reasons)
    if n <= 0:
        return {**empty, "skipped": "eval.reasons=0: reason generation turned off"}
    attributes = load_song_attributes(run.catalog)
    checker = ReasonChecker.from_catalog(catalog, attributes, cfg.prompt)
    cases, skipped = sample_cases(catalog.songs, train_df, test_df, n, cfg.seed, cfg.prompt)
    if not cases:
        return {**empty, "skipped": "no held-out plays with a training history to explain", "cases_skipped": skipped}
    cands, hists = [c.song_id for c in cases], [c.history for c in cases]
    templates = template_reasons(cases, catalog.songs, attributes, cfg.seed, cfg.prompt)
    template_metrics, _ = score_reasons(checker, templates, cands, hists)
    section: dict[str, Any] = {**empty, "cases_skipped": skipped, "template": template_metrics,
                               "ground_truth": "songs.parquet" + (" + song_attributes.parquet" if attributes is
                                                                  not None else " (genres, artist)")}
    bundle = run.model / "bundle"
    if not (bundle / "bundle.json").is_file():
        return {**section, "skipped": f"no serving bundle in {bundle}: run `llmrec train` to generate reasons"}
    from llmrec.features import load_media_features
    from serve.engines.hf import HFEngine

    t0 = time.perf_counter()
    engine = HFEngine(bundle)
    features = load_media_features(run.features)
    load_s = time.perf_counter() - t0
    texts, gen_s = generate_reasons(engine, features, [c.prompt for c in cases], cfg.eval.reasons_max_new_tokens,
                                    batch_size=GEN_BATCH, max_length=cfg.train.max_length)
    kept = [i for i, t in enumerate(texts) if t is not None]
    if not kept:
        return {**section, "prompts_too_long": len(texts),
                "skipped": f"all {len(texts)} sampled prompts exceed train.max_length={cfg.train.max_length} tokens"}
    metrics, claims = score_reasons(checker, [texts[i] for i in kept], [cands[i] for i in kept],
                                    [hists[i] for i in kept])
    if progress:
        print(f"  reasons: {len(kept)} generated in {gen_s:.1f}s (+{load_s:.1f}s loading)")
    samples = [{"user": cases[i].user_id, "song": cases[i].song_id, "history": cases[i].history, "reason": texts[i],
                "claims": _claims_json(cl), "template_reason": templates[i]}
               for i, cl in zip(kept[:N_SAMPLES], claims[:N_SAMPLES])]
    dependence = prompt_dependence(engine.model, features, [c.prompt for c in cases], templates, batch_size=GEN_BATCH,
                                   max_length=cfg.train.max_length)
    return {**section, **metrics, "prompt_dependence": dependence,
            "latency_ms_per_reason": 1000 * gen_s / len(kept) if kept else None,
            "max_new_tokens": cfg.eval.reasons_max_new_tokens, "batch_size": GEN_BATCH,
            "prompts_too_long": len(texts) - len(kept),
            "seconds": {"load": round(load_s, 2), "generate": round(gen_s, 2)},
            "samples": samples}
