"""Projectors that map frozen-encoder features into the LLM's token-embedding space (LLaVA's builder pattern)."""
from __future__ import annotations

import torch
from torch import nn

PROJECTOR_TYPES = ("linear", "mlp2x_gelu")


def build_projector(kind: str, in_dim: int, out_dim: int) -> nn.Module:
    """`linear` or `mlp2x_gelu` (Linear-GELU-Linear, LLaVA-1.5's choice); anything else is rejected clearly."""
    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    if kind == "mlp2x_gelu":
        return nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))
    raise ValueError(f"unknown projector type {kind!r}; choose one of {list(PROJECTOR_TYPES)}")


class LayerMix(nn.Module):
    """A learned softmax-weighted sum over an encoder's hidden-state layers (MERT's recommended usage).

    Features arrive as [N, L, K, D]; with L == 1 (a single chosen layer) this is the identity.
    """

    def __init__(self, num_layers: int):
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(num_layers))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        weights = torch.softmax(self.logits, dim=0).to(feats.dtype)
        return torch.einsum("l,nlkd->nkd", weights, feats)


class ModalityProjector(nn.Module):
    """Layer mix + projector + a learned embedding used in place of a song's missing modality."""

    def __init__(self, kind: str, num_layers: int, tokens: int, in_dim: int, out_dim: int):
        super().__init__()
        self.tokens, self.in_dim = tokens, in_dim
        self.layer_mix = LayerMix(num_layers)
        self.norm = nn.LayerNorm(in_dim)
        self.proj = build_projector(kind, in_dim, out_dim)
        self.missing = nn.Parameter(torch.randn(tokens, out_dim) * 0.02)

    def pooled(self, feats: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """[N, L, K, D] -> [N, D]: the raw feature summary used for late fusion (zeros where missing)."""
        return self.norm(self.layer_mix(feats)).mean(1) * present.to(feats.dtype)[:, None]

    def forward(self, feats: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """[N, L, K, D] features + [N] presence -> [N, K, H] token embeddings."""
        if feats.shape[-2] != self.tokens or feats.shape[-1] != self.in_dim:
            raise ValueError(f"features of shape {tuple(feats.shape)} do not match the projector "
                             f"(tokens={self.tokens}, dim={self.in_dim}); re-run `llmrec features`?")
        out = self.proj(self.norm(self.layer_mix(feats)))
        keep = present.to(out.dtype)[:, None, None]
        return keep * out + (1 - keep) * self.missing.to(out.dtype)[None]
