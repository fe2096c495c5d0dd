"""Batching for the multimodal LM: tokenise prompt + answer, answer-only labels, media rows in placeholder order."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Sequence

import torch

from llmrec.features import media_rows, text_rows
from llmrec.model.mm_lm import IGNORE_INDEX, MediaBatch, expand_placeholders, prompt_token_ids

IGNORE = IGNORE_INDEX  # label value that the causal-LM loss skips


def embedding_rows(prompts: dict[str, str], song_ids: list[str]) -> list[dict]:
    """Collator rows for song-embedding prompts: each song's own audio, cover and text features."""
    return [{"prompt": prompts[s], "audio_song_ids": [s], "cover_song_ids": [s], "text_song_id": s} for s in song_ids]


@dataclass
class MultimodalCollator:
    """Turns example rows {prompt, answer?, audio_song_ids, cover_song_ids, text_song_id?} into model inputs.

    Right padding for training; the prompt part of `labels` is IGNORE so only the answer is learned. With
    `text_features` (a model that fuses them into its embedding head), embedding rows name their song in
    `text_song_id` and the batch's MediaBatch.text holds its features.
    """

    tokenizer: Any
    features: Any
    audio_tokens: int
    cover_tokens: int
    max_length: int = 512
    text_features: Any = None

    def encode(self, prompt: str, answer: str | None) -> tuple[list[int], int]:
        tok = self.tokenizer
        prompt_ids = prompt_token_ids(tok, prompt, self.audio_tokens, self.cover_tokens)
        if len(prompt_ids) > self.max_length:
            raise ValueError(f"prompt of {len(prompt_ids)} tokens exceeds train.max_length={self.max_length}; "
                             f"lower the prompt budget or raise max_length")
        if answer is None:
            return prompt_ids, len(prompt_ids)
        # The answer follows the prompt after a space, as in running text ("Answer: You recently ..."): tokenised
        # alone it would start with a no-space token ("You" instead of " You") that the backbone never sees after
        # "Answer:" in stage 0's text, and generation after the prompt would start off-template.
        text = expand_placeholders(prompt, self.audio_tokens, self.cover_tokens)
        joint = [tok.bos_token_id] + tok(f"{text} {answer}", add_special_tokens=False).input_ids
        if joint[: len(prompt_ids)] == prompt_ids:
            answer_ids = joint[len(prompt_ids):] + [tok.eos_token_id]
        else:  # the tokenizer merged across the boundary: keep the prompt exact, tokenise the answer alone
            answer_ids = tok(answer, add_special_tokens=False).input_ids + [tok.eos_token_id]
        # Only the answer is cut when too long: placeholders in the prompt must keep their exact counts.
        return (prompt_ids + answer_ids)[: self.max_length], len(prompt_ids)

    def __call__(self, rows: Sequence[dict]) -> dict[str, Any]:
        encoded = [self.encode(r["prompt"], r.get("answer")) for r in rows]
        width = max(len(ids) for ids, _ in encoded)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        for i, (ids, n_prompt) in enumerate(encoded):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            attention[i, : len(ids)] = 1
            labels[i, n_prompt : len(ids)] = torch.tensor(ids[n_prompt:], dtype=torch.long)
        audio_ids = [s for r in rows for s in r.get("audio_song_ids", [])]
        cover_ids = [s for r in rows for s in r.get("cover_song_ids", [])]
        audio, audio_present = media_rows(self.features, audio_ids, "audio")
        cover, cover_present = media_rows(self.features, cover_ids, "cover")
        text_ids = [r.get("text_song_id") for r in rows]
        text = (text_rows(self.text_features, text_ids)
                if self.text_features is not None and rows and all(text_ids) else None)
        return {"input_ids": input_ids, "attention_mask": attention, "labels": labels,
                "media": MediaBatch(audio, audio_present, cover, cover_present, text)}


def drop_modalities(media: MediaBatch, p: float, generator: torch.Generator) -> MediaBatch:
    """Modality dropout: mark each audio/cover row missing with probability p (the projector then uses its learned
    "missing" embedding). Without it that embedding is never trained on a catalog where every song has media, and
    both real catalogs without audio/covers and the text-only ablation would see an untrained vector."""
    if p <= 0:
        return media
    keep_audio = (torch.rand(media.audio_present.shape, generator=generator) >= p).to(media.audio_present.dtype)
    keep_cover = (torch.rand(media.cover_present.shape, generator=generator) >= p).to(media.cover_present.dtype)
    return replace(media, audio_present=media.audio_present * keep_audio,
                   cover_present=media.cover_present * keep_cover)
