"""Verified reasons (serve/reasons.py): which answers are generated, round by round, and what is returned."""
from __future__ import annotations

import copy

import pytest

from llmrec.evidence import phrase
from llmrec.split import positive_plays
from serve.reasons import ReasonWriter


@pytest.fixture(scope="module")
def catalog_and_plays(synthetic_catalog):
    return {r["song_id"]: r for r in synthetic_catalog.songs.to_dict("records")}, \
        positive_plays(synthetic_catalog.interactions)


def writer_for(quick_config, catalog_and_plays, sampling: str, samples: int = 3) -> ReasonWriter:
    cfg = copy.deepcopy(quick_config)
    cfg.serve.reason_sampling, cfg.serve.reason_samples = sampling, samples
    return ReasonWriter(cfg, *catalog_and_plays)


def candidates(writer: ReasonWriter, n: int = 4) -> tuple[list[str], list[str]]:
    songs = sorted(writer.builder.songs)
    return songs[:3], songs[10:10 + n]


def test_samples_are_written_only_for_candidates_whose_greedy_reason_fails(quick_config, catalog_and_plays):
    """Greedy answers first; the first two candidates' are false, the others are their evidence sentences (true):
    only the first two get sampled answers, in a second round, and the true greedy ones are returned as written."""
    writer = writer_for(quick_config, catalog_and_plays, "when_unverified")
    history, songs = candidates(writer)
    plan = writer.plan(history, songs)
    truthful = {p.text: phrase(ev, bool(p.history_song_ids)) for p, ev in plan.cases}
    calls = []

    def generate(requests):
        calls.append([seed for _, seed in requests])
        return [("It is by Nobody At All." if seed is None and k < 2 else truthful[p.text])
                for k, (p, seed) in enumerate(requests)]

    served = writer.write(history, songs, None, generate)
    assert calls[0] == [None] * 4  # round 1: the greedy answer of every candidate
    assert len(calls) == 2 and len(calls[1]) == 2 * 2 and None not in calls[1]  # round 2: 2 samples for 2 of them
    assert [r.source for r in served] == ["model"] * 4 and all(r.verified for r in served)
    assert not any("Nobody" in r.text for r in served)


def test_always_writes_every_answer_in_one_round(quick_config, catalog_and_plays):
    writer = writer_for(quick_config, catalog_and_plays, "always")
    history, songs = candidates(writer)
    calls = []
    writer.write(history, songs, None, lambda reqs: calls.append(len(reqs)) or ["It is by Nobody At All."] * len(reqs))
    assert calls == [4 * 3]


def test_an_unknown_sampling_mode_is_refused_with_the_choices(quick_config, catalog_and_plays):
    with pytest.raises(ValueError, match="serve.reason_sampling 'sometimes'.*'when_unverified', 'always'"):
        writer_for(quick_config, catalog_and_plays, "sometimes")
