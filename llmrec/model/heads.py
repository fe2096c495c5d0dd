"""Heads on top of the multimodal LM: the song-embedding head and the multimodal -> CF ID mapping head."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class EmbeddingHead(nn.Module):
    """Hidden state at the trailing `<emb>` token (+ late-fused raw audio/cover summaries) -> unit-norm embedding.

    Late fusion follows NoteLLM-2's finding that an end-to-end tuned LLM tends to ignore the media tokens: the
    pooled encoder features reach the embedding directly, so modality signal cannot be washed out by the LM.
    Each branch is L2-normalised and weighted by a learned scale (`branch_log_scale`, starting equal): raw
    branch outputs differ in norm by orders of magnitude (LM hidden states vs pooled encoder features), and an
    unbalanced sum let one modality drown the others (genre, text-only, was less readable from the fused
    embedding than from the text branch alone).
    """

    def __init__(self, hidden: int, dim: int, audio_dim: int = 0, cover_dim: int = 0):
        super().__init__()
        self.text = nn.Linear(hidden, dim)
        self.audio = nn.Linear(audio_dim, dim, bias=False) if audio_dim else None
        self.cover = nn.Linear(cover_dim, dim, bias=False) if cover_dim else None
        self.branch_log_scale = nn.Parameter(torch.zeros(3))  # text, audio, cover

    def forward(self, hidden: torch.Tensor, audio: torch.Tensor | None = None,
                cover: torch.Tensor | None = None) -> torch.Tensor:
        scale = self.branch_log_scale.exp()
        out = scale[0] * F.normalize(self.text(hidden), dim=-1)
        if self.audio is not None and audio is not None:
            out = out + scale[1] * F.normalize(self.audio(audio), dim=-1)
        if self.cover is not None and cover is not None:
            out = out + scale[2] * F.normalize(self.cover(cover), dim=-1)
        return F.normalize(out, dim=-1)


class IDMappingHead(nn.Module):
    """Song embedding -> the CF item-factor space (the 'multimodal -> ID mapping' layer)."""

    def __init__(self, dim: int, cf_dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, cf_dim))

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.net(emb)
