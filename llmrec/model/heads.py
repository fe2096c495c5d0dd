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

    `text_dim` > 0 adds a fourth branch from a pretrained sentence encoder's features of the song text (MiniLM in
    the tiny preset). The tiny backbone is trained from scratch on a few hundred songs' text and reads genre far
    less cleanly than a sentence encoder trained on a billion pairs; the branch gives the embedding that text
    understanding the way the audio/cover branches give it the encoders'. A song without text gets a zero row,
    which adds nothing.
    """

    def __init__(self, hidden: int, dim: int, audio_dim: int = 0, cover_dim: int = 0, text_dim: int = 0):
        super().__init__()
        self.text = nn.Linear(hidden, dim)
        self.audio = nn.Linear(audio_dim, dim, bias=False) if audio_dim else None
        self.cover = nn.Linear(cover_dim, dim, bias=False) if cover_dim else None
        self.sentence = nn.Linear(text_dim, dim, bias=False) if text_dim else None
        self.branch_log_scale = nn.Parameter(torch.zeros(4))  # LM hidden state, audio, cover, sentence features

    def forward(self, hidden: torch.Tensor, audio: torch.Tensor | None = None, cover: torch.Tensor | None = None,
                sentence: torch.Tensor | None = None) -> torch.Tensor:
        scale = self.branch_log_scale.exp()
        out = scale[0] * F.normalize(self.text(hidden), dim=-1)
        for i, (branch, x) in enumerate(((self.audio, audio), (self.cover, cover), (self.sentence, sentence)), 1):
            if branch is not None and x is not None:
                out = out + scale[i] * F.normalize(branch(x), dim=-1)
        return F.normalize(out, dim=-1)


class IDMappingHead(nn.Module):
    """Song embedding -> the CF item-factor space (the 'multimodal -> ID mapping' layer)."""

    def __init__(self, dim: int, cf_dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, cf_dim))

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.net(emb)
