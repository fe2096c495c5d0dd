"""The no-LLM bar: exactly the raw features llmrec is given, as one vector per song (`mm2cf` in the report).

llmrec's song embedding sees the song text (and, where `model.text_fusion` is on, the sentence encoder's features
of it), the frozen audio features and the frozen cover features. `mm2cf` takes the same inputs without the LLM:
the sentence-encoder text features and the mean-pooled audio and cover features, concatenated, then mapped to ALS
item factors by the same ridge map and scored by the same user tower as llmrec (`eval.report.llmrec_model`). The
ratio llmrec / mm2cf is what the LLM adds; the issue that introduced it (#18) found it at 1.00x with the tiny
from-scratch backbone.

Each block is standardised per dimension over the songs that have it, then scaled so that every block carries the
same total variance: otherwise the 1280-d cover block would outweigh the 384-d text block in the ridge penalty by
its width alone. A song without a modality gets a zero block (the block's mean), which adds nothing.
"""
from __future__ import annotations

import numpy as np


def standardised_block(x: np.ndarray, present: np.ndarray) -> np.ndarray:
    """Rows of `x` z-scored per dimension over the `present` rows, divided by sqrt(width); absent rows are 0."""
    x = np.asarray(x, dtype=np.float64)
    out = np.zeros_like(x)
    if present.any():
        rows = x[present]
        std = rows.std(axis=0)
        out[present] = (rows - rows.mean(axis=0)) / np.where(std > 0, std, 1.0)
    return (out / np.sqrt(max(x.shape[1], 1))).astype(np.float32)


def concat_blocks(blocks: dict[str, np.ndarray]) -> np.ndarray:
    """Standardise each block over its non-zero rows (a zero row = no such feature) and concatenate."""
    return np.concatenate([standardised_block(b, np.abs(b).sum(1) > 0) for b in blocks.values()], axis=1)


def raw_feature_vectors(text: np.ndarray, media: dict[str, np.ndarray]) -> tuple[np.ndarray, str]:
    """(vectors aligned with the catalogue, a sentence saying what went in) from the text features and the run's
    pooled encoder features (`eval.ablation.run_encoder_vectors`). The text block is always in: llmrec reads the
    song text in its prompt whether or not the sentence features are fused into its head. Without a features stage
    there are no media features: mm2cf is then the text features alone, and says so."""
    blocks = {"text": text}
    blocks.update({name.split()[0]: x for name, x in media.items() if (np.abs(x).sum(1) > 0).any()})
    widths = ", ".join(f"{name} {x.shape[1]}-d" for name, x in blocks.items())
    return concat_blocks(blocks), (f"ridge map from the raw features llmrec is given ({widths}; each block "
                                   f"standardised, equal variance) to ALS item factors, scored like llmrec")
