"""Contrastive losses for aligning song embeddings with CF ID embeddings and co-listened songs: in-batch
negatives (`info_nce`) or the whole CF table as negatives (`catalog_info_nce`)."""
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


def catalog_info_nce(query: torch.Tensor, table: torch.Tensor, rows: torch.Tensor,
                     temperature: float = 0.07) -> torch.Tensor:
    """InfoNCE against a whole key table: query i should match `table[rows[i]]` and none of the other table rows.

    With a small batch, in-batch negatives are few (a batch of 4 gives each song 3); the CF item factors of every
    training song are a fixed table that costs one [B, N] product, so each query sees all N - 1 other songs as
    negatives. Only the query -> table direction: the other direction would need every song's embedding."""
    if query.shape[0] != rows.shape[0]:
        raise ValueError(f"catalog_info_nce needs one table row per query, got {query.shape[0]} queries "
                         f"and {rows.shape[0]} rows")
    logits = F.normalize(query, dim=-1) @ F.normalize(table, dim=-1).T / temperature
    return F.cross_entropy(logits, rows)
