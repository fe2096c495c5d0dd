"""The evidence builder (llmrec.evidence) on a title/artist-only catalog, the kind #nowplaying is: co-listening and
the artist carry the reason, and the phrasing states exactly that."""
from __future__ import annotations

import pandas as pd

from llmrec.claims import ClaimChecker, verified
from llmrec.evidence import GENERIC_REASON, EvidenceBuilder, phrase
from llmrec.text import sanitize_song

SONGS = {s["song_id"]: s for s in [
    {"song_id": "a", "title": "Halo", "artist": "Beyoncé"},
    {"song_id": "b", "title": "Irreplaceable", "artist": "Beyoncé"},
    {"song_id": "c", "title": "Fallin'", "artist": "Alicia Keys"},
    {"song_id": "d", "title": "Unheard", "artist": ""},
]}
# u1..u4 played a and b; u3, u4 also c; nobody played d
PLAYS = pd.DataFrame({"user_id": ["u1", "u1", "u2", "u2", "u3", "u3", "u3", "u4", "u4", "u4"],
                      "song_id": ["a", "b", "a", "b", "a", "b", "c", "a", "b", "c"]})


def test_title_artist_only_catalog_gets_co_listening_and_artist_evidence():
    builder = EvidenceBuilder(SONGS, PLAYS)
    items = builder.build(["a"], "b", user="u1")
    assert [(e.kind, e.value, e.history_song_id) for e in items] == [
        ("co_listen", "100", "a"), ("artist", "Beyoncé", "a")]  # the 3 OTHER listeners of "Halo" all play it
    text = phrase(items, has_history=True)
    assert text == 'Recommended because 100% of the listeners of "Halo" also play it and it is by "Beyoncé", like ' \
                   '"Halo".'
    checker = ClaimChecker([sanitize_song(s) for s in SONGS.values()])
    assert verified(checker.check(text, items, ["Halo"], "Irreplaceable"))
    # a song nobody played, by an unknown artist: no evidence, and the honest generic sentence
    assert builder.build(["a"], "d", user="u1") == [] and phrase([], True) == GENERIC_REASON
    # c: 2 of the 3 other listeners of "Halo" play it (67%); a different artist, so co-listening alone
    assert [(e.kind, e.value) for e in builder.build(["a"], "c", user="u1")] == [("co_listen", "67"),
                                                                                  ("artist", "Alicia Keys")]
