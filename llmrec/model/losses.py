"""Contrastive losses for aligning song embeddings with CF ID embeddings and co-listened songs."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def info_nce(query: torch.Tensor, keys: torch.Tensor, temperature: float = 0.07,
             symmetric: bool = True) -> torch.Tensor:
    """InfoNCE with in-batch negatives: row i of `query` should match row i of `keys` and no other row."""
    if query.shape[0] != keys.shape[0]:
        raise ValueError(f"info_nce needs paired rows, got {query.shape[0]} queries and {keys.shape[0]} keys")
    q, k = F.normalize(query, dim=-1), F.normalize(keys, dim=-1)
    logits = q @ k.T / temperature
    target = torch.arange(q.shape[0], device=q.device)
    loss = F.cross_entropy(logits, target)
    return 0.5 * (loss + F.cross_entropy(logits.T, target)) if symmetric else loss
