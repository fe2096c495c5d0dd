"""The transformers engine: the serving bundle in eval mode, batched forward passes on spliced embeddings.

A fair baseline for the vLLM engine (never a weakened one): whole batches per call, left padding + greedy
`generate` with the KV cache for reasons, right padding + one forward pass for embeddings. Concurrent HTTP requests
reach it already grouped into batches by `serve.batching.MicroBatcher`.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from llmrec.model.bundle import load_bundle
from serve.engines.base import Engine, EngineInput, check_embed_prompt, concat_media, sampling_temperature


class HFEngine(Engine):
    name = "hf"

    def __init__(self, bundle_dir: str | os.PathLike, serve_cfg=None, dtype: torch.dtype | None = None):
        self.bundle_dir = Path(bundle_dir)
        self.model, self.meta = load_bundle(self.bundle_dir, dtype=dtype)
        self.max_positions = int(getattr(self.model.lm.config, "max_position_embeddings", 1 << 30))
        self.temperature = sampling_temperature(serve_cfg)


    def _pad(self, rows: list[list[int]], left: bool) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.model.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            span = slice(width - len(r), width) if left else slice(0, len(r))
            ids[i, span] = torch.tensor(r, dtype=torch.long)
            mask[i, span] = 1
        return ids, mask

    @torch.inference_mode()
    def embed(self, items: list[EngineInput]) -> np.ndarray:
        if not items:
            return np.zeros((0, self.embedding_dim), dtype=np.float32)
        rows = [self.token_ids(it) for it in items]
        for r in rows:
            check_embed_prompt(self.model, r)
        # Right padding: the causal mask keeps padding out of every real token's hidden state, and
        # `MultimodalLM.embed` reads the state at each row's own `<emb>` position.
        ids, mask = self._pad(rows, left=False)
        emb = self.model.embed(ids, mask, concat_media(items))
        return emb.float().cpu().numpy()

    def generate(self, items: list[EngineInput], max_new_tokens: int) -> list[str]:
        """Greedy items in one `generate` call, sampled ones in another (transformers samples a whole batch with
        one RNG: seeded from the first sampled item, inside `fork_rng` so the process's RNG is left alone)."""
        out: list[str] = [""] * len(items)
        greedy = [i for i, it in enumerate(items) if it.sample_seed is None]
        sampled = [i for i, it in enumerate(items) if it.sample_seed is not None]
        for group, seed in ((greedy, None), (sampled, items[sampled[0]].sample_seed if sampled else None)):
            if group:
                for i, text in zip(group, self._generate([items[i] for i in group], max_new_tokens, seed)):
                    out[i] = text
        return out

    @torch.inference_mode()
    def _generate(self, items: list[EngineInput], max_new_tokens: int, seed: int | None) -> list[str]:
        ids, mask = self._pad([self.token_ids(it, max_new_tokens) for it in items], left=True)
        if seed is None:
            return self.decode(self.model.generate(ids, mask, concat_media(items), max_new_tokens=max_new_tokens))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            out = self.model.generate(ids, mask, concat_media(items), max_new_tokens=max_new_tokens, do_sample=True,
                                      temperature=self.temperature, top_p=0.95, top_k=0)
        return self.decode(out)
