"""Heads on top of the multimodal LM: the song-embedding head and the multimodal -> CF ID mapping head."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class EmbeddingHead(nn.Module):
    """Hidden state at the trailing `<emb>` token (+ late-fused raw audio/cover summaries) -> unit-norm embedding.

    Late fusion follows NoteLLM-2's finding that an end-to-end tuned LLM tends to ignore the media tokens: the
    pooled encoder features reach the embedding directly, so modality signal cannot be washed out by the LM.
    """

    def __init__(self, hidden: int, dim: int, audio_dim: int = 0, cover_dim: int = 0):
        super().__init__()
        self.text = nn.Linear(hidden, dim)
        self.audio = nn.Linear(audio_dim, dim, bias=False) if audio_dim else None
        self.cover = nn.Linear(cover_dim, dim, bias=False) if cover_dim else None

    def forward(self, hidden: torch.Tensor, audio: torch.Tensor | None = None,
                cover: torch.Tensor | None = None) -> torch.Tensor:
        out = self.text(hidden)
        if self.audio is not None and audio is not None:
            out = out + self.audio(audio)
        if self.cover is not None and cover is not None:
            out = out + self.cover(cover)
        return F.normalize(out, dim=-1)


class IDMappingHead(nn.Module):
    """Song embedding -> the CF item-factor space (the 'multimodal -> ID mapping' layer)."""

    def __init__(self, dim: int, cf_dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, cf_dim))

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.net(emb)
