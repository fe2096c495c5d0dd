"""Reason checks: claim extraction and truth against hand-written reasons, metrics against hand-computed values."""
from __future__ import annotations

import pandas as pd
import pytest

from eval.reasons import Claim, ReasonChecker, distinct_n, is_degenerate, reason_metrics, sentences

SONGS = pd.DataFrame({
    "song_id": ["s1", "s2", "s3", "s4", "s5"],
    "title": ["Golden Harbor", "Silent River", "Paper Crown", "Dark Horse", "Velvet Avenue"],
    "artist": ["The Foxes", "DJ Jazz Echo", "The Foxes", "Nova", "Big Parade"],
    "genres": [["rock"], ["folk"], ["hiphop"], ["rnb"], ["jazz"]],
})
ATTRS = pd.DataFrame({
    "song_id": ["s1", "s2", "s3", "s4", "s5"],
    "genre": ["rock", "folk", "hiphop", "rnb", "jazz"],
    "mood": ["calm", "dark", "calm", "happy", "melancholic"],
    "instrument": ["piano", "guitar", "piano", "strings", "synth"],
    "tempo_class": ["fast", "slow", "fast", "medium", "slow"],
    "mode": ["major", "minor", "minor", "major", "minor"],
})


@pytest.fixture(scope="module")
def checker():
    return ReasonChecker(SONGS, ATTRS)


def facts(claims: list[Claim]) -> set[tuple[str, str, bool]]:
    return {(c.kind, c.value, c.true) for c in claims}


def test_true_genre_claim(checker):
    assert facts(checker.check("A rock song for your evening.", "s1")) == {("genre", "rock", True)}


def test_false_mood_claim_next_to_a_true_one(checker):
    claims = checker.check("This is a rock song with a dark cover.", "s1")
    assert facts(claims) == {("genre", "rock", True), ("mood", "dark", False)}
    mood = next(c for c in claims if c.kind == "mood")
    assert mood.on_candidate is False and mood.on_history is None and mood.text == "dark"


def test_history_title_claim_and_attributes_shared_with_it(checker):
    text = 'Recommended because you played "Paper Crown", and this is a fast piano song just like it.'
    claims = checker.check(text, "s1", ["s3", "s2"])
    assert facts(claims) == {("history_title", "Paper Crown", True), ("tempo_class", "fast", True),
                             ("instrument", "piano", True)}
    # The named history song is slow: "fast ... like it" is true of the candidate but not of "Silent River".
    claims = checker.check('Like "Silent River" from your recent plays, this is a fast song.', "s1", ["s3", "s2"])
    tempo = next(c for c in claims if c.kind == "tempo_class")
    assert (tempo.on_candidate, tempo.on_history, tempo.true) == (True, False, False)
    # A title the listener never played (it is in the catalog, but not in the history shown) is a false claim.
    assert facts(checker.check('You played "Dark Horse" a lot.', "s1", ["s2"])) == {
        ("history_title", "Dark Horse", False)}
    # Quoting the candidate's own title claims nothing about the history.
    assert checker.check('"Golden Harbor" it is.', "s1", ["s2"]) == []


def test_a_sentence_naming_no_history_song_is_about_the_candidate_alone(checker):
    """The shared-attribute scope ends with the sentence: the example generator's second sentence states what only
    the candidate has."""
    # s1 is a calm fast piano rock song; "Paper Crown" (s3) is calm, fast and piano but hip-hop.
    text = 'You recently enjoyed "Paper Crown"; this is a fast piano song as well. Unlike that one, this is a rock song.'
    claims = {c.kind: c for c in checker.check(text, "s1", ["s3"])}
    assert (claims["genre"].on_candidate, claims["genre"].on_history, claims["genre"].true) == (True, None, True)
    assert claims["tempo_class"].on_history is True and claims["instrument"].true
    # In the first sentence the same word is a claim about "Paper Crown" too, and false there.
    wrong = {c.kind: c for c in checker.check('Like "Paper Crown", this is a rock song. Enjoy.', "s1", ["s3"])}
    assert (wrong["genre"].on_candidate, wrong["genre"].on_history, wrong["genre"].true) == (True, False, False)
    # A fact said in both sentences counts once, with the scope of its first mention.
    twice = checker.check('Like "Paper Crown", this is a rock song. Unlike that one, this is rock.', "s1", ["s3"])
    assert [c.kind for c in twice].count("genre") == 1 and not next(c for c in twice if c.kind == "genre").true


def test_sentences_are_cut_outside_quoted_titles():
    assert sentences('You played "Mr. Brown. Live"! Now this. And') == ['You played "Mr. Brown. Live"!', " Now this.",
                                                                         " And"]
    assert sentences("No end mark") == ["No end mark"] and sentences("") == []
    assert sentences("3.5 stars... really?") == ["3.5 stars...", " really?"]


def test_reason_without_claims(checker):
    assert checker.check("Enjoy this one, we think you will like it.", "s1", ["s2"]) == []
    m = reason_metrics(["Enjoy this one, we think you will like it."], [[]])
    assert m["faithfulness"] is None and m["hallucination_rate"] == 0.0 and m["claims_per_reason"] == 0.0


def test_surface_words_of_the_example_generator_and_key_phrases(checker):
    text = "A mid-tempo R&B song in a major key with string sections."
    assert facts(checker.check(text, "s4")) == {("tempo_class", "medium", True), ("genre", "rnb", True),
                                                ("mode", "major", True), ("instrument", "strings", True)}
    assert facts(checker.check("A hip-hop track.", "s3")) == {("genre", "hiphop", True)}
    assert checker.check("A minor hit from last summer.", "s3") == []  # bare "minor" is not a key claim


def test_titles_and_artists_are_not_read_as_attribute_words(checker):
    # "Dark Horse" is a title (no mood claim); "DJ Jazz Echo" is an artist (longest match), not the genre jazz.
    claims = checker.check('You played "Dark Horse"; this folk song by DJ Jazz Echo fits.', "s2", ["s4"])
    assert facts(claims) == {("history_title", "Dark Horse", True), ("genre", "folk", False),
                             ("artist", "dj jazz echo", False)}
    # ... false because "Dark Horse" (s4) is neither folk nor by DJ Jazz Echo, although the candidate s2 is both.
    assert all(c.on_candidate for c in claims if c.kind != "history_title")
    assert facts(checker.check("More by The Foxes.", "s3")) == {("artist", "the foxes", True)}
    assert facts(checker.check("More by The Foxes.", "s2")) == {("artist", "the foxes", False)}


def test_one_word_artist_names_need_their_case_and_repeats_count_once(checker):
    assert checker.check("a nova of sound", "s4") == []
    assert facts(checker.check("Nova again: Nova, Nova.", "s4")) == {("artist", "nova", True)}
    assert len(checker.check("Rock, rock and more rock.", "s1")) == 1


def test_unknown_song_is_named(checker):
    with pytest.raises(KeyError, match="'s9' is not in the catalog"):
        checker.check("rock", "s9")


def test_metrics_against_hand_computed_values(checker):
    texts = ["A rock song with a dark cover.",  # 7 words; rock true, dark false
             'Recommended because you played "Paper Crown", and this is a fast piano song just like it.',  # 16; 3 true
             "Enjoy!"]  # 1 word: no claims, degenerate
    claims = [checker.check(texts[0], "s1"), checker.check(texts[1], "s1", ["s3"]), checker.check(texts[2], "s1")]
    m = reason_metrics(texts, claims)
    assert m["n"] == 3
    assert m["faithfulness"] == pytest.approx(4 / 5)
    assert m["hallucination_rate"] == pytest.approx(1 / 3)
    assert m["claims_per_reason"] == pytest.approx(5 / 3)
    assert m["grounded_share"] == pytest.approx(1 / 3)
    assert m["mean_words"] == pytest.approx((7 + 16 + 1) / 3)
    assert m["degenerate_share"] == pytest.approx(1 / 3) and m["empty_share"] == 0.0 and m["unique_share"] == 1.0
    # The same reason twice (case and punctuation aside) and one other: 2 distinct of 3.
    assert reason_metrics(["A rock song.", "a ROCK song", "A jazz song."], [[]] * 3)["unique_share"] == 2 / 3
    # "dark" is false of the candidate s1; no history was given, so there is no history side to check.
    assert m["by_kind"]["mood"] == {"n": 1, "faithfulness": 0.0, "true_on_candidate": 0.0}
    assert m["by_kind"]["genre"] == {"n": 1, "faithfulness": 1.0, "true_on_candidate": 1.0}
    # "fast" and "piano" are true of s1 and of the history song "Paper Crown" (s3) that the reason names.
    assert m["by_kind"]["tempo_class"] == {"n": 1, "faithfulness": 1.0, "true_on_candidate": 1.0,
                                           "true_on_history": 1.0}
    assert m["by_kind"]["history_title"] == {"n": 1, "faithfulness": 1.0}  # a title has no candidate side
    # Right about the candidate, wrong about the history song it is tied to ("Silent River" is slow).
    half = reason_metrics(["x"], [checker.check('Like "Silent River" from your recent plays, this is a fast song.',
                                                "s1", ["s3", "s2"])])
    assert half["by_kind"]["tempo_class"] == {"n": 1, "faithfulness": 0.0, "true_on_candidate": 1.0,
                                              "true_on_history": 0.0}
    empty = reason_metrics(["", "  "], [[], []])
    assert empty["empty_share"] == 1.0 and empty["distinct_1"] is None and empty["faithfulness"] is None
    with pytest.raises(ValueError, match="2 reasons but 1 claim lists"):
        reason_metrics(["a", "b"], [[]])


def test_distinct_n_counts_repeated_ngrams_across_reasons():
    # unigrams a b a b | a b c: 7, of which 3 distinct; bigrams ab ba ab | ab bc: 5, of which 3 distinct.
    assert distinct_n(["a b a b", "A b c"], 1) == pytest.approx(3 / 7)
    assert distinct_n(["a b a b", "A b c"], 2) == pytest.approx(3 / 5)
    assert distinct_n(["one"], 2) is None


def test_degenerate_reasons():
    assert is_degenerate("") and is_degenerate("ok then")
    assert is_degenerate("la la la la la")  # (la, la, la) three times: a loop
    assert not is_degenerate("the song the song the song")  # each 3-gram only twice
    assert not is_degenerate("A calm piano song, like the ones you replay at night.")


# ------------------------------------------------------------------------------------------------ generation + report

import argparse  # noqa: E402
import copy  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from data_prep.synthetic import load_song_attributes  # noqa: E402
from eval import reasons as rs  # noqa: E402
from eval.report import positives, run_eval  # noqa: E402
from llmrec.io import open_run_dir  # noqa: E402
from llmrec.schema import load_catalog  # noqa: E402
from llmrec.split import split_catalog  # noqa: E402
from train.collate import MultimodalCollator  # noqa: E402

CONTRACT = {"faithfulness", "hallucination_rate", "claims_per_reason", "distinct_1", "distinct_2", "mean_words",
            "n", "latency_ms_per_reason", "samples"}
L, K, D = 2, 2, 8  # feature layers, tokens per modality, feature width of the fake features


def write_fake_features(features_dir, song_ids: list[str]) -> None:
    """What `llmrec features` leaves behind, in the reader's format (llmrec.features), with random features."""
    g = torch.Generator().manual_seed(0)
    n = len(song_ids)
    features_dir.mkdir(parents=True, exist_ok=True)
    save_file({"audio": torch.randn(n, L, K, D, generator=g), "audio_present": torch.ones(n, dtype=torch.uint8),
               "cover": torch.randn(n, 1, K, D, generator=g), "cover_present": torch.ones(n, dtype=torch.uint8)},
              str(features_dir / "shard-00000.safetensors"), metadata={"song_ids": json.dumps(song_ids)})
    sha = hashlib.sha256(json.dumps(song_ids).encode()).hexdigest()
    (features_dir / "manifest.json").write_text(json.dumps(
        {"complete": True, "shards": {"shard-00000.safetensors": {"index": 0, "song_ids_sha": sha}}}))
    vecs = torch.randn(n, 16, generator=g)
    save_file({"text": vecs / vecs.norm(dim=1, keepdim=True)}, str(features_dir / "text.safetensors"),
              metadata={"song_ids": json.dumps(song_ids), "encoder": "test-random"})


def write_random_bundle(out, songs) -> None:
    """An untrained multimodal LM (1-layer, 32-wide Llama; BPE on the catalog titles), exported as in training."""
    from llmrec.config import ModelConfig
    from llmrec.model.backbone import build_tiny_llama, train_bpe_tokenizer
    from llmrec.model.mm_lm import MMConfig, MultimodalLM
    from train.export import export_bundle

    tok = train_bpe_tokenizer(list(songs.title) + list(songs.artist), vocab_size=400)
    lm = build_tiny_llama(ModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                                      max_positions=4096), tok)
    cfg = MMConfig(projector="linear", audio_layers=L, audio_tokens=K, audio_dim=D, cover_layers=1, cover_tokens=K,
                   cover_dim=D, embedding_dim=8, cf_dim=4)
    torch.manual_seed(0)
    model = MultimodalLM(lm, tok, cfg).eval()
    with torch.no_grad():  # large random weights: the greedy continuation then depends on the prompt and media
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    export_bundle(model, out)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, synthetic_catalog, quick_config):
    run = open_run_dir(tmp_path_factory.mktemp("reasons") / "run")
    run.catalog.symlink_to(synthetic_catalog.root, target_is_directory=True)
    write_fake_features(run.features, list(synthetic_catalog.songs.song_id))
    write_random_bundle(run.model / "bundle", synthetic_catalog.songs)
    cfg = copy.deepcopy(quick_config)
    cfg.eval.reasons, cfg.eval.reasons_max_new_tokens, cfg.eval.tune, cfg.eval.bootstrap = 4, 6, False, 20
    cfg.train.max_length = 4096  # the test tokenizer's 400-token BPE makes long prompts
    return cfg, run


def split_frames(catalog, cfg):
    split = split_catalog(catalog, cfg.eval.split, cfg.eval.valid_days)
    return positives(pd.concat([split.train, split.valid], ignore_index=True)), positives(split.test)


def test_sampled_cases_use_training_history_only(synthetic_catalog, quick_config):
    cat, cfg = synthetic_catalog, quick_config
    train, test = split_frames(cat, cfg)
    cases, skipped = rs.sample_cases(cat.songs, train, test, 20, seed=0, prompt_config=cfg.prompt)
    assert len(cases) == 20 and len({(c.user_id, c.song_id) for c in cases}) == 20
    train_pairs = set(zip(train.user_id, train.song_id))
    test_pairs = set(zip(test.user_id, test.song_id))
    assert skipped["repeat_pairs"] == len(test_pairs & train_pairs)
    for c in cases:
        assert (c.user_id, c.song_id) in test_pairs and (c.user_id, c.song_id) not in train_pairs
        mine = train[train.user_id == c.user_id].sort_values("timestamp", kind="stable")
        assert set(c.history) <= set(mine.song_id) and c.song_id not in c.history
        assert 1 <= len(c.history) <= cfg.prompt.history_len
        assert c.history[0] == mine.song_id.iloc[-1]  # most recent training play first
        title = cat.songs.set_index("song_id").title[c.history[0]]
        assert f'1. <audio><cover> "{title}"' in c.prompt.text
    again, _ = rs.sample_cases(cat.songs, train, test, 20, seed=0, prompt_config=cfg.prompt)
    assert [(c.user_id, c.song_id) for c in again] == [(c.user_id, c.song_id) for c in cases]
    other, _ = rs.sample_cases(cat.songs, train, test, 20, seed=1, prompt_config=cfg.prompt)
    assert {(c.user_id, c.song_id) for c in other} != {(c.user_id, c.song_id) for c in cases}
    # A test play of a song the catalog does not have, and one by a user with no training plays: skipped, counted.
    odd = pd.DataFrame({"user_id": [train.user_id.iloc[0], "newcomer"],
                        "song_id": ["no-such-song", test.song_id.iloc[0]]})
    cases, skipped = rs.sample_cases(cat.songs, train, odd, 5, seed=0, prompt_config=cfg.prompt)
    assert cases == [] and skipped == {"repeat_pairs": 0, "users_without_history": 1, "songs_not_in_catalog": 1}


def test_template_reasons_pass_the_checker(synthetic_catalog, quick_config):
    """The example generator only states shared attributes: every one of its claims must check out."""
    cat, cfg = synthetic_catalog, quick_config
    attrs = load_song_attributes(cat.root)
    cases, _ = rs.sample_cases(cat.songs, *split_frames(cat, cfg), 40, seed=0, prompt_config=cfg.prompt)
    texts = rs.template_reasons(cases, cat.songs, attrs, seed=0, prompt_config=cfg.prompt)
    m, _ = rs.score_reasons(rs.ReasonChecker(cat.songs, attrs, cfg.prompt), texts, [c.song_id for c in cases],
                            [c.history for c in cases])
    assert m["n"] == 40 and m["claims_per_reason"] >= 1.0
    assert m["faithfulness"] == 1.0 and m["hallucination_rate"] == 0.0


def engine_and_prompts(tiny_run, catalog, n: int):
    """The transformers engine over the tiny run's bundle, its features and the prompts of `n` sampled plays."""
    from llmrec.features import load_media_features
    from serve.engines.hf import HFEngine

    cfg, run = tiny_run
    cases, _ = rs.sample_cases(catalog.songs, *split_frames(catalog, cfg), n, seed=0, prompt_config=cfg.prompt)
    return HFEngine(run.model / "bundle"), load_media_features(run.features), [c.prompt for c in cases]


def test_batched_left_padded_generation_equals_one_at_a_time(tiny_run, synthetic_catalog):
    engine, features, prompts = engine_and_prompts(tiny_run, synthetic_catalog, 3)
    batched, seconds = rs.generate_reasons(engine, features, prompts, 5, batch_size=3, max_length=4096)
    alone = [rs.generate_reasons(engine, features, [p], 5, batch_size=1, max_length=4096)[0][0] for p in prompts]
    assert batched == alone and all(isinstance(t, str) for t in batched) and seconds > 0
    assert len(set(batched)) > 1  # outputs differ per prompt, so a padding or media-order mistake would show
    # Prompts of different lengths really were padded in the batch.
    assert len({len(p.text) for p in prompts}) > 1
    # A prompt over max_length is not generated (None), the others are.
    collate = MultimodalCollator(engine.model.tokenizer, features, K, K, max_length=4096)
    lengths = [len(collate.encode(p.text, None)[0]) for p in prompts]
    shortest = int(np.argmin(lengths))
    cut, _ = rs.generate_reasons(engine, features, prompts, 5, max_length=lengths[shortest])
    assert cut[shortest] == batched[shortest] and None in cut


def test_prompt_dependence_compares_own_and_rotated_prompts(tiny_run, synthetic_catalog):
    engine, features, prompts = engine_and_prompts(tiny_run, synthetic_catalog, 4)
    model = engine.model
    answers = ["a slow piano song.", "Recommended because it is fast.", "A calm cover.", "Like your jazz plays."]
    dep = rs.prompt_dependence(model, features, prompts, answers, batch_size=3, max_length=4096)
    # by hand: the first pair alone, teacher-forced, is what the own-prompt loss averages over with the others
    collate = MultimodalCollator(model.tokenizer, features, K, K, max_length=4096)
    batch = collate([{"prompt": prompts[0].text, "answer": answers[0], "audio_song_ids": prompts[0].audio_song_ids,
                      "cover_song_ids": prompts[0].cover_song_ids}])
    with torch.inference_mode():
        first = float(model(batch["input_ids"], batch["attention_mask"], batch["labels"], batch["media"]).loss)
    one = rs.prompt_dependence(model, features, prompts[:1] * 2, answers[:1] * 2, max_length=4096)
    assert one["answer_loss"] == pytest.approx(first, rel=1e-5) and one["prompt_gain"] == pytest.approx(0, abs=1e-6)
    assert np.isfinite(dep["answer_loss"]) and np.isfinite(dep["answer_loss_other_prompt"])
    assert dep["prompt_gain"] == pytest.approx(dep["answer_loss_other_prompt"] - dep["answer_loss"])
    # one identical prompt for every answer: rotating the answers only reorders the pairs, so the gain is 0
    same = rs.prompt_dependence(model, features, prompts[:1] * 4, answers, batch_size=4, max_length=4096)
    assert same["prompt_gain"] == pytest.approx(0, abs=1e-5)
    assert rs.prompt_dependence(model, features, prompts[:1], answers[:1])["prompt_gain"] is None


def test_eval_report_has_a_reasons_section(tiny_run):
    cfg, run = tiny_run
    run_eval(cfg, run, argparse.Namespace(no_progress=True))
    report = json.loads((run.eval / "report.json").read_text())
    r = report["reasons"]
    assert CONTRACT <= set(r) and r["n"] == 4 and "skipped" not in r
    for key in ("hallucination_rate", "distinct_1", "distinct_2", "degenerate_share", "empty_share"):
        assert 0.0 <= r[key] <= 1.0, key
    assert r["faithfulness"] is None or 0.0 <= r["faithfulness"] <= 1.0
    assert r["latency_ms_per_reason"] > 0 and r["claims_per_reason"] >= 0
    assert r["template"]["faithfulness"] == 1.0
    dep = r["prompt_dependence"]
    assert dep["answer_loss"] > 0 and dep["prompt_gain"] == pytest.approx(dep["answer_loss_other_prompt"] -
                                                                         dep["answer_loss"])
    # The section agrees with the checker on the very texts it reports (all 4 are among the samples).
    checker = rs.ReasonChecker(load_catalog(run.catalog).songs,
                               load_song_attributes(run.catalog), cfg.prompt)
    texts = [s["reason"] for s in r["samples"]]
    claims = [checker.check(s["reason"], s["song"], s["history"]) for s in r["samples"]]
    assert [rs._claims_json(c) for c in claims] == [s["claims"] for s in r["samples"]]
    again = rs.reason_metrics(texts, claims)
    for key in ("faithfulness", "hallucination_rate", "claims_per_reason", "distinct_1", "distinct_2", "mean_words"):
        assert again[key] == (pytest.approx(r[key]) if r[key] is not None else None), key
    md = (run.eval / "report.md").read_text()
    assert "## Reasons" in md and "| template (" in md and md.count(f"- {r['samples'][0]['user']} →") >= 1


def test_without_a_bundle_the_section_says_so_and_keeps_the_template_reference(tmp_path, tiny_run,
                                                                               synthetic_catalog):
    cfg, _ = tiny_run
    run = open_run_dir(tmp_path / "run")
    run.catalog.symlink_to(synthetic_catalog.root, target_is_directory=True)
    r = rs.evaluate_reasons(cfg, run, synthetic_catalog, *split_frames(synthetic_catalog, cfg))
    assert r["n"] == 0 and "llmrec train" in r["skipped"] and r["template"]["n"] == 4
    assert CONTRACT <= set(r) and r["faithfulness"] is None and r["samples"] == []  # not measured: None, not 0
    off = copy.deepcopy(cfg)
    off.eval.reasons = 0
    r = rs.evaluate_reasons(off, run, synthetic_catalog, *split_frames(synthetic_catalog, cfg))
    assert r["n"] == 0 and "eval.reasons=0" in r["skipped"] and r["hallucination_rate"] is None


def test_section_scores_what_the_model_wrote(tiny_run, synthetic_catalog, monkeypatch):
    """Generation swapped for known texts — the candidate's true genre and a mood it does not have — so every
    figure of the section is known by hand: 2 claims per reason, one of them false."""
    cfg, run = tiny_run
    truth = load_song_attributes(synthetic_catalog.root).set_index("song_id")
    moods = sorted(truth["mood"].unique())

    def fake_generate(model, features, prompts, max_new_tokens, batch_size=16, max_length=1024):
        out = []
        for p in prompts:
            sid = (p.audio_song_ids or p.cover_song_ids)[-1]  # the candidate's placeholders come last
            wrong = next(m for m in moods if m != truth.at[sid, "mood"])
            out.append(f"A {truth.at[sid, 'genre']} song with a {wrong} cover.")
        return out, 0.004 * len(prompts)

    monkeypatch.setattr(rs, "generate_reasons", fake_generate)
    r = rs.evaluate_reasons(cfg, run, synthetic_catalog, *split_frames(synthetic_catalog, cfg))
    assert r["n"] == 4 and r["claims_per_reason"] == 2.0
    assert r["faithfulness"] == 0.5 and r["hallucination_rate"] == 1.0 and r["grounded_share"] == 0.0
    assert r["by_kind"] == {"genre": {"n": 4, "faithfulness": 1.0, "true_on_candidate": 1.0},
                            "mood": {"n": 4, "faithfulness": 0.0, "true_on_candidate": 0.0}}
    assert r["mean_words"] == 7.0 and r["latency_ms_per_reason"] == pytest.approx(4.0)
    kinds = [(c["kind"], c["true"]) for c in r["samples"][0]["claims"]]
    assert kinds == [("genre", True), ("mood", False)]


def test_the_markdown_splits_attribute_claims_into_candidate_and_history():
    from eval.report import reasons_markdown

    r = {"n": 2, "faithfulness": 0.5, "by_kind": {
        "history_title": {"n": 2, "faithfulness": 1.0},
        "mood": {"n": 4, "faithfulness": 0.25, "true_on_candidate": 0.75, "true_on_history": 0.5}}}
    md = "\n".join(reasons_markdown(r))
    assert "| mood | 4 | 0.250 | 0.750 | 0.500 |" in md
    assert "| history_title | 2 | 1.000 | – | – |" in md  # a title has no candidate or history side
