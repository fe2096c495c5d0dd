"""Load a serving bundle written by `train/export.py`: merged LM + tokenizer + multimodal weights + bundle.json."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmrec.io import MissingArtefactError
from llmrec.model.mm_lm import MultimodalLM, read_mm_config


def read_bundle_meta(directory: str | Path) -> dict:
    path = Path(directory) / "bundle.json"
    if not path.is_file():
        raise MissingArtefactError(f"{path} is missing; run `llmrec train --run-dir <run>` to export a bundle")
    return json.loads(path.read_text())


def load_bundle(directory: str | Path, dtype: torch.dtype | None = None) -> tuple[MultimodalLM, dict]:
    """The multimodal LM exactly as exported (eval mode) and its bundle.json."""
    directory = Path(directory)
    meta = read_bundle_meta(directory)
    lm = AutoModelForCausalLM.from_pretrained(directory / meta["lm"], dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(directory / meta["lm"])
    model = MultimodalLM(lm, tokenizer, read_mm_config(directory))
    model.load_multimodal(directory)
    return model.eval(), meta
