"""Reason quality: does the reason the endpoint returns state things that are true of the song and the listener?

The reasons scored are exactly what `/v1/recommendations` and `/v1/explanations` return (`serve.reasons`): for a
seeded sample of held-out (user, song) plays, the evidence prompt is built from the listener's TRAINING history
only, the run's bundle writes the greedy and sampled answers (the transformers engine, as the server's fallback
engine), and the claim check picks a verified answer or the plain evidence sentence. Every returned reason is then
checked claim by claim (`llmrec.claims`) against the ground truth: all the evidence the catalog and the training
plays support for that pair (`EvidenceBuilder.build(limit=None)`: co-listening with every shown history song,
shared and own artist/album/genres/tags, keywords) plus, on the synthetic catalog, the true audio/cover attributes
(`song_attributes.parquet`) as perceived facts, so a mood or tempo claim is checked against what the song really is.

Also reported, on the same plays: the model's own greedy answers before the check ("model_greedy": how faithful the
LLM is by itself) and the plain evidence sentences ("evidence_sentence": the fallback, a reference ceiling).

Metrics (`reason_metrics`): faithfulness (true claims / all claims) overall and by evidence kind, hallucination
rate (reasons with a false claim / reasons), claims per reason, the share of reasons with no checkable claim
(quoting a history title alone does not count), the share of quoted titles that are from the listener's history,
corpus distinct-1/2 (Li et al. 2016), the share of distinct reasons, mean length, empty and degenerate shares, and
for served reasons the share verified and where they came from (model / evidence / generic).
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from llmrec.claims import QUOTE, TITLE, Claim, ClaimChecker, is_degenerate, words
from llmrec.config import PromptConfig
from llmrec.evidence import Evidence
from llmrec.text import Prompt

# Ground-truth attributes of the synthetic catalog, checked as perceived facts (column -> the attribute's name).
TRUE_ATTRIBUTES = {"tempo_class": "tempo", "instrument": "instrument", "mood": "mood"}


def distinct_n(texts: Iterable[str], n: int) -> float | None:
    """Distinct n-grams / all n-grams over the whole set of texts (corpus-level distinct-n); None without any."""
    grams: Counter = Counter()
    for text in texts:
        w = words(text)
        grams.update(tuple(w[i:i + n]) for i in range(len(w) - n + 1))
    total = sum(grams.values())
    return len(grams) / total if total else None


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None


def reason_metrics(texts: Sequence[str], claims: Sequence[Sequence[Claim]],
                   sources: Sequence[str] | None = None) -> dict[str, Any]:
    """Quality of a set of reasons and their checked claims (one list per reason); `sources` ("model", "evidence",
    "generic") for served reasons. Rates over no claims or no reasons are None, never 0."""
    if len(texts) != len(claims):
        raise ValueError(f"reason_metrics: {len(texts)} reasons but {len(claims)} claim lists")
    flat = [c for cs in claims for c in cs]
    quotes = [c for c in flat if c.kind in (TITLE, QUOTE)]
    out = {
        "n": len(texts),
        "faithfulness": _mean([c.true for c in flat]),
        "hallucination_rate": _mean([any(not c.true for c in cs) for cs in claims]),
        "claims_per_reason": len(flat) / len(texts) if texts else None,
        "no_claim_share": _mean([not any(c.kind != TITLE for c in cs) for cs in claims]),
        "titles_from_history": _mean([c.kind == TITLE for c in quotes]),
        "by_kind": {kind: {"n": sum(c.kind == kind for c in flat),
                           "faithfulness": _mean([c.true for c in flat if c.kind == kind])}
                    for kind in sorted({c.kind for c in flat})},
        # Distinct reasons / reasons (case and punctuation ignored): a collapsed model writes one reason for all,
        # and then faithfulness only says how often that one sentence happens to be true.
        "unique_share": len({" ".join(words(t)) for t in texts}) / len(texts) if texts else None,
        "distinct_1": distinct_n(texts, 1),
        "distinct_2": distinct_n(texts, 2),
        "mean_words": _mean([len(words(t)) for t in texts]),
        "empty_share": _mean([not words(t) for t in texts]),
        "degenerate_share": _mean([is_degenerate(t) for t in texts]),
    }
    if sources is not None:
        counts = Counter(sources)
        out["sources"] = {k: counts[k] / len(sources) for k in ("model", "evidence", "generic")} if sources else {}
    return out


@dataclass
class GroundTruth:
    """What is true for each case: the full evidence (`limit=None`) plus the synthetic catalog's true attributes
    as perceived facts; the checker knows the attribute labels, so a false mood or tempo claim is caught."""

    checker: ClaimChecker
    facts: list[list[Evidence]]
    titles: list[list[str]]
    candidate_titles: list[str]

    def check(self, texts: Sequence[str]) -> list[list[Claim]]:
        return [self.checker.check(t, f, h, c) for t, f, h, c in
                zip(texts, self.facts, self.titles, self.candidate_titles, strict=True)]


def true_attributes(attributes: pd.DataFrame | None) -> dict[str, list[Evidence]]:
    if attributes is None:
        return {}
    out: dict[str, list[Evidence]] = {}
    for column, name in TRUE_ATTRIBUTES.items():
        if column in attributes.columns:
            for sid, value in zip(attributes["song_id"].astype(str), attributes[column]):
                if not pd.isna(value):
                    out.setdefault(sid, []).append(Evidence("perceived", str(value), confidence=1.0, attribute=name))
    return out


def perceived_accuracy(evidence: Sequence[Sequence[Evidence]], candidates: Sequence[str],
                       attributes: pd.DataFrame | None) -> dict[str, Any]:
    """How often the perceived attributes listed as evidence for each candidate are the song's true ones (synthetic
    ground truth), overall and per attribute; rates are None where nothing was perceived or there is no truth."""
    truth = {(sid, e.attribute): e.value for sid, es in true_attributes(attributes).items() for e in es}
    checked = [(e.attribute, truth[(sid, e.attribute)] == e.value) for items, sid in zip(evidence, candidates)
               for e in items if e.kind == "perceived" and (sid, e.attribute) in truth]
    by = {a: _mean([ok for b, ok in checked if b == a]) for a in sorted({a for a, _ in checked})}
    return {"n": len(checked), "accuracy": _mean([ok for _, ok in checked]), "by_attribute": by}


def ground_truth(writer, cases: Sequence["ReasonCase"], plans_history: Sequence[Sequence[str]],
                 attributes: pd.DataFrame | None) -> GroundTruth:
    """The truth for each case, over the history the prompt showed (`plans_history`)."""
    truth_attrs = true_attributes(attributes)
    labels = {name: sorted({e.value for es in truth_attrs.values() for e in es if e.attribute == name})
              for name in TRUE_ATTRIBUTES.values()}
    # Without true attributes the serving checker already reads everything there is to check: reuse its vocabulary
    # instead of building the catalog's again.
    checker = writer.checker if not truth_attrs else ClaimChecker(
        [writer.builder.text(s) for s in list(writer.builder.songs)],
        {"perceived": [v for vs in labels.values() for v in vs]})
    b = writer.builder
    facts = [b.build(h, c.song_id, c.user_id, limit=None) + truth_attrs.get(c.song_id, [])
             for c, h in zip(cases, plans_history)]
    return GroundTruth(checker, facts, [[b.title(x) for x in h] for h in plans_history],
                       [b.title(c.song_id) for c in cases])


# ------------------------------------------------------------------------------------------------ sampling


@dataclass
class ReasonCase:
    """One held-out play to explain, with the listener's training history (distinct songs, most recent first)."""

    user_id: str
    song_id: str
    history: list[str]


def sample_cases(songs: pd.DataFrame, train_df: pd.DataFrame, test_df: pd.DataFrame, n: int, seed: int,
                 prompt_config: PromptConfig | None = None) -> tuple[list[ReasonCase], dict[str, int]]:
    """Up to `n` distinct held-out (user, song) plays, sampled with `seed`, each with the history its stage-2
    prompt starts from (`prompt_config.history_len` songs).

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
    known = set(songs["song_id"].astype(str))
    cases = [ReasonCase(user, sid, [h for h in recent[user] if h != sid and h in known][: cfg.history_len])
             for user, sid in zip(pool["user_id"], pool["song_id"])]
    return cases, skipped


# ------------------------------------------------------------------------------------------------ generation


def generate_reasons(engine, features, requests: Sequence[tuple[Prompt, int | None]], max_new_tokens: int,
                     batch_size: int = 16, max_length: int = 1024) -> tuple[list[str | None], float]:
    """Answers from a serving engine (`serve.engines`: the transformers engine over the run's bundle) for
    `(prompt, sample_seed)` requests (`serve.reasons.ReasonPlan.requests`), in batches, so that the eval scores
    exactly what the endpoints return: the same tokenisation, left padding, splicing, sampling and decoding.

    Media rows come from the run's features in placeholder order (`llmrec.features.media_rows`). A prompt longer
    than `max_length` tokens gives None. Returns (texts, seconds spent generating)."""
    from llmrec.features import media_rows
    from llmrec.model.mm_lm import MediaBatch
    from serve.engines.base import EngineInput

    fits = [len(engine.model.prompt_token_ids(p.text)) <= max_length for p, _ in requests]
    todo = [i for i, ok in enumerate(fits) if ok]  # the others stay None
    out: list[str | None] = [None] * len(requests)
    seconds = 0.0
    for start in range(0, len(todo), batch_size):
        batch = todo[start:start + batch_size]
        items = []
        for i in batch:
            p, seed = requests[i]
            media = MediaBatch(*media_rows(features, p.audio_song_ids, "audio"),
                               *media_rows(features, p.cover_song_ids, "cover"))
            items.append(EngineInput(p.text, media, seed))
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

    from llmrec.model.collate import MultimodalCollator

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
    return [c.as_json() for c in claims]


def evaluate_reasons(cfg, run, catalog, train_df: pd.DataFrame, test_df: pd.DataFrame,
                     progress: bool = False) -> dict[str, Any]:
    """The `reasons` section of report.json: the reasons the endpoint would return for `cfg.eval.reasons` sampled
    held-out plays, checked against the ground truth; the model's greedy answers before the check
    ("model_greedy") and the plain evidence sentences ("evidence_sentence") on the same plays. Without a bundle
    the section says so ("skipped") and still carries the evidence-sentence reference."""
    from llmrec.evidence import phrase
    from llmrec.perception import load_perceived
    from llmrec.schema import load_song_attributes
    from llmrec.split import positive_plays
    from serve.reasons import ROUNDS, ReasonWriter

    # Every key of the section is always there (None when not measured), so readers need no special cases.
    empty = {**reason_metrics([], [], []), "latency_ms_per_reason": None, "samples": [],
             "perceived": {"n": 0, "accuracy": None, "by_attribute": {}},
             "prompt_dependence": {"answer_loss": None, "answer_loss_other_prompt": None, "prompt_gain": None}}
    n = int(cfg.eval.reasons)
    if n <= 0:
        return {**empty, "skipped": "eval.reasons=0: reason generation turned off"}
    cases, skipped = sample_cases(catalog.songs, train_df, test_df, n, cfg.seed, cfg.prompt)
    if not cases:
        return {**empty, "skipped": "no held-out plays with a training history to explain", "cases_skipped": skipped}
    songs = {str(r["song_id"]): r for r in catalog.songs.to_dict("records")}
    perceived, labels = load_perceived(run) if (run.features / "manifest.json").is_file() else ({}, [])
    writer = ReasonWriter(cfg, songs, positive_plays(train_df), perceived, {"perceived": labels} if labels else None)
    plans = [writer.plan(c.history, [c.song_id], c.user_id) for c in cases]
    shown = [p.cases[0][0].history_song_ids for p in plans]
    attributes = load_song_attributes(run.catalog)
    truth = ground_truth(writer, cases, shown, attributes)
    sentences = [phrase(p.cases[0][1], bool(h)) for p, h in zip(plans, shown)]
    section: dict[str, Any] = {
        **empty, "cases_skipped": skipped, "evidence_sentence": reason_metrics(sentences, truth.check(sentences)),
        "perceived": perceived_accuracy([p.cases[0][1] for p in plans], [c.song_id for c in cases], attributes),
        "ground_truth": "catalog + training plays" + (" + song_attributes.parquet" if attributes is not None
                                                      else ""),
        "samples_per_reason": writer.samples}
    bundle = run.model / "bundle"
    if not (bundle / "bundle.json").is_file():
        return {**section, "skipped": f"no serving bundle in {bundle}: run `llmrec train` to generate reasons"}
    from llmrec.features import load_media_features
    from serve.engines.hf import HFEngine

    t0 = time.perf_counter()
    engine = HFEngine(bundle, cfg.serve)
    features = load_media_features(run.features)
    load_s = time.perf_counter() - t0
    # The endpoint's rounds (greedy answers, then samples where `serve.reason_sampling` asks), batched across cases.
    answers: list[list[str | None]] = [[None] * len(p.requests) for p in plans]
    rounds = [writer.rounds(p, a) for p, a in zip(plans, answers)]
    gen_s = 0.0
    for _ in range(ROUNDS):
        wanted = [(j, i) for j, r in enumerate(rounds) for i in next(r)]
        out, seconds = generate_reasons(engine, features, [plans[j].requests[i] for j, i in wanted],
                                        cfg.eval.reasons_max_new_tokens, batch_size=GEN_BATCH,
                                        max_length=cfg.train.max_length)
        gen_s += seconds
        for (j, i), text in zip(wanted, out):
            answers[j][i] = text
    served = [writer.finish(p, a)[0] for p, a in zip(plans, answers)]
    greedy = [(i, a[0]) for i, a in enumerate(answers) if a[0] is not None]
    generated = sum(t is not None for a in answers for t in a)
    returned = [r.text for r in served]
    claims = truth.check(returned)
    if progress:
        print(f"  reasons: {generated} answers generated in {gen_s:.1f}s (+{load_s:.1f}s loading)")
    greedy_claims = [truth.checker.check(t, truth.facts[i], truth.titles[i], truth.candidate_titles[i])
                     for i, t in greedy]
    samples = [{"user": c.user_id, "song": c.song_id, "history": h, "reason": r.text, "verified": r.verified,
                "reason_source": r.source, "model_greedy": answers[i][0], "claims": _claims_json(cl),
                "evidence": [e.as_json() for e in r.evidence]}
               for i, (c, h, r, cl) in enumerate(zip(cases[:N_SAMPLES], shown, served, claims))]
    prompts = [p.cases[0][0] for p in plans]
    dependence = prompt_dependence(engine.model, features, prompts, sentences, batch_size=GEN_BATCH,
                                   max_length=cfg.train.max_length)
    return {**section, **reason_metrics(returned, claims, [r.source for r in served]),
            "verified_share": _mean([r.verified for r in served]),
            "model_greedy": reason_metrics([t for _, t in greedy], greedy_claims),
            "prompt_dependence": dependence,
            "latency_ms_per_reason": 1000 * gen_s / len(plans),
            "max_new_tokens": cfg.eval.reasons_max_new_tokens, "batch_size": GEN_BATCH,
            "prompts_too_long": sum(a[0] is None for a in answers),
            "answers_generated_per_reason": generated / len(plans),
            "seconds": {"load": round(load_s, 2), "generate": round(gen_s, 2)},
            "samples": samples}
