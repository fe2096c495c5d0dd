"""The claim checker: which facts does a reason state, and does each one hold against a set of evidence?

One checker serves two readers: the server checks sampled reasons against the evidence the prompt showed (a reason
is returned as verified only when every claim is in that evidence), and the eval checks what the endpoint returned
against the ground truth (all the evidence the catalog and training plays support, plus, on the synthetic catalog,
the true audio/cover attributes).

What counts as a claim (read literally, erring towards reporting a false claim):
* a quoted text: the title of a history song the prompt showed (`history_title`, the sentence's anchor), else an
  evidence value (keyword, album, artist, genre, tag), else the candidate's own title (no claim), else a `quote`
  claim that is false (a song or phrase the evidence does not have);
* a percentage ("62%"): a co-listening claim, true when a co-listening item has that percentage;
* a vocabulary word or phrase outside quotes: the catalog's own genres, tags, artists and albums and the
  perception heads' labels (`extra_vocabulary`), longest match first ("Lady Jazz Parade" is an artist, not the
  genre jazz); a one-word artist name must match its case ("Rain" the artist, not rain). No word lists of the
  synthetic generator are used. A capitalised word inside a sentence that none of these explains ("Ldle Maple",
  "Spotify") is a `name` claim and false: a name the evidence cannot vouch for is how reasons invent things. A value
  made only of English stop words or of the evidence phrasing's own words
  (lastfm-2k has the tags "it", "new" and "song"), or only of numbers (the artist "13" next to "13% of the
  listeners"), is not in the vocabulary: claims about it are not checked.

A sentence that quotes history songs presents its facts as shared with them ("it is rock like "X""), so each fact
in it must be evidence linked to one of the songs it names; a sentence that names none is about the candidate and
may state its own facts or linked ones. A fact stated twice counts once. Negation is not understood ("not a rock
song" claims rock), nor are words outside the vocabularies ("upbeat"): those are not checked at all.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Mapping, Sequence

from llmrec.evidence import GENERIC_REASON, Evidence, phrase, phrasing_words, stop_words
from llmrec.text import SongText

WORD_RE = re.compile(r"\w+")
QUOTE_RE = re.compile(r'"([^"\n]{1,200})"|\u201c([^\u201d\n]{1,200})\u201d')
SENTENCE_END_RE = re.compile(r"[.!?]+(?=\s|$)")
PERCENT_RE = re.compile(r"(?<![\w.])(\d{1,3})\s?%")
MAX_PHRASE_WORDS = 8
MIN_WORDS = 3  # shorter reasons are degenerate
MIN_SERVED_WORDS = 6  # a model answer shorter than this ("1. Big Parade.") is not served as a reason
LOOP_NGRAM, LOOP_REPEATS = 3, 3  # a word 3-gram seen 3 times in one reason: generation is looping
FINISHED_RE = re.compile(r"[.!?][\"\u201d')]*\s*$")
TITLE, QUOTE, CO_LISTEN, NAME = "history_title", "quote", "co_listen", "name"
ALLOWED_CAPITALISED = frozenset({"I"})
# genre and tag are one family when matching (a lastfm top tag is both); the claim keeps the kind it matched.
FAMILY = {"genre": "label", "tag": "label"}


def words(text: str) -> list[str]:
    return WORD_RE.findall(text.casefold())


def key(text: str) -> tuple[str, ...]:
    return tuple(words(text))


def quoted(text: str) -> list[str]:
    return [a or b for a, b in QUOTE_RE.findall(text)]


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


@dataclass(frozen=True)
class Claim:
    kind: str  # an evidence kind, "history_title", or "quote"
    value: str
    text: str  # as written
    true: bool

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


class Vocabulary:
    """Phrase -> (kind, canonical value) for every claimable catalog value (see the module docstring)."""

    def __init__(self, songs: Iterable[SongText], extra: Mapping[str, Iterable[str]] | None = None):
        self.phrases: dict[tuple[str, ...], tuple[str, str]] = {}
        self.exact_case: dict[tuple[str, ...], str] = {}
        # A label made only of English stop words or of the phrasing's own words ("it", "new", "song" are lastfm
        # tags) is not a claim: reading it would flag every reason.
        self.common = stop_words() | phrasing_words()
        songs = list(songs)
        # Labels first: on a clash (an artist called "Jazz") the label reading wins.
        for kind, values in (("genre", {g for s in songs for g in s.genres}),
                             ("tag", {t for s in songs for t in s.tags}), *(extra or {}).items()):
            for value in sorted(values):
                self.add(kind, value)
        for s in songs:
            if s.artist and not s.artist.startswith("("):  # "(unknown artist)" is the sanitiser's placeholder
                if self.add("artist", s.artist) and len(key(s.artist)) == 1:
                    self.exact_case[key(s.artist)] = s.artist
        for s in songs:
            if s.album:
                self.add("album", s.album)

    def add(self, kind: str, value: str) -> bool:
        phrase = key(value)
        if not phrase or len(phrase) > MAX_PHRASE_WORDS or phrase in self.phrases or set(phrase) <= self.common:
            return False
        if all(w.isdigit() for w in phrase):  # an artist called "13" reads like the percentage in "13% of ..."
            return False
        self.phrases[phrase] = (kind, value)
        return True

    def mentions(self, text: str, extra: Mapping[tuple[str, ...], tuple[str, str]] | None = None
                 ) -> list[tuple[str, str, str]]:
        """(kind, value, surface) of each vocabulary mention outside quotes, longest first, in reading order; a
        mention of kind NAME is a capitalised word that no vocabulary explains (see `ClaimChecker`). `extra`
        phrases (the evidence's own values, e.g. a song added after startup) are looked up first."""
        extra = extra or {}
        out = []
        for segment in QUOTE_RE.split(text)[::3]:  # split() interleaves the two quote groups: keep the outside
            toks = [m.group() for m in WORD_RE.finditer(segment)]
            folded = [t.casefold() for t in toks]
            i = 0
            while i < len(toks):
                for n in range(min(MAX_PHRASE_WORDS, len(toks) - i), 0, -1):
                    phrase = tuple(folded[i:i + n])
                    hit = extra.get(phrase) or self.phrases.get(phrase)
                    if hit and (phrase not in self.exact_case or toks[i] == self.exact_case[phrase]):
                        out.append((*hit, " ".join(toks[i:i + n])))
                        i += n
                        break
                else:
                    # A capitalised word inside a sentence (not its first word, nor the first after a quote) that
                    # no vocabulary explains names something the evidence cannot vouch for.
                    if i > 0 and toks[i][:1].isupper() and toks[i] not in ALLOWED_CAPITALISED:
                        out.append((NAME, toks[i], toks[i]))
                    i += 1
        return out


class ClaimChecker:
    """Extracts the claims of a reason and checks each against evidence items (see the module docstring)."""

    def __init__(self, songs: Iterable[SongText], extra_vocabulary: Mapping[str, Iterable[str]] | None = None):
        self.vocabulary = Vocabulary(songs, extra_vocabulary)

    def check(self, text: str, facts: Sequence[Evidence], history_titles: Sequence[str],
              candidate_title: str | None = None) -> list[Claim]:
        """The claims of `text` about a candidate (titled `candidate_title`) recommended to a listener shown
        `history_titles`, each checked against `facts`."""
        shown = {key(t): t for t in history_titles if key(t)}
        own_title = key(candidate_title) if candidate_title else None
        local = {key(e.value): (e.kind, e.value) for e in facts if e.kind not in (CO_LISTEN, "keyword")}
        by_value: dict[tuple[str, tuple[str, ...]], list[Evidence]] = {}
        for e in facts:
            by_value.setdefault((FAMILY.get(e.kind, e.kind), key(e.value)), []).append(e)
        claims: list[Claim] = []
        seen: set[tuple[str, tuple[str, ...]]] = set()

        def add(kind: str, value: str, surface: str, true: bool) -> None:
            ident = (FAMILY.get(kind, kind), key(value))
            if ident not in seen:
                seen.add(ident)
                claims.append(Claim(kind, value, surface, true))

        def holds(kind: str, value: str, anchors: set[tuple[str, ...]]) -> bool:
            for e in by_value.get((FAMILY.get(kind, kind), key(value)), ()):
                if not anchors or (e.history_title is not None and key(e.history_title) in anchors):
                    return True
            return False

        for sentence in sentences(text):
            anchors = {key(q) for q in quoted(sentence) if key(q) in shown}
            for q in quoted(sentence):
                k = key(q)
                if not k:
                    continue
                if k in shown:
                    add(TITLE, shown[k], f'"{q}"', True)
                    continue
                matches = [kind for (kind, v) in by_value if v == k]
                if matches:
                    kind = next(e.kind for e in by_value[(matches[0], k)])
                    add(kind, q, f'"{q}"', holds(kind, q, anchors))
                elif k in self.vocabulary.phrases:
                    kind, value = self.vocabulary.phrases[k]
                    add(kind, value, f'"{q}"', holds(kind, value, anchors))
                elif k != own_title:
                    add(QUOTE, q, f'"{q}"', False)
            outside = " ".join(QUOTE_RE.split(sentence)[::3])
            for m in PERCENT_RE.finditer(outside):
                add(CO_LISTEN, m.group(1), m.group(), holds(CO_LISTEN, m.group(1), anchors))
            for kind, value, surface in self.vocabulary.mentions(sentence, local):
                add(kind, value, surface, kind != NAME and holds(kind, value, anchors))
        return claims


def is_degenerate(text: str) -> bool:
    """Empty, shorter than MIN_WORDS words, or looping (a word 3-gram repeated LOOP_REPEATS times)."""
    w = words(text)
    if len(w) < MIN_WORDS:
        return True
    grams = Counter(tuple(w[i:i + LOOP_NGRAM]) for i in range(len(w) - LOOP_NGRAM + 1))
    return max(grams.values(), default=0) >= LOOP_REPEATS


def servable(text: str) -> bool:
    """A model answer the server may return at all: finished (ends a sentence; an answer cut off by
    max_new_tokens is not a reason), at least MIN_SERVED_WORDS words, and not degenerate."""
    return bool(FINISHED_RE.search(text)) and len(words(text)) >= MIN_SERVED_WORDS and not is_degenerate(text)


def verified(claims: Sequence[Claim]) -> bool:
    """A reason the server may call verified: at least one claim beyond quoting history, and every claim true."""
    return any(c.kind != TITLE for c in claims) and all(c.true for c in claims)


@dataclass(frozen=True)
class ServedReason:
    """What the endpoint returns for one candidate: the reason, whether every claim held against the evidence, and
    where the text came from ("model": a sampled reason that passed; "evidence": the plain evidence sentence;
    "generic": no evidence at all, an honest generic sentence)."""

    text: str
    verified: bool
    source: str
    claims: tuple[Claim, ...]
    evidence: tuple[Evidence, ...]

    def as_json(self, with_evidence: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {"reason": self.text, "verified": self.verified, "reason_source": self.source}
        if with_evidence:
            out["evidence"] = [e.as_json() for e in self.evidence]
        return out


def choose_reason(checker: ClaimChecker, samples: Sequence[str | None], facts: Sequence[Evidence],
                  history_titles: Sequence[str], candidate_title: str | None, has_history: bool) -> ServedReason:
    """The reason to return: of the model's finished, non-degenerate `samples` (greedy first), the verified one with
    the most claims (ties: the earlier), else the plain evidence sentence (`llmrec.evidence.phrase`), else the
    generic one. A sample that states anything the evidence does not hold is never returned."""
    best: tuple[int, str, list[Claim]] | None = None
    for text in samples:
        if not text or not servable(text):
            continue
        claims = checker.check(text, facts, history_titles, candidate_title)
        if verified(claims) and (best is None or len(claims) > best[0]):
            best = (len(claims), text, claims)
    if best is not None:
        return ServedReason(best[1], True, "model", tuple(best[2]), tuple(facts))
    text = phrase(facts, has_history)
    claims = checker.check(text, facts, history_titles, candidate_title)
    source = "generic" if text == GENERIC_REASON else "evidence"
    return ServedReason(text, verified(claims), source, tuple(claims), tuple(facts))
