"""Load Baichuan2-7B checkpoints as plain transformers `LlamaForCausalLM` models.

Why this module exists
----------------------
The recommender's default backbone is `baichuan-inc/Baichuan2-7B-Chat`, but nothing in our stack can load it as
published:

* transformers 5.x ships no Baichuan model class, and the hub repository's `modeling_baichuan.py`
  (`trust_remote_code=True`) was written against transformers 4.29-era internals that 5.x removed.
* vLLM >= 0.24 dropped its Baichuan implementation, so serving needs a standard architecture too.

Baichuan2-7B *is* a Llama (RoPE with theta 10000, RMSNorm, SwiGLU MLP, no biases) apart from two details that a
pure weight rewrite can absorb:

1. Attention uses one fused projection, `self_attn.W_pack` = Linear(hidden, 3 * hidden), whose output rows are
   q, k, v in that order. Splitting it row-wise gives Llama's `q_proj`, `k_proj`, `v_proj` exactly.
2. The output head is a "NormHead": at every forward it uses `F.normalize(lm_head.weight)` (each vocab row divided
   by its L2 norm). Normalising the rows once at conversion time and storing the result gives identical logits with
   a plain Linear head.

After conversion the model is an ordinary Llama checkpoint: `from_pretrained`, PEFT LoRA on
q/k/v/o/gate/up/down, DeepSpeed and vLLM all work without remote code.

Caveats
-------
* Baichuan-13B and Baichuan2-13B use ALiBi attention biases instead of RoPE. Llama cannot express ALiBi, so those
  checkpoints are refused rather than converted into a model that silently produces garbage.
* With the normalisation baked in, *training* `lm_head` no longer re-normalises its rows after each step as the
  original NormHead would. We keep `lm_head` frozen (LoRA adapts attention/MLP only), where this makes no difference.
* Baichuan (v1) 7B has a plain head; it is recognised (architecture `BaiChuanForCausalLM` with a capital C, or its
  64000-token vocabulary, the same heuristic vLLM used) and converted without normalisation.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import glob
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

from llmrec.io import atomic_dir

logger = logging.getLogger(__name__)

__all__ = [
    "BAICHUAN2_ROPE_THETA",
    "MissingWeightError",
    "convert_baichuan_checkpoint",
    "convert_baichuan_state_dict",
    "is_baichuan_config",
    "llama_config_from_baichuan",
    "load_baichuan_as_llama",
    "load_baichuan_state_dict",
    "load_baichuan_tokenizer",
    "uses_alibi",
    "uses_norm_head",
]

# Baichuan2-7B's RotaryEmbedding hard-codes base=10000 and its config.json has no rope_theta field.
BAICHUAN2_ROPE_THETA = 10000.0

# Baichuan (v1) vocabulary size; Baichuan2 uses 125696. vLLM distinguishes the two head types the same way.
_BAICHUAN1_VOCAB_SIZE = 64000
# Baichuan (v1) 7B spells its class with a capital C; Baichuan-13B and all Baichuan2 models use "Baichuan".
_BAICHUAN1_7B_ARCH = "BaiChuanForCausalLM"

_REQUIRED_CONFIG_FIELDS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "vocab_size")

_GLOBAL_WEIGHTS = ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")
_LAYER_WEIGHTS = (
    "self_attn.W_pack.weight",
    "self_attn.o_proj.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
)

# Baichuan's tokenizer class defaults, used when its tokenizer_config.json does not say otherwise.
_TOKENIZER_DEFAULTS = {
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
    "pad_token": "<unk>",
    "add_bos_token": True,
    "add_eos_token": False,
}


class MissingWeightError(KeyError):
    """A tensor the conversion needs is absent from the Baichuan state dict.

    A KeyError so callers can treat it like a missing dict key; `__str__` is overridden because KeyError would
    otherwise print the message wrapped in quotes.
    """

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


# ----------------------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------------------


def _config_dict(cfg: Any) -> dict[str, Any]:
    """Accept a dict, a transformers config object, or a path to a checkpoint dir / config.json."""
    if isinstance(cfg, Mapping):
        return dict(cfg)
    if isinstance(cfg, (str, os.PathLike)):
        path = Path(cfg)
        if path.is_dir():
            path = path / "config.json"
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    if hasattr(cfg, "to_dict"):
        return cfg.to_dict()
    return dict(vars(cfg))


def is_baichuan_config(cfg: Any) -> bool:
    """True for a Baichuan / Baichuan2 config (by `model_type` or architecture name), whatever its size."""
    c = _config_dict(cfg)
    if str(c.get("model_type", "")).lower() == "baichuan":
        return True
    return any(str(arch).lower().startswith("baichuan") for arch in c.get("architectures") or ())


def uses_alibi(cfg: Any) -> bool:
    """True when the config describes an ALiBi model (Baichuan-13B / Baichuan2-13B).

    The 13B configs carry no explicit flag (ALiBi lives in their remote modeling code), so besides any explicit
    mention of ALiBi we recognise the 13B shape: hidden size 5120 or 40 layers. Refusing a false positive is
    cheap; converting a false negative would yield a model that runs but produces nonsense.
    """
    c = _config_dict(cfg)
    if "alibi" in json.dumps(c, default=str).lower():  # position_embedding_type, architecture names, auto_map, ...
        return True
    return c.get("hidden_size") == 5120 or c.get("num_hidden_layers") == 40


def uses_norm_head(cfg: Any) -> bool:
    """True when lm_head rows must be L2-normalised (Baichuan2); False for Baichuan (v1) 7B's plain head."""
    c = _config_dict(cfg)
    if _BAICHUAN1_7B_ARCH in (c.get("architectures") or ()):
        return False
    return c.get("vocab_size") != _BAICHUAN1_VOCAB_SIZE


def _check_convertible(c: dict[str, Any]) -> None:
    if not is_baichuan_config(c):
        raise ValueError(
            f"not a Baichuan config (model_type={c.get('model_type')!r}, architectures={c.get('architectures')!r}); "
            "expected model_type 'baichuan'"
        )
    if uses_alibi(c):
        raise ValueError(
            "this looks like Baichuan-13B / Baichuan2-13B (hidden_size="
            f"{c.get('hidden_size')}, num_hidden_layers={c.get('num_hidden_layers')}), which uses ALiBi attention "
            "biases instead of rotary position embeddings. Llama (RoPE) cannot represent ALiBi, so it cannot be "
            "converted to LlamaForCausalLM. Use baichuan-inc/Baichuan2-7B-Chat (RoPE) as the backbone instead."
        )
    missing = [k for k in _REQUIRED_CONFIG_FIELDS if c.get(k) is None]
    if missing:
        raise ValueError(f"Baichuan config is missing required field(s): {', '.join(missing)}")
    if c["hidden_size"] % c["num_attention_heads"]:
        raise ValueError(
            f"hidden_size {c['hidden_size']} is not divisible by num_attention_heads {c['num_attention_heads']}"
        )


def llama_config_from_baichuan(cfg: Any) -> LlamaConfig:
    """Map a Baichuan2-7B config (dict, config object or checkpoint path) onto an equivalent LlamaConfig."""
    c = _config_dict(cfg)
    _check_convertible(c)
    # Baichuan2-7B has max_position_embeddings=4096; fall back to model_max_length for configs that omit it.
    max_pos = c.get("max_position_embeddings") or c.get("model_max_length") or 4096
    dtype = c.get("torch_dtype") or c.get("dtype")
    return LlamaConfig(
        vocab_size=c["vocab_size"],
        hidden_size=c["hidden_size"],
        intermediate_size=c["intermediate_size"],
        num_hidden_layers=c["num_hidden_layers"],
        num_attention_heads=c["num_attention_heads"],
        # Baichuan has plain multi-head attention: one k/v head per query head.
        num_key_value_heads=c["num_attention_heads"],
        hidden_act=c.get("hidden_act", "silu"),
        max_position_embeddings=int(max_pos),
        initializer_range=c.get("initializer_range", 0.02),
        rms_norm_eps=c.get("rms_norm_eps", 1e-6),
        use_cache=c.get("use_cache", True),
        pad_token_id=c.get("pad_token_id", 0),
        bos_token_id=c.get("bos_token_id", 1),
        eos_token_id=c.get("eos_token_id", 2),
        # Baichuan's embedding and (normalised) head are separate matrices; tying them would be wrong.
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": float(c.get("rope_theta") or BAICHUAN2_ROPE_THETA)},
        attention_bias=False,
        mlp_bias=False,
        dtype=dtype,
        architectures=["LlamaForCausalLM"],
    )


# ----------------------------------------------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------------------------------------------


def convert_baichuan_state_dict(
    sd: Mapping[str, torch.Tensor], cfg: Any, *, norm_head: bool | None = None
) -> dict[str, torch.Tensor]:
    """Rewrite a Baichuan state dict into LlamaForCausalLM's key layout.

    * `model.layers.{i}.self_attn.W_pack.weight` -> `q_proj` / `k_proj` / `v_proj` (row blocks of `hidden_size`);
    * `lm_head.weight` -> rows L2-normalised (the NormHead computation, done once), unless `norm_head` is False or
      the config is Baichuan (v1) 7B (`norm_head=None` decides from the config);
    * rotary `inv_freq` buffers that old `.bin` files carry are dropped (Llama recomputes them);
    * everything else passes through unchanged (its names already match Llama's).

    Raises MissingWeightError (a KeyError) naming the first missing tensor, and ValueError for a W_pack of the
    wrong shape or an unconvertible (ALiBi) config.
    """
    c = _config_dict(cfg)
    _check_convertible(c)
    hidden = c["hidden_size"]
    if norm_head is None:
        norm_head = uses_norm_head(c)

    required = list(_GLOBAL_WEIGHTS) + [
        f"model.layers.{i}.{name}" for i in range(c["num_hidden_layers"]) for name in _LAYER_WEIGHTS
    ]
    missing = [k for k in required if k not in sd]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise MissingWeightError(f"Baichuan state dict is missing {missing[0]!r}{more}")

    out: dict[str, torch.Tensor] = {}
    for key, tensor in sd.items():
        if ".rotary_emb." in key:
            continue
        if key.endswith(".self_attn.W_pack.weight"):
            if tuple(tensor.shape) != (3 * hidden, hidden):
                raise ValueError(f"{key} has shape {tuple(tensor.shape)}, expected {(3 * hidden, hidden)}")
            prefix = key[: -len("W_pack.weight")]
            q, k, v = tensor.split(hidden, dim=0)
            # clone(): the three row blocks would otherwise be views of one storage, which safetensors refuses to
            # save, and keeping the fused tensor alive through them would double peak memory.
            out[prefix + "q_proj.weight"] = q.clone()
            out[prefix + "k_proj.weight"] = k.clone()
            out[prefix + "v_proj.weight"] = v.clone()
        elif key == "lm_head.weight" and norm_head:
            # Normalise in float32 (bf16 row norms lose precision), then store in the checkpoint's dtype.
            out[key] = F.normalize(tensor.float(), dim=-1).to(tensor.dtype)
        else:
            out[key] = tensor
    return out


def _weight_files(src: Path) -> list[Path]:
    """The checkpoint's weight shards: safetensors preferred, else pytorch_model*.bin."""
    for index_name, pattern in (
        ("model.safetensors.index.json", "*.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model*.bin"),
    ):
        index = src / index_name
        if index.is_file():
            with open(index, encoding="utf-8") as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            return [src / s for s in shards]
        files = sorted(Path(p) for p in glob.glob(str(src / pattern)))
        if files:
            return files
    raise FileNotFoundError(f"no *.safetensors or pytorch_model*.bin weights in {src}")


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    # weights_only=True: never unpickle arbitrary objects from a downloaded file. mmap avoids a second in-memory
    # copy of a multi-GB file but needs the zip serialization format; very old files fall back to a plain load.
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:
        return torch.load(path, map_location="cpu", weights_only=True)


def load_baichuan_state_dict(src_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read every weight shard of a Baichuan checkpoint directory into one (unconverted) state dict."""
    from safetensors.torch import load_file

    sd: dict[str, torch.Tensor] = {}
    for path in _weight_files(Path(src_dir)):
        shard = load_file(path) if path.suffix == ".safetensors" else _load_bin(path)
        duplicated = sd.keys() & shard.keys()
        if duplicated:
            raise ValueError(f"{path.name} repeats tensor(s) already loaded: {sorted(duplicated)[:3]}")
        sd.update(shard)
    return sd


def _build_llama(
    llama_cfg: LlamaConfig, sd: dict[str, torch.Tensor], torch_dtype: torch.dtype | str | None
) -> LlamaForCausalLM:
    """Instantiate LlamaForCausalLM from a converted state dict, insisting that every key matches."""
    dtype = torch_dtype if torch_dtype is not None else sd["model.embed_tokens.weight"].dtype
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    # from_pretrained (rather than LlamaForCausalLM(config) + load_state_dict) skips the random initialisation of
    # 7B parameters and builds the non-persistent rotary buffers correctly.
    model, info = LlamaForCausalLM.from_pretrained(
        None, config=llama_cfg, state_dict=sd, dtype=dtype, output_loading_info=True
    )
    problems = {k: sorted(v) for k, v in info.items() if v}
    if problems:
        raise ValueError(f"converted Baichuan weights do not match LlamaForCausalLM: {problems}")
    return model.eval()


def load_baichuan_as_llama(
    src_dir: str | os.PathLike, torch_dtype: torch.dtype | str | None = None
) -> LlamaForCausalLM:
    """Load a Baichuan2-7B checkpoint directory as a LlamaForCausalLM, converting in memory.

    `torch_dtype` defaults to the checkpoint's own dtype (bfloat16 for Baichuan2-7B-Chat).
    """
    c = _config_dict(src_dir)
    llama_cfg = llama_config_from_baichuan(c)  # refuses ALiBi before any weights are read
    sd = convert_baichuan_state_dict(load_baichuan_state_dict(src_dir), c)
    return _build_llama(llama_cfg, sd, torch_dtype)


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------------------------


def _token_content(value: Any) -> Any:
    # Baichuan's tokenizer_config.json stores special tokens as serialized AddedToken dicts.
    return value.get("content") if isinstance(value, dict) else value


def _llama_tokenizer_config(src: Path, add_prefix_space: bool) -> dict[str, Any]:
    """A LlamaTokenizer tokenizer_config.json reproducing Baichuan's special tokens and BOS/EOS behaviour.

    Baichuan's own config names `BaichuanTokenizer` plus an `auto_map` into remote code, neither of which exists
    for transformers 5, so it is not reused verbatim.
    """
    src_cfg: dict[str, Any] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter wins, as in transformers
        if (src / name).is_file():
            with open(src / name, encoding="utf-8") as f:
                src_cfg.update(json.load(f))
    out = {k: _token_content(src_cfg.get(k, default)) for k, default in _TOKENIZER_DEFAULTS.items()}
    out.update(
        tokenizer_class="LlamaTokenizer",
        add_prefix_space=add_prefix_space,
        legacy=False,
        clean_up_tokenization_spaces=False,
    )
    max_len = src_cfg.get("model_max_length")
    if max_len is None and (src / "config.json").is_file():
        max_len = _config_dict(src).get("model_max_length")
    if max_len is not None:
        out["model_max_length"] = max_len
    return out


def _sentencepiece_adds_dummy_prefix(model_file: Path) -> bool:
    """Whether the sentencepiece model prepends '▁' to the input (Baichuan v1 does, Baichuan2 does not)."""
    from sentencepiece import sentencepiece_model_pb2  # needs protobuf, like transformers' own conversion

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_file.read_bytes())
    return bool(proto.normalizer_spec.add_dummy_prefix)


def load_baichuan_tokenizer(src_dir: str | os.PathLike):
    """Load Baichuan's sentencepiece `tokenizer.model` as a transformers LlamaTokenizer (tokenizers backend).

    transformers converts the sentencepiece model to a `tokenizers` BPE once, here; that needs the `sentencepiece`
    and `protobuf` packages. The result saves as tokenizer.json, which later loads without either package.
    """
    for module, package in (("sentencepiece", "sentencepiece"), ("google.protobuf", "protobuf")):
        if importlib.util.find_spec(module.split(".")[0]) is None or importlib.util.find_spec(module) is None:
            raise ImportError(
                f"loading Baichuan's tokenizer.model needs the '{package}' package (pip install {package})"
            )
    from transformers import LlamaTokenizer

    src = Path(src_dir)
    model_file = src / "tokenizer.model"
    if not model_file.is_file():
        raise FileNotFoundError(f"no tokenizer.model in {src}")
    tok_cfg = _llama_tokenizer_config(src, add_prefix_space=_sentencepiece_adds_dummy_prefix(model_file))
    # Stage the two files in a scratch dir so from_pretrained sees our config, not Baichuan's remote-code one.
    with tempfile.TemporaryDirectory(prefix="baichuan-tok-") as scratch:
        shutil.copyfile(model_file, Path(scratch) / "tokenizer.model")
        with open(Path(scratch) / "tokenizer_config.json", "w", encoding="utf-8") as f:
            json.dump(tok_cfg, f)
        tokenizer = LlamaTokenizer.from_pretrained(scratch)
    tokenizer.name_or_path = str(src)
    return tokenizer


def _write_tokenizer(src: Path, dst: Path) -> str | None:
    """Write the tokenizer next to the converted weights; returns a note for conversion.json (None if absent)."""
    model_file = src / "tokenizer.model"
    if not model_file.is_file():
        return None
    # Keep the original sentencepiece file for provenance; tokenizer.json (if written) takes precedence on load.
    shutil.copyfile(model_file, dst / "tokenizer.model")
    try:
        tokenizer = load_baichuan_tokenizer(src)
    except ImportError as e:
        # Without sentencepiece we cannot build tokenizer.json now. Write a config that makes LlamaTokenizer do the
        # conversion on first load (where sentencepiece must then be installed). Baichuan2 has no dummy prefix.
        logger.warning("%s; writing tokenizer.model + tokenizer_config.json only", e)
        with open(dst / "tokenizer_config.json", "w", encoding="utf-8") as f:
            json.dump(_llama_tokenizer_config(src, add_prefix_space=False), f, indent=2)
        return "copied tokenizer.model; tokenizer.json not built (sentencepiece/protobuf missing at conversion)"
    tokenizer.save_pretrained(dst)
    return "converted tokenizer.model to LlamaTokenizer tokenizer.json"


# ----------------------------------------------------------------------------------------------------------------
# Checkpoint conversion
# ----------------------------------------------------------------------------------------------------------------


def convert_baichuan_checkpoint(
    src_dir: str | os.PathLike, dst_dir: str | os.PathLike, *, overwrite: bool = False
) -> Path:
    """Convert a Baichuan2-7B checkpoint directory into a standard LlamaForCausalLM directory.

    Writes safetensors weights + config via `save_pretrained`, the tokenizer when `tokenizer.model` is present,
    Baichuan's generation_config.json when present, and `conversion.json` recording the source. Everything is
    built under a temporary name next to `dst_dir` and moved into place (llmrec.io.atomic_dir), so an interrupted
    run never leaves a half-written `dst_dir`. An existing `dst_dir` is replaced only with `overwrite=True`.
    """
    src, dst = Path(src_dir), Path(dst_dir)
    if src.resolve() == dst.resolve():
        raise ValueError("dst_dir must differ from src_dir")
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} exists; pass overwrite=True to replace it")

    c = _config_dict(src)
    llama_cfg = llama_config_from_baichuan(c)  # refuses ALiBi before reading gigabytes of weights
    weight_files = _weight_files(src)
    raw = load_baichuan_state_dict(src)
    norm_head = uses_norm_head(c)
    dropped = sorted(k for k in raw if ".rotary_emb." in k)
    model = _build_llama(llama_cfg, convert_baichuan_state_dict(raw, c, norm_head=norm_head), None)
    del raw

    with atomic_dir(dst) as tmp:  # built under a temporary name, swapped in whole (llmrec.io)
        if (src / "generation_config.json").is_file():
            # Baichuan's chat settings (user/assistant token ids 195/196, sampling defaults) stay useful.
            try:
                model.generation_config = transformers.GenerationConfig.from_pretrained(src)
            except Exception as e:  # an odd generation config must not block the weight conversion
                logger.warning("ignoring %s/generation_config.json: %s", src, e)
        model.save_pretrained(tmp)
        tokenizer_note = _write_tokenizer(src, tmp)
        record = {
            "source": str(src.resolve()),
            "source_name_or_path": c.get("_name_or_path"),
            "source_model_type": c.get("model_type"),
            "source_architectures": c.get("architectures"),
            "source_weight_files": [p.name for p in weight_files],
            "converter": __name__,
            "transformations": [
                "self_attn.W_pack split row-wise into q_proj, k_proj, v_proj",
                "lm_head.weight rows L2-normalised (NormHead baked in)" if norm_head else "lm_head.weight unchanged",
            ],
            "dropped_keys": dropped,
            "rope_theta": llama_cfg.rope_parameters["rope_theta"],
            "tokenizer": tokenizer_note,
            "transformers_version": transformers.__version__,
            "torch_version": torch.__version__,
            "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        with open(tmp / "conversion.json", "w", encoding="utf-8") as f:
            json.dump(record, f, indent=2)
            f.write("\n")

    return dst


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Convert a Baichuan2-7B checkpoint into a LlamaForCausalLM dir")
    parser.add_argument("src_dir", help="Baichuan checkpoint directory (config.json + weights [+ tokenizer.model])")
    parser.add_argument("dst_dir", help="output directory (written atomically)")
    parser.add_argument("--overwrite", action="store_true", help="replace dst_dir if it exists")
    args = parser.parse_args(argv)
    print(convert_baichuan_checkpoint(args.src_dir, args.dst_dir, overwrite=args.overwrite))


if __name__ == "__main__":
    main()
