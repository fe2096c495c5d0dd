"""Export the serving bundle: LoRA merged into the backbone (vLLM applies LoRA to the LM only, and a merged
checkpoint is what both serving engines load), tokenizer, multimodal weights, and a content hash."""
from __future__ import annotations

import copy
import json
from pathlib import Path

from peft import PeftModel

from llmrec.io import atomic_dir, dir_sha256
from llmrec.model.mm_lm import MultimodalLM

BUNDLE_FORMAT = 1


def export_bundle(model: MultimodalLM, out: Path, extra: dict | None = None) -> str:
    """Write `out/` = {lm/ (merged save_pretrained, safetensors), lm tokenizer, multimodal.safetensors,
    multimodal.json, bundle.json}; returns the bundle's content hash (also stored in bundle.json)."""
    lm = model.lm
    if isinstance(lm, PeftModel):
        lm = copy.deepcopy(lm).merge_and_unload()
    with atomic_dir(out) as tmp:
        lm.save_pretrained(tmp / "lm", safe_serialization=True)
        model.tokenizer.save_pretrained(tmp / "lm")
        model.save_multimodal(tmp)
        content_hash = dir_sha256(tmp)
        meta = {"format": BUNDLE_FORMAT, "content_hash": content_hash, "lm": "lm", **(extra or {})}
        (tmp / "bundle.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
    return content_hash
