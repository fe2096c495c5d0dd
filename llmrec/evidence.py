"""Evidence for a recommendation reason: what the system can stand behind for one (listener, candidate) pair.

A reason is only worth showing if it is true and specific, so reasons are written FROM evidence, never from the
model's guess. Each `Evidence` item is one fact with its source:

=============  ==========================================================  ==========================================
kind           the fact                                                    source
=============  ==========================================================  ==========================================
co_listen      "62% of the listeners of "X" also play it"                  training plays; X is a history song
artist         same artist as a history song, or the candidate's artist   catalog `artist`
album          same album (and artist) as a history song                  catalog `album`
genre          a genre shared with a history song, or the candidate's     catalog `genres`
tag            a tag shared with a history song, or the candidate's       catalog `tags` (not already a genre)
perceived      an audio/cover attribute the model's own perception heads   model features (never catalog truth)
               predict for the candidate, with a calibrated confidence
keyword        a distinctive word of the candidate's lyrics or comments    catalog `lyrics` / `comments` (sanitised)
=============  ==========================================================  ==========================================

Items related to a history song carry its id and title (`history_song_id`, `history_title`); items about the
candidate alone carry None. The builder works on any catalog: on a title/artist-only one, co-listening and the
artist carry the reason; a cold song (no plays) is explained by its own content.

Co-listening never counts the listener being explained (the share is over OTHER listeners), so a training example
does not learn "you played both" from its own target play.

The same module phrases evidence (`phrase`: the plain sentence the server falls back to, and the varied answers
stage 2 is trained on) and renders it for the prompt (`prompt_lines`), so training, serving and the claim checker
(`llmrec.claims`) share one vocabulary. Catalog text stays quoted data in the prompt, as everywhere in llmrec.
"""
from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from llmrec.config import PromptConfig
from llmrec.text import Prompt, SongText, build_stage2_prompt, history_title, quote_inline, sanitize_song

KINDS = ("co_listen", "artist", "album", "genre", "tag", "perceived", "keyword")
# Kinds that can relate the candidate to a history song; the rest are about the candidate alone.
LINKED_KINDS = ("co_listen", "artist", "album", "genre", "tag")
UNKNOWN_ARTIST_PREFIX = "("  # the sanitiser writes "(unknown artist)" for a missing artist
KEYWORD_RE = re.compile(r"[^\W\d_]{4,20}")  # letters only: no markup, digits or special tokens survive
GENERIC_REASON = ("Recommended for its similarity to your listening; we have no details about this song to "
                  "share yet.")


@dataclass(frozen=True)
class Evidence:
    kind: str
    value: str  # canonical value: the artist, genre, tag, keyword, attribute value; co_listen: the percentage
    history_song_id: str | None = None  # the listener's history song this relates the candidate to
    history_title: str | None = None  # ... as the prompt shows it (what a reason may quote)
    confidence: float | None = None  # co_listen: the share of listeners; perceived: calibrated probability
    attribute: str | None = None  # perceived: which attribute ("tempo", "instrument", "mood"); keyword: the field
    listeners: int | None = None  # co_listen: how many other listeners of the history song also play it

    @property
    def linked(self) -> bool:
        return self.history_song_id is not None

    def as_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    def line(self) -> str:
        """How the prompt lists this item (catalog text quoted)."""
        v, t = quote_inline(self.value), quote_inline(self.history_title or "")
        if self.kind == "co_listen":
            return f"co-listening: {self.value}% of the listeners of {t} also play it"
        if self.kind == "perceived":
            return f"{self.attribute} (perceived, {round(100 * (self.confidence or 0))}%): {v}"
        if self.kind == "keyword":
            return f"{self.attribute} keyword: {v}"
        return f"{self.kind} shared with {t}: {v}" if self.linked else f"{self.kind}: {v}"

    def clause(self) -> str:
        """This item as a clause of a reason about the candidate ('it is by "X", like "Y"')."""
        t = quote_inline(self.history_title or "")
        v = self.value.replace('"', "'")  # an unquoted label: a stray quote would open a false "quote" claim
        if self.kind == "co_listen":
            return f"{v}% of the listeners of {t} also play it"
        # Names are quoted, like titles: "Mary J. Blige" or "Wham!" would otherwise end a sentence mid-name.
        if self.kind == "artist":
            q = quote_inline(self.value)
            return f"it is by {q}, like {t}" if self.linked else f"it is by {q}"
        if self.kind == "album":
            q = quote_inline(self.value)
            return f"it is from the album {q}, like {t}" if self.linked else f"it is from the album {q}"
        if self.kind == "genre":
            return f"it is {v} like {t}" if self.linked else f"it is {_a(self.value)} {v} song"
        if self.kind == "tag":
            return f"it is tagged {v} like {t}" if self.linked else f"it is tagged {v}"
        if self.kind == "perceived":
            return PERCEIVED_CLAUSES.get(self.attribute or "", "it is {}").format(v)
        if self.kind == "keyword":
            where = "lyrics" if self.attribute == "lyrics" else "listeners' comments"
            return f"its {where} mention {quote_inline(self.value)}"
        raise ValueError(f"unknown evidence kind {self.kind!r}")


# How a perceived attribute is said; the value is the perception head's label.
PERCEIVED_CLAUSES = {"tempo": "it sounds {}", "instrument": "it features {}", "mood": "its cover looks {}"}


def _a(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


# ------------------------------------------------------------------------------------------------ co-listening


class CoListening:
    """Who played what, from positive plays: `overlap(h, c, exclude_user)` = (listeners of h, of them also of c),
    both without `exclude_user`. A sparse user x song matrix (scipy) so a 100k-song log stays small."""

    def __init__(self, plays: pd.DataFrame):
        import scipy.sparse as sp

        pairs = plays[["user_id", "song_id"]].astype(str).drop_duplicates()
        users, u_idx = np.unique(pairs["user_id"].to_numpy(dtype=object), return_inverse=True)
        songs, s_idx = np.unique(pairs["song_id"].to_numpy(dtype=object), return_inverse=True)
        self.user_pos = {u: i for i, u in enumerate(users)}
        self.song_pos = {s: i for i, s in enumerate(songs)}
        ones = np.ones(len(pairs), dtype=np.int8)
        self.by_song = sp.csc_matrix((ones, (u_idx, s_idx)), shape=(len(users), len(songs)))

    def listeners(self, song_id: str) -> np.ndarray:
        k = self.song_pos.get(str(song_id))
        if k is None:
            return np.zeros(0, dtype=np.int32)
        return self.by_song.indices[self.by_song.indptr[k]:self.by_song.indptr[k + 1]]

    def overlap(self, history_song: str, candidate: str, exclude_user: str | None = None) -> tuple[int, int]:
        of_h, of_c = self.listeners(history_song), self.listeners(candidate)
        both = np.intersect1d(of_h, of_c, assume_unique=True)
        u = self.user_pos.get(str(exclude_user)) if exclude_user is not None else None
        if u is not None:
            of_h, both = of_h[of_h != u], both[both != u]
        return len(of_h), len(both)


# ------------------------------------------------------------------------------------------------ keywords


def stop_words() -> frozenset[str]:
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    return frozenset(ENGLISH_STOP_WORDS)


class Keywords:
    """A song's most distinctive lyric word and comment word: highest count x idf over the catalog, among words of
    4-20 letters that are not English stop words and occur in at least two songs (a word only one song uses is
    more often a typo or junk than a theme). Text is the sanitised catalog text; the word is quoted data."""

    def __init__(self, songs: Iterable[SongText], min_songs: int = 2):
        self.stop = stop_words()
        self.min_songs = min_songs
        self.df: Counter = Counter()
        self.n = 0
        for s in songs:
            self.n += 1
            self.df.update(set(self._words(s.lyrics)) | set(self._words(" ".join(s.comments))))

    def _words(self, text: str) -> list[str]:
        return [w for w in KEYWORD_RE.findall(text.casefold()) if w not in self.stop]

    def best(self, text: str, exclude: set[str]) -> str | None:
        counts = Counter(w for w in self._words(text) if w not in exclude and self.df[w] >= self.min_songs)
        if not counts or self.n < 2:
            return None
        score = {w: c * math.log(self.n / self.df[w]) for w, c in counts.items()}
        top = max(score, key=lambda w: (score[w], w))
        return top if score[top] > 0 else None


# ------------------------------------------------------------------------------------------------ the builder


class EvidenceBuilder:
    """Evidence for (history, candidate) pairs of one catalog (see the module docstring).

    `songs`: sanitised songs by id (`llmrec.text.sanitize_song`); `plays`: the positive plays co-listening is
    counted on (training plays only, for examples and eval); `perceived`: song id -> [(attribute, label,
    calibrated probability)] from the model's perception heads, or None. The knobs are `PromptConfig.evidence_*`,
    `min_co_listen*`, `max_co_listen` and `min_perceived_confidence`."""

    def __init__(self, songs: Mapping[str, Mapping[str, Any] | SongText], plays: pd.DataFrame | None = None,
                 perceived: Mapping[str, Sequence[tuple[str, str, float]]] | None = None,
                 prompt_config: PromptConfig | None = None):
        self.songs, self.perceived = songs, perceived or {}
        self.cfg = prompt_config or PromptConfig()
        self.co = CoListening(plays) if plays is not None and len(plays) else None
        self._text: dict[str, SongText] = {}
        self.keywords = Keywords(self.text(sid) for sid in list(songs))

    def text(self, song_id: str) -> SongText:
        """The song sanitised as prompts show it (cached; `songs` may gain songs later, e.g. the server's added
        ones)."""
        if song_id not in self._text:
            self._text[song_id] = sanitize_song(self.songs[song_id], self.cfg)
        return self._text[song_id]

    def title(self, song_id: str) -> str:
        return history_title(self.text(song_id), self.cfg)

    def _linked(self, h: str, cand: SongText, user: str | None) -> list[Evidence]:
        hs, title = self.text(h), self.title(h)
        out = []
        if self.co is not None:
            n_h, n_both = self.co.overlap(h, cand.song_id, user)
            share = n_both / n_h if n_h else 0.0
            if n_both >= self.cfg.min_co_listeners and share >= self.cfg.min_co_listen_share:
                pct = max(1, round(100 * share))
                out.append(Evidence("co_listen", str(pct), h, title, round(share, 4), listeners=n_both))
        if _known_artist(cand.artist) and hs.artist == cand.artist:
            out.append(Evidence("artist", cand.artist, h, title))
            if cand.album and hs.album == cand.album:
                out.append(Evidence("album", cand.album, h, title))
        out += [Evidence("genre", g, h, title) for g in cand.genres if g in hs.genres]
        out += [Evidence("tag", t, h, title) for t in cand.tags if t in hs.tags and t not in cand.genres]
        return out

    def _own(self, cand: SongText) -> list[Evidence]:
        out = []
        if _known_artist(cand.artist):
            out.append(Evidence("artist", cand.artist))
        out += [Evidence("genre", g) for g in cand.genres[:2]]
        out += [Evidence("tag", t) for t in cand.tags if t not in cand.genres][:2]
        for attribute, label, p in self.perceived.get(cand.song_id, ()):
            if p >= self.cfg.min_perceived_confidence:
                out.append(Evidence("perceived", label, confidence=round(float(p), 3), attribute=attribute))
        known = {w.casefold() for g in cand.genres + cand.tags for w in KEYWORD_RE.findall(g)}
        for field, text in (("lyrics", cand.lyrics), ("comments", " ".join(cand.comments))):
            word = self.keywords.best(text, known)
            if word:
                out.append(Evidence("keyword", word, attribute=field))
                known.add(word)
        return out

    def build(self, history: Sequence[str], candidate: str, user: str | None = None,
              limit: int | None = -1) -> list[Evidence]:
        """Evidence for recommending `candidate` to a listener whose shown history is `history` (song ids, most
        recent first). Linked items first (co-listening by share, then artist, album, genre, tag; nearer history
        first), then the candidate's own; a candidate fact already stated as shared is not repeated. `limit`: -1
        = `evidence_items`, None = everything, co-listening with every history song included (the eval's
        ground truth)."""
        cand = self.text(candidate)
        linked = [e for h in history if h in self.songs and h != candidate for e in self._linked(h, cand, user)]
        order = {k: i for i, k in enumerate(LINKED_KINDS)}
        linked.sort(key=lambda e: (order[e.kind], -(e.confidence or 0)))  # stable: nearer history first
        if limit is not None:  # the ground truth keeps every co-listening item
            co = [e for e in linked if e.kind == "co_listen"]
            linked = co[:self.cfg.max_co_listen] + [e for e in linked if e.kind != "co_listen"]
        shared = {(e.kind, e.value) for e in linked}
        items = linked + [e for e in self._own(cand) if (e.kind, e.value) not in shared]
        cap = self.cfg.evidence_items if limit == -1 else limit
        return items if cap is None else items[:cap]


def reason_prompt(builder: EvidenceBuilder, history: Sequence[str], candidate: str, user: str | None = None,
                  stats: Counter | None = None) -> tuple[Prompt, list[Evidence]]:
    """The stage-2 prompt for (history, candidate) with its evidence listed, and that evidence: what training
    examples, the server and the eval all build. Evidence relates the candidate only to the history songs the
    prompt really shows (lines dropped for the token budget are not evidence)."""
    cfg = builder.cfg
    history = [h for h in history if h in builder.songs and h != candidate][:cfg.history_len]
    for _ in range(2):  # the second pass only when the budget dropped history lines
        items = builder.build(history, candidate, user)
        prompt = build_stage2_prompt([builder.text(h) for h in history], builder.text(candidate), config=cfg,
                                     stats=stats, evidence=prompt_lines(items))
        if prompt.history_song_ids == history:
            break
        history = prompt.history_song_ids
    return prompt, items


def _known_artist(artist: str) -> bool:
    return bool(artist) and not artist.startswith(UNKNOWN_ARTIST_PREFIX)


# ------------------------------------------------------------------------------------------------ phrasing


def prompt_lines(items: Sequence[Evidence]) -> list[str]:
    return [e.line() for e in items]


OPENERS = ("Recommended because {c}.", "You may like it: {c}.", "A pick for you: {c}.")
NEW_OPENERS = ("Something new next to your recent plays: {c}.", "A change from your recent plays: {c}.")
NO_HISTORY = ("You have no plays yet, so here is what this song offers: {c}.",
              "Without plays to go on, here is what this song is: {c}.")


def phrasing_words() -> frozenset[str]:
    """Every word the evidence phrasing writes itself (openers, clause glue), casefolded: a catalog label made only
    of such words (lastfm-2k users tagged artists "it", "new", "song") cannot be told apart from the phrasing, so
    the claim checker does not read it as a claim."""
    glue = ("listeners of also play it it is by like from the album a an song tagged sounds features its cover looks "
            "lyrics listeners' comments mention and")
    text = " ".join((*OPENERS, *NEW_OPENERS, *NO_HISTORY, GENERIC_REASON, glue))
    return frozenset(re.findall(r"\w+", text.casefold()))


def _some(items: list[Evidence], lo: int, hi: int, rng: np.random.Generator) -> list[Evidence]:
    """A random subset of lo..hi items (at most all), in their evidence order."""
    if not items:
        return []
    n = int(rng.integers(min(lo, len(items)), min(hi, len(items)) + 1))
    return [items[i] for i in sorted(rng.choice(len(items), size=n, replace=False))]


def phrase(items: Sequence[Evidence], has_history: bool, rng: np.random.Generator | None = None,
           max_linked: int = 2, max_own: int = 2) -> str:
    """A reason stating evidence items and nothing else. Facts relating the candidate to a history song go in the
    first sentence (which quotes those songs); the candidate's own facts in a second sentence that quotes no
    history song, so the claim checker never reads an own fact as a shared one. Without `rng` the wording is
    fixed (the server's fallback); with one, the opener, the order and how many items are said vary (stage-2
    answers, so the model learns to phrase evidence rather than one sentence). No items: `GENERIC_REASON`."""
    # One clause per fact, the first in evidence order: "it is hiphop like "A"" and "... like "B"" say it twice.
    linked, said = [], set()
    for e in items:
        if e.linked and (e.kind, e.value) not in said:
            said.add((e.kind, e.value))
            linked.append(e)
    own = [e for e in items if not e.linked]
    if rng is not None:
        linked = _some(linked, 1, max_linked, rng)
        own = _some(own, 0 if linked else 1, max_own, rng)
    else:
        linked, own = linked[:max_linked], own[:max_own if not linked else 1]
    pick = (lambda options: str(options[0])) if rng is None else (lambda options: str(rng.choice(options)))
    if linked:
        text = pick(OPENERS).format(c=" and ".join(e.clause() for e in linked))
        if own:
            rest = ", and ".join(e.clause() for e in own)
            text += " " + rest[0].upper() + rest[1:] + "."
        return text
    if own:
        return pick(NEW_OPENERS if has_history else NO_HISTORY).format(c=", and ".join(e.clause() for e in own))
    return GENERIC_REASON


def reason_example(builder: EvidenceBuilder, history: Sequence[str], candidate: str, user: str | None,
                   rng: np.random.Generator) -> dict[str, Any]:
    """The fields of one stage-2 training example: the prompt listing the evidence, an answer that states some of
    it (`phrase`), and the evidence as JSON strings. Prepare builds them from catalog facts and co-listening;
    train rebuilds the ones whose candidate has perceived attributes once its perception heads exist, so the
    model learns to say what it perceives, as the server's prompts will list it."""
    prompt, evidence = reason_prompt(builder, history, candidate, user=user)
    return {"history_song_ids": prompt.history_song_ids, "prompt": prompt.text,
            "answer": phrase(evidence, bool(prompt.history_song_ids), rng),
            "evidence": [json.dumps(e.as_json(), ensure_ascii=False) for e in evidence],
            "audio_song_ids": prompt.audio_song_ids, "cover_song_ids": prompt.cover_song_ids}
