"""The reasons section (eval/reasons.py): metrics against hand-computed values, and the section scoring what the
endpoint returns. The claim checker itself is tested in tests/llmrec/test_claims.py."""
from __future__ import annotations

import pandas as pd
import pytest

from eval.reasons import distinct_n, is_degenerate, reason_metrics
from llmrec.claims import Claim


def test_metrics_against_hand_computed_values():
    texts = ["A rock song with a dark cover.",  # 7 words; rock true, dark false
             'Recommended because you played "Paper Crown", and it is by The Foxes.',  # 12; title + artist true
             'You played "Paper Crown".',  # 4 words, a title only: nothing checkable
             "Enjoy!"]  # 1 word: no claims, degenerate
    claims = [[Claim("genre", "rock", "rock", True), Claim("perceived", "dark", "dark", False)],
              [Claim("history_title", "Paper Crown", '"Paper Crown"', True),
               Claim("artist", "The Foxes", "The Foxes", True)],
              [Claim("quote", "Paper Crown", '"Paper Crown"', False)], []]
    m = reason_metrics(texts, claims, ["model", "model", "evidence", "generic"])
    assert m["n"] == 4
    assert m["faithfulness"] == pytest.approx(3 / 5)
    assert m["hallucination_rate"] == pytest.approx(2 / 4)
    assert m["claims_per_reason"] == pytest.approx(5 / 4)
    assert m["no_claim_share"] == pytest.approx(1 / 4)  # the last; a false quote is a (false) claim
    assert m["titles_from_history"] == pytest.approx(1 / 2)
    assert m["mean_words"] == pytest.approx((7 + 12 + 4 + 1) / 4)
    assert m["degenerate_share"] == pytest.approx(1 / 4) and m["empty_share"] == 0.0 and m["unique_share"] == 1.0
    assert m["by_kind"]["perceived"] == {"n": 1, "faithfulness": 0.0}
    assert m["by_kind"]["artist"] == {"n": 1, "faithfulness": 1.0}
    assert m["sources"] == {"model": 0.5, "evidence": 0.25, "generic": 0.25}
    assert reason_metrics(["A rock song.", "a ROCK song", "A jazz song."], [[]] * 3)["unique_share"] == 2 / 3
    empty = reason_metrics(["", "  "], [[], []])
    assert empty["empty_share"] == 1.0 and empty["distinct_1"] is None and empty["faithfulness"] is None
    assert "sources" not in empty
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

from eval import reasons as rs  # noqa: E402
from eval.report import positives, run_eval  # noqa: E402
from llmrec.evidence import phrase  # noqa: E402
from llmrec.io import open_run_dir  # noqa: E402
from llmrec.model.collate import MultimodalCollator  # noqa: E402
from llmrec.schema import load_song_attributes  # noqa: E402
from llmrec.split import split_catalog  # noqa: E402

CONTRACT = {"faithfulness", "hallucination_rate", "claims_per_reason", "distinct_1", "distinct_2", "mean_words",
            "n", "latency_ms_per_reason", "samples", "no_claim_share", "titles_from_history", "evidence_sentence"}
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
    again, _ = rs.sample_cases(cat.songs, train, test, 20, seed=0, prompt_config=cfg.prompt)
    assert [(c.user_id, c.song_id) for c in again] == [(c.user_id, c.song_id) for c in cases]
    other, _ = rs.sample_cases(cat.songs, train, test, 20, seed=1, prompt_config=cfg.prompt)
    assert {(c.user_id, c.song_id) for c in other} != {(c.user_id, c.song_id) for c in cases}
    # A test play of a song the catalog does not have, and one by a user with no training plays: skipped, counted.
    odd = pd.DataFrame({"user_id": [train.user_id.iloc[0], "newcomer"],
                        "song_id": ["no-such-song", test.song_id.iloc[0]]})
    cases, skipped = rs.sample_cases(cat.songs, train, odd, 5, seed=0, prompt_config=cfg.prompt)
    assert cases == [] and skipped == {"repeat_pairs": 0, "users_without_history": 1, "songs_not_in_catalog": 1}


def writer_and_plans(cfg, catalog, n: int):
    from llmrec.split import positive_plays
    from serve.reasons import ReasonWriter

    train, test = split_frames(catalog, cfg)
    cases, _ = rs.sample_cases(catalog.songs, train, test, n, seed=0, prompt_config=cfg.prompt)
    writer = ReasonWriter(cfg, {r["song_id"]: r for r in catalog.songs.to_dict("records")}, positive_plays(train))
    return writer, cases, [writer.plan(c.history, [c.song_id], c.user_id) for c in cases]


def test_evidence_sentences_are_true_against_the_ground_truth(synthetic_catalog, quick_config):
    """The fallback states only evidence, and the evidence is true: every claim checks out against the truth."""
    writer, cases, plans = writer_and_plans(quick_config, synthetic_catalog, 40)
    shown = [p.cases[0][0].history_song_ids for p in plans]
    truth = rs.ground_truth(writer, cases, shown, load_song_attributes(synthetic_catalog.root))
    texts = [phrase(p.cases[0][1], bool(h)) for p, h in zip(plans, shown)]
    m = rs.reason_metrics(texts, truth.check(texts))
    assert m["n"] == 40 and m["claims_per_reason"] >= 2.0 and m["no_claim_share"] == 0.0
    assert m["faithfulness"] == 1.0 and m["hallucination_rate"] == 0.0 and m["titles_from_history"] == 1.0
    # the truth knows the synthetic attributes: a wrong mood is caught
    sid = cases[0].song_id
    mood = load_song_attributes(synthetic_catalog.root).set_index("song_id").mood[sid]
    wrong = next(m for m in ("calm", "dark", "happy", "melancholic", "energetic") if m != mood)
    claims = truth.check([f"Its cover looks {wrong}."] + texts[1:])[0]
    assert [(c.kind, c.value, c.true) for c in claims] == [("perceived", wrong, False)]


def engine_and_prompts(tiny_run, catalog, n: int):
    """The transformers engine over the tiny run's bundle, its features and the evidence prompts of `n` plays."""
    from llmrec.features import load_media_features
    from serve.engines.hf import HFEngine

    cfg, run = tiny_run
    _, _, plans = writer_and_plans(cfg, catalog, n)
    return HFEngine(run.model / "bundle"), load_media_features(run.features), [p.cases[0][0] for p in plans]


def test_batched_left_padded_generation_equals_one_at_a_time(tiny_run, synthetic_catalog):
    engine, features, prompts = engine_and_prompts(tiny_run, synthetic_catalog, 3)
    greedy = [(p, None) for p in prompts]
    batched, seconds = rs.generate_reasons(engine, features, greedy, 5, batch_size=3, max_length=4096)
    alone = [rs.generate_reasons(engine, features, [p], 5, batch_size=1, max_length=4096)[0][0] for p in greedy]
    assert batched == alone and all(isinstance(t, str) for t in batched) and seconds > 0
    assert len(set(batched)) > 1  # outputs differ per prompt, so a padding or media-order mistake would show
    # Prompts of different lengths really were padded in the batch.
    assert len({len(p.text) for p in prompts}) > 1
    # A prompt over max_length is not generated (None), the others are.
    collate = MultimodalCollator(engine.model.tokenizer, features, K, K, max_length=4096)
    lengths = [len(collate.encode(p.text, None)[0]) for p in prompts]
    shortest = int(np.argmin(lengths))
    cut, _ = rs.generate_reasons(engine, features, greedy, 5, max_length=lengths[shortest])
    assert cut[shortest] == batched[shortest] and None in cut
    # a sampled answer is reproducible for its seed, and differs from greedy for some prompt
    seeded = [(p, 7) for p in prompts]
    once, _ = rs.generate_reasons(engine, features, seeded, 5, batch_size=3, max_length=4096)
    assert once == rs.generate_reasons(engine, features, seeded, 5, batch_size=3, max_length=4096)[0]
    assert once != batched


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
    for key in ("hallucination_rate", "distinct_1", "distinct_2", "degenerate_share", "empty_share", "verified_share"):
        assert 0.0 <= r[key] <= 1.0, key
    assert r["latency_ms_per_reason"] > 0 and r["claims_per_reason"] >= 0
    assert r["evidence_sentence"]["faithfulness"] == 1.0 and r["model_greedy"]["n"] == 4
    assert sum(r["sources"].values()) == pytest.approx(1.0)
    # what is returned either passed the check (model) or is the evidence sentence; both are true here
    assert all(s["verified"] for s in r["samples"]) and r["faithfulness"] == 1.0
    for s in r["samples"]:
        assert s["reason_source"] != "model" or s["reason"] == s["model_greedy"] or s["reason"]
    dep = r["prompt_dependence"]
    assert dep["answer_loss"] > 0 and dep["prompt_gain"] == pytest.approx(dep["answer_loss_other_prompt"] -
                                                                         dep["answer_loss"])
    md = (run.eval / "report.md").read_text()
    assert "## Reasons" in md and "| plain evidence sentence" in md
    assert md.count(f"- {r['samples'][0]['user']} →") >= 1


def test_without_a_bundle_the_section_says_so_and_keeps_the_evidence_reference(tmp_path, tiny_run,
                                                                              synthetic_catalog):
    cfg, _ = tiny_run
    run = open_run_dir(tmp_path / "run")
    run.catalog.symlink_to(synthetic_catalog.root, target_is_directory=True)
    r = rs.evaluate_reasons(cfg, run, synthetic_catalog, *split_frames(synthetic_catalog, cfg))
    assert r["n"] == 0 and "llmrec train" in r["skipped"] and r["evidence_sentence"]["n"] == 4
    assert CONTRACT <= set(r) and r["faithfulness"] is None and r["samples"] == []  # not measured: None, not 0
    off = copy.deepcopy(cfg)
    off.eval.reasons = 0
    r = rs.evaluate_reasons(off, run, synthetic_catalog, *split_frames(synthetic_catalog, cfg))
    assert r["n"] == 0 and "eval.reasons=0" in r["skipped"] and r["hallucination_rate"] is None


def test_section_scores_what_the_endpoint_returns(tiny_run, synthetic_catalog, monkeypatch):
    """Generation swapped for known texts: the greedy answer claims a mood the candidate does not have, the
    sampled one states its true genre. The endpoint returns the sampled one (verified against the evidence), so the
    served reasons are all true while the model's greedy answers are all false."""
    cfg, run = tiny_run
    truth = load_song_attributes(synthetic_catalog.root).set_index("song_id")
    moods = sorted(truth["mood"].unique())

    def fake_generate(model, features, requests, max_new_tokens, batch_size=16, max_length=1024):
        out = []
        for p, seed in requests:
            sid = (p.audio_song_ids or p.cover_song_ids)[-1]  # the candidate's placeholders come last
            wrong = next(m for m in moods if m != truth.at[sid, "mood"])
            genre = truth.at[sid, "genre"]
            out.append(f"Its cover looks {wrong}." if seed is None else f"It is a {genre} song for you.")
        return out, 0.004 * len(requests)

    monkeypatch.setattr(rs, "generate_reasons", fake_generate)
    r = rs.evaluate_reasons(cfg, run, synthetic_catalog, *split_frames(synthetic_catalog, cfg))
    assert r["n"] == 4 and r["sources"]["model"] == 1.0 and r["verified_share"] == 1.0
    assert r["faithfulness"] == 1.0 and r["hallucination_rate"] == 0.0 and r["claims_per_reason"] == 1.0
    assert r["by_kind"] == {"genre": {"n": 4, "faithfulness": 1.0}}
    g = r["model_greedy"]
    assert g["faithfulness"] == 0.0 and g["hallucination_rate"] == 1.0
    assert g["by_kind"] == {"perceived": {"n": 4, "faithfulness": 0.0}}
    assert r["latency_ms_per_reason"] == pytest.approx(8.0)  # two answers per returned reason
    assert r["answers_generated_per_reason"] == 2.0  # every greedy answer failed: each candidate was sampled
    assert r["samples"][0]["reason"].startswith("It is a ") and r["samples"][0]["reason_source"] == "model"


def test_the_markdown_compares_served_greedy_and_evidence_reasons():
    from eval.render import reasons_markdown

    r = {"n": 2, "faithfulness": 1.0, "by_kind": {"genre": {"n": 2, "faithfulness": 1.0}},
         "model_greedy": {"n": 2, "faithfulness": 0.25, "by_kind": {"perceived": {"n": 4, "faithfulness": 0.25}}},
         "evidence_sentence": {"n": 2, "faithfulness": 1.0}, "verified_share": 1.0,
         "sources": {"model": 0.5, "evidence": 0.5, "generic": 0.0}, "samples_per_reason": 2}
    md = "\n".join(reasons_markdown(r))
    assert "| genre | 2 | 1.000 | 0 | – |" in md and "| perceived | 0 | – | 4 | 0.250 |" in md
    assert "| model's greedy answer, before the check | 0.250 |" in md
    assert "from the model 0.500, the evidence sentence 0.500" in md
