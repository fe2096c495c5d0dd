"""Verified reasons, as `/v1/recommendations`, `/v1/explanations` and the eval's reasons section return them.

For each (listener, candidate): the evidence (`llmrec.evidence`) is listed in the stage-2 prompt; the engine writes
the greedy reason and `serve.reason_samples - 1` sampled ones (seeded per candidate, so a response is
reproducible); the claim checker (`llmrec.claims`) reads every claim of each against the evidence the prompt
showed, and the verified one with the most claims is returned (`verified: true`, `reason_source: "model"`). By
default (`serve.reason_sampling: when_unverified`) generation runs in two rounds (`ReasonWriter.rounds`): every
candidate's greedy reason, then the sampled ones only for the candidates whose greedy reason failed the check, so
a response pays for extra answers only where they can change what is returned. When none
holds, the plain evidence sentence is returned instead (`"evidence"`), and a candidate with no evidence at all gets
an honest generic sentence (`"generic"`, `verified: false`), never an invented one.
"""
from __future__ import annotations

import zlib
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

import pandas as pd

from llmrec.claims import ClaimChecker, ServedReason, choose_reason
from llmrec.config import Config
from llmrec.evidence import Evidence, EvidenceBuilder, reason_prompt
from llmrec.text import Prompt

REASON_SAMPLING = ("when_unverified", "always")
ROUNDS = 2  # generation rounds `ReasonWriter.rounds` yields


class ReasonWriter:
    """Evidence and claim checking over one catalog. `songs`: song id -> catalog row (the server's live mapping,
    which gains added songs); `plays`: the positive plays co-listening is counted on."""

    def __init__(self, cfg: Config, songs: Mapping[str, Any], plays: pd.DataFrame | None,
                 perceived: Mapping[str, Sequence[tuple[str, str, float]]] | None = None,
                 extra_vocabulary: Mapping[str, Sequence[str]] | None = None):
        if cfg.serve.reason_sampling not in REASON_SAMPLING:
            raise ValueError(f"serve.reason_sampling {cfg.serve.reason_sampling!r}: choose one of "
                             + ", ".join(repr(c) for c in REASON_SAMPLING))
        self.cfg = cfg
        self.counts: Counter = Counter()  # reasons returned by source (the server's /metrics)
        self.builder = EvidenceBuilder(songs, plays, perceived, cfg.prompt)
        self.checker = ClaimChecker([self.builder.text(s) for s in list(songs)], extra_vocabulary)

    @property
    def samples(self) -> int:
        return max(1, int(self.cfg.serve.reason_samples))

    def prompts(self, history: Sequence[str], song_ids: Sequence[str],
                user: str | None = None) -> list[tuple[Prompt, list[Evidence]]]:
        return [reason_prompt(self.builder, history, sid, user) for sid in song_ids]

    def seeds(self, song_id: str) -> list[int | None]:
        """None (greedy) then one seed per sampled answer, fixed by the song id (reproducible responses)."""
        base = zlib.crc32(song_id.encode("utf-8", "surrogatepass"))
        return [None] + [(base + j) % (1 << 31) for j in range(1, self.samples)]

    def choose(self, prompt: Prompt, evidence: Sequence[Evidence], candidate: str,
               texts: Sequence[str | None]) -> ServedReason:
        titles = [self.builder.title(h) for h in prompt.history_song_ids]
        return choose_reason(self.checker, texts, evidence, titles, self.builder.title(candidate),
                             has_history=bool(prompt.history_song_ids))

    def plan(self, history: Sequence[str], song_ids: Sequence[str], user: str | None = None) -> ReasonPlan:
        cases = self.prompts(history, song_ids, user)
        requests = [(p, seed) for (p, _), sid in zip(cases, song_ids) for seed in self.seeds(sid)]
        return ReasonPlan(list(song_ids), cases, requests)

    def finish(self, plan: ReasonPlan, texts: Sequence[str | None]) -> list[ServedReason]:
        """One reason per candidate from the generated texts of `plan.requests` (None: not generated)."""
        if len(texts) != len(plan.requests):
            raise ValueError(f"{len(texts)} generated texts for {len(plan.requests)} requests")
        n = self.samples
        out = [self.choose(p, ev, sid, texts[i * n:(i + 1) * n])
               for i, ((p, ev), sid) in enumerate(zip(plan.cases, plan.song_ids))]
        self.counts.update(r.source for r in out)
        return out

    def rounds(self, plan: ReasonPlan, texts: list[str | None]) -> Iterator[list[int]]:
        """The indices of `plan.requests` to generate, in exactly `ROUNDS` rounds (a round may be empty); the
        caller puts each round's answers into `texts` (one slot per request, None = not generated) before asking
        for the next. "always": every request at once. "when_unverified": each candidate's greedy answer, then the
        sampled ones of the candidates whose greedy answer was generated but is not returned as verified."""
        n = self.samples
        if self.cfg.serve.reason_sampling == "always":
            yield list(range(len(plan.requests)))
            yield []
            return
        yield list(range(0, len(plan.requests), n))
        yield [i * n + j for i, ((p, ev), sid) in enumerate(zip(plan.cases, plan.song_ids))
               if n > 1 and texts[i * n] is not None and self.choose(p, ev, sid, [texts[i * n]]).source != "model"
               for j in range(1, n)]

    def write(self, history: Sequence[str], song_ids: Sequence[str], user: str | None,
              generate: Callable[[list[tuple[Prompt, int | None]]], Sequence[str | None]]) -> list[ServedReason]:
        """Reasons for `song_ids` through a synchronous `generate([(prompt, seed)]) -> texts`."""
        plan = self.plan(history, song_ids, user)
        texts: list[str | None] = [None] * len(plan.requests)
        for wanted in self.rounds(plan, texts):
            for i, text in zip(wanted, generate([plan.requests[i] for i in wanted]) if wanted else ()):
                texts[i] = text
        return self.finish(plan, texts)


@dataclass
class ReasonPlan:
    """The prompts and evidence for a set of candidates, and the (prompt, seed) requests to generate."""

    song_ids: list[str]
    cases: list[tuple[Prompt, list[Evidence]]]
    requests: list[tuple[Prompt, int | None]]
