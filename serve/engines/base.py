"""The engine contract: one prompt (+ its media feature rows) in, a song embedding or a greedy reason out.

Both engines (transformers in `hf.py`, vLLM in `vllm.py`) load the same serving bundle (`train/export.py`) and must
give the same outputs for the same inputs: the same greedy reason, and the same embedding to float tolerance. The
HTTP app, the index builder and the benchmarks talk only to this interface.

Shared rules, so the engines cannot drift apart:
- a prompt is tokenised as `[BOS] + tokenizer(expand_placeholders(prompt))`
  (`llmrec.model.mm_lm.prompt_token_ids`), exactly as the training collator does;
- media rows are spliced by `MultimodalLM.splice` (the n-th placeholder group takes the n-th feature row);
- the song embedding is `MultimodalLM.head` applied to the final hidden state at the last prompt token, which is
  the `<emb>` token of an embedding prompt (`llmrec.text.build_embed_prompt` ends with it).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from llmrec.model.mm_lm import MediaBatch, MultimodalLM
from llmrec.text import EMBED_TOKEN, answer_text


@dataclass
class EngineInput:
    """One request row: the prompt with each song's placeholders written once, and the media feature rows for its
    placeholder groups in order (`MediaBatch` with N_audio / N_cover rows; zero rows when it has none)."""

    prompt: str
    media: MediaBatch
    # None: the greedy answer. A seed: an answer sampled at the engine's `reason_temperature` with that seed (the
    # server checks several and returns one that holds against the evidence; serve/reasons.py).
    sample_seed: int | None = None


def check_embed_prompt(model: MultimodalLM, ids: list[int]) -> None:
    if not ids or ids[-1] != model.embed_id:
        raise ValueError(f"an embedding prompt must end with {EMBED_TOKEN} (use llmrec.text.build_embed_prompt)")


class Engine(ABC):
    """A loaded serving bundle that embeds songs and writes reasons, in batches.

    Subclasses set `model` (the MultimodalLM used for tokenisation, splicing and the head), `meta` (bundle.json)
    and `max_positions` (the LM's context) in their constructor."""

    name: str = "engine"
    model: MultimodalLM
    meta: dict
    max_positions: int

    @property
    def embedding_dim(self) -> int:
        return int(self.model.cfg.embedding_dim)

    @property
    def bundle_hash(self) -> str:
        return str(self.meta["content_hash"])

    def token_ids(self, item: EngineInput, reserve: int = 0) -> list[int]:
        """The item's prompt token ids, refused clearly when it (+ `reserve` tokens to generate) overflows."""
        ids = self.model.prompt_token_ids(item.prompt)
        if len(ids) + reserve > self.max_positions:
            raise ValueError(f"prompt of {len(ids)} tokens (+{reserve} to generate) exceeds the model's context of "
                             f"{self.max_positions} tokens; shorten the text fields")
        return ids

    @abstractmethod
    def embed(self, items: list[EngineInput]) -> np.ndarray:
        """[len(items), embedding_dim] float32, unit-norm rows; each prompt ends with `<emb>`."""

    def decode(self, rows) -> list[str]:
        """Generated token ids per prompt -> the answer's text without special tokens (`llmrec.text.answer_text`:
        its first line, stripped; one rule for every engine)."""
        if len(rows) == 0:  # batch_decode([]) would give [""]
            return []
        return [answer_text(t) for t in self.model.tokenizer.batch_decode(rows, skip_special_tokens=True)]

    @abstractmethod
    def generate(self, items: list[EngineInput], max_new_tokens: int) -> list[str]:
        """Continuation of each prompt (greedy, or sampled where `sample_seed` is set), decoded without special
        tokens, stripped."""

    def close(self) -> None:  # noqa: B027 - optional hook: most engines hold nothing to release
        """Release processes/memory (vLLM spawns workers); safe to call twice."""


def sampling_temperature(serve_cfg) -> float:
    """The temperature sampled reasons use (`ServeConfig.reason_temperature`; engines built without a config use
    the default)."""
    from llmrec.config import ServeConfig

    return float((serve_cfg or ServeConfig()).reason_temperature)


def concat_media(items: list[EngineInput]) -> MediaBatch:
    """The media rows of a batch of requests in placeholder order (row-major: request by request), which is the
    order `MultimodalLM.splice` fills them in."""
    return MediaBatch.cat([it.media for it in items])
