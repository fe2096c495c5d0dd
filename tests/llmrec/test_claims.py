"""The claim checker (llmrec.claims): every claim kind, true and false, against hand-written evidence, and the
rerank that picks what the server returns."""
from __future__ import annotations

import pytest

from llmrec.claims import ClaimChecker, choose_reason, sentences, verified
from llmrec.evidence import GENERIC_REASON, Evidence, phrase
from llmrec.text import sanitize_song

SONGS = [sanitize_song(s) for s in [
    {"song_id": "s1", "title": "Golden Harbor", "artist": "The Foxes", "album": "Night Roads", "genres": ["rock"],
     "tags": ["seen live"]},
    {"song_id": "s2", "title": "Silent River", "artist": "DJ Jazz Echo", "genres": ["folk"]},
    {"song_id": "s3", "title": "Paper Crown", "artist": "The Foxes", "album": "Night Roads", "genres": ["rock"]},
    {"song_id": "s5", "title": "Thirteen", "artist": "62"},
    {"song_id": "s4", "title": "Dark Horse", "artist": "Nova", "genres": ["jazz"], "tags": ["it", "new", "song"]},
]]
HISTORY = ["Paper Crown", "Silent River"]
# Evidence for recommending s1 to a listener who played s3 and s2.
FACTS = [Evidence("co_listen", "62", "s3", "Paper Crown", 0.62, listeners=5),
         Evidence("artist", "The Foxes", "s3", "Paper Crown"),
         Evidence("album", "Night Roads", "s3", "Paper Crown"),
         Evidence("genre", "rock", "s3", "Paper Crown"),
         Evidence("tag", "seen live"),
         Evidence("perceived", "fast", confidence=0.91, attribute="tempo"),
         Evidence("keyword", "harbor", attribute="lyrics")]


@pytest.fixture(scope="module")
def checker():
    return ClaimChecker(SONGS, {"perceived": ["fast", "slow", "calm"]})


def said(checker, text, facts=FACTS, history=HISTORY):
    return {(c.kind, c.value, c.true) for c in checker.check(text, facts, history, "Golden Harbor")}


def test_co_listening_claims(checker):
    # (the catalog has an artist called "62": numbers are percentages, never artists)
    assert said(checker, 'Recommended because 62% of the listeners of "Paper Crown" also play it.') == {
        ("history_title", "Paper Crown", True), ("co_listen", "62", True)}
    # a wrong percentage, and the right one tied to the wrong history song
    assert ("co_listen", "70", False) in said(checker, '70% of the listeners of "Paper Crown" also play it.')
    assert ("co_listen", "62", False) in said(checker, '62% of the listeners of "Silent River" also play it.')


def test_artist_album_genre_claims_tied_to_the_history_song_they_name(checker):
    assert said(checker, 'It is by The Foxes, like "Paper Crown".') == {
        ("history_title", "Paper Crown", True), ("artist", "The Foxes", True)}
    assert ("artist", "The Foxes", False) in said(checker, 'It is by The Foxes, like "Silent River".')
    assert ("album", "Night Roads", True) in said(checker, 'It is from the album Night Roads, like "Paper Crown".')
    assert ("genre", "rock", False) in said(checker, 'It is rock like "Silent River".')
    # ... and the same facts stated about the candidate alone (no history song named) hold too
    assert said(checker, "It is a rock song by The Foxes.") == {("genre", "rock", True),
                                                                ("artist", "The Foxes", True)}
    assert said(checker, "It is a jazz song by Nova.") == {("genre", "jazz", False), ("artist", "Nova", False)}


def test_tag_keyword_and_perceived_claims(checker):
    assert said(checker, "It is tagged seen live.") == {("tag", "seen live", True)}
    assert said(checker, 'Its lyrics mention "harbor".') == {("keyword", "harbor", True)}
    assert said(checker, "It sounds fast.") == {("perceived", "fast", True)}
    assert said(checker, "It sounds slow and calm.") == {("perceived", "slow", False), ("perceived", "calm", False)}


def test_quoted_titles_must_come_from_the_history(checker):
    # "Dark Horse" is in the catalog but not in this listener's history: an invented history song
    assert said(checker, 'You played "Dark Horse" a lot.') == {("quote", "Dark Horse", False)}
    assert said(checker, '"Golden Harbor" is for you.') == set()  # the candidate's own title claims nothing
    assert checker.check("Enjoy this one.", FACTS, HISTORY) == []


def test_vocabulary_is_the_catalogs_with_longest_match_and_case(checker):
    # "DJ Jazz Echo" is an artist (longest match), not the genre jazz; one-word artists need their case
    assert said(checker, "More by DJ Jazz Echo.") == {("artist", "DJ Jazz Echo", False)}
    assert said(checker, "a nova of sound") == set()
    assert said(checker, "Rock, rock and more rock.") == {("genre", "rock", True)}  # a fact said twice counts once
    # lastfm-2k users tag artists "it", "new", "song": labels made of the phrasing's own words are not claims
    assert said(checker, "Something new: it is a rock song.") == {("genre", "rock", True)}


def test_sentences_are_cut_outside_quoted_titles():
    assert sentences('You played "Mr. Brown. Live"! Now this. And') == ['You played "Mr. Brown. Live"!', " Now this.",
                                                                         " And"]
    assert sentences("No end mark") == ["No end mark"] and sentences("") == []


def test_every_evidence_sentence_verifies(checker):
    for n in range(1, len(FACTS) + 1):
        for has_history in (True, False):
            text = phrase(FACTS[:n], has_history)
            assert verified(checker.check(text, FACTS[:n], HISTORY, "Golden Harbor")), text


def test_rerank_never_returns_a_false_sample_when_a_true_one_exists(checker):
    false = 'Recommended because 90% of the listeners of "Paper Crown" also play it.'
    true = 'Recommended because 62% of the listeners of "Paper Crown" also play it. It sounds fast.'
    titles_only = 'You played "Paper Crown".'
    r = choose_reason(checker, [false, None, titles_only, true], FACTS, HISTORY, "Golden Harbor", True)
    assert (r.text, r.verified, r.source) == (true, True, "model")
    # nothing holds: the plain evidence sentence, verified; no evidence at all: the generic one, unverified
    r = choose_reason(checker, [false, titles_only], FACTS, HISTORY, "Golden Harbor", True)
    assert r.source == "evidence" and r.verified and r.text == phrase(FACTS, True)
    r = choose_reason(checker, [false], [], HISTORY, "Golden Harbor", True)
    assert (r.text, r.verified, r.source) == (GENERIC_REASON, False, "generic")
    assert r.as_json(with_evidence=True)["evidence"] == [] and "evidence" not in r.as_json()


def test_listener_without_history_gets_the_candidates_own_evidence_said_as_such(checker):
    own = [e for e in FACTS if not e.linked]
    text = phrase(own, has_history=False)
    assert text.startswith("You have no plays yet") and verified(checker.check(text, own, [], "Golden Harbor"))


def test_cut_off_or_looping_answers_are_never_returned_even_with_true_claims(checker):
    cut = 'Recommended because 62% of the listeners of "Paper Crown" also play it and the song is also'
    loop = "It sounds fast. It sounds fast. It sounds fast."
    r = choose_reason(checker, [cut, loop], FACTS, HISTORY, "Golden Harbor", True)
    assert r.source == "evidence" and r.text == phrase(FACTS, True)
    done = cut.replace(" and the song is also", ".")
    assert choose_reason(checker, [cut, done], FACTS, HISTORY, "Golden Harbor", True).text == done


def test_a_fact_shared_with_two_history_songs_is_said_once_and_short_answers_are_not_served(checker):
    twice = [Evidence("genre", "rock", "s3", "Paper Crown"), Evidence("genre", "rock", "s2", "Silent River")]
    assert phrase(twice, True) == 'Recommended because it is rock like "Paper Crown".'
    # ... and the facts keep their evidence order
    mixed = [twice[0], Evidence("tag", "seen live", "s3", "Paper Crown"), twice[1]]
    assert phrase(mixed, True) == ('Recommended because it is rock like "Paper Crown" and it is tagged seen live '
                                   'like "Paper Crown".')
    r = choose_reason(checker, ["By The Foxes."], FACTS, HISTORY, "Golden Harbor", True)
    assert r.source == "evidence"  # true, but three words are not a reason


def test_names_no_vocabulary_explains_are_false_claims(checker):
    # a misspelt artist and a service the evidence knows nothing about
    assert said(checker, "It is by The Foxes, not Ldle Maple.") == {("artist", "The Foxes", True),
                                                                    ("name", "Ldle", False), ("name", "Maple", False)}
    assert ("name", "Spotify", False) in said(checker, "It is a rock song on Spotify.")
    # the first word of a sentence, and "I", are just capitalised
    assert said(checker, "Rock it is. I think so.") == {("genre", "rock", True)}
