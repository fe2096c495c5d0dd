"""The vLLM engine: our splice on our side, vLLM's paged-attention engines on the spliced `prompt_embeds`.

vLLM does not know our `<audio>`/`<cover>` placeholders, so the multimodal part stays in torch here: each prompt is
tokenised and spliced by `MultimodalLM.splice` into one [T, H] tensor, which vLLM takes as `prompt_embeds`
(`enable_prompt_embeds=True`). One vLLM instance runs one runner, so there are two engines in this process:

- a generate engine writes the reasons (greedy `SamplingParams(temperature=0)`); one background thread owns it
  (`_ContinuousBatcher`), so `generate` may be called from several threads at once and every call's requests join
  the running batch (`concurrent_calls = True` tells the app it need not group requests itself), and
- a pooling engine (`runner="pooling", convert="embed"`) returns the final hidden state (after the last norm) of
  the last prompt token — `PoolerConfig(pooling_type="LAST", use_activation=False)`; with the default activation
  vLLM would L2-normalise it — to which `MultimodalLM.head` (+ late fusion) is applied on our side.

Memory: only the token-embedding table (read tensor by tensor from the merged checkpoint's safetensors) and the
projector/head weights (`multimodal.safetensors`) are loaded here; the transformer itself is loaded by vLLM only,
so a 7B bundle is not held twice.

Processes (`serve.vllm_in_process`): on GPUs each vLLM engine spawns its EngineCore process, as vLLM does by default
(spawn start method: the entry script needs `if __name__ == "__main__":`). On CPU vLLM's engine core runs in this
process instead: as a separate process it waits for its worker by spinning (sched_yield) and holds a whole core.
Measured at 12x768 on 2 cores, c=32 reasons: 144 tokens/s in process against 76-78 with the separate processes,
p99 31.5 s against 59-63 s. `close()` shuts both engines down.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import os
import queue
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoTokenizer

from llmrec.model.bundle import read_bundle_meta
from llmrec.model.mm_lm import MultimodalLM, read_mm_config
from serve.engines.base import Engine, EngineInput, check_embed_prompt, concat_media, sampling_temperature

# vLLM's CPU backend forces `spawn` for its workers anyway; set it before vLLM is imported so the GPU build agrees
# (forking a process that already runs torch threads can deadlock).
os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class _InputEmbeddings(nn.Module):
    """Stands in for the causal LM inside `MultimodalLM`: `splice` needs only the input-embedding table."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.embed_tokens = nn.Embedding.from_pretrained(weight, freeze=True)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens


def load_input_embeddings(lm_dir: Path) -> torch.Tensor:
    """The `*embed_tokens.weight` tensor of a `save_pretrained` checkpoint (single or sharded safetensors), read
    without loading any other tensor."""
    index = lm_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        candidates = [(k, lm_dir / f) for k, f in weight_map.items()]
    else:
        candidates = []
        for f in sorted(lm_dir.glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as st:
                candidates += [(k, f) for k in st.keys()]
    found = [(k, f) for k, f in candidates if k.endswith("embed_tokens.weight")]
    if len(found) != 1:
        raise ValueError(f"{lm_dir}: expected one '*embed_tokens.weight' tensor in the safetensors checkpoint, "
                         f"found {[k for k, _ in found]} (is it a Llama-architecture save_pretrained dir?)")
    key, path = found[0]
    with safe_open(str(path), framework="pt") as st:
        return st.get_tensor(key)


def checkpoint_dtype(lm_dir: Path) -> str:
    """The dtype the merged checkpoint was saved in; both engines serve it in that precision (vLLM's own `auto`
    would turn float32 into float16)."""
    cfg = json.loads((lm_dir / "config.json").read_text())
    dtype = str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32").replace("torch.", "")
    if dtype not in _DTYPES:
        raise ValueError(f"{lm_dir}/config.json: unsupported dtype {dtype!r}; expected one of {list(_DTYPES)}")
    return dtype


def runs_in_process(serve_cfg) -> bool:
    """`serve.vllm_in_process`, with None resolved: in this process where there is no GPU."""
    setting = getattr(serve_cfg, "vllm_in_process", None)
    return (not torch.cuda.is_available()) if setting is None else bool(setting)


def explicit_kv_cache_bytes(serve_cfg) -> int | None:
    """`serve.vllm_kv_cache_gib` in bytes, the user's KV-cache size for every engine; None where it is not set."""
    gib = float(getattr(serve_cfg, "vllm_kv_cache_gib", 0.0) or 0.0)
    return int(gib * (1 << 30)) if gib > 0 else None


def kv_cache_bytes(serve_cfg, in_process: bool) -> int | None:
    """Explicit KV-cache size of the generate engine, or None to let vLLM size it from `gpu_memory_utilization`
    (the pooling engine's is `pooling_kv_cache_bytes`).

    In process, vLLM's CPU profiling counts this whole server's memory as the model's and asks for a negative KV
    cache, so the size is fixed here: `serve.vllm_kv_cache_gib`, else `serve.vllm_memory_fraction` of the host's
    RAM — what vLLM reserves per engine on CPU in its own process."""
    explicit = explicit_kv_cache_bytes(serve_cfg)
    if explicit is not None or not in_process:
        return explicit
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(float(getattr(serve_cfg, "vllm_memory_fraction", 0.2)) * ram)


# Tokens the pooling engine's KV cache holds (or one `max_model_len` prompt, where that is longer). Embedding is
# prefill only: a prompt's blocks are freed as soon as its state is pooled, so the cache bounds the tokens of one
# scheduler step, not a server's worth of running conversations. 8,192 is twice vLLM's CPU step (4,096 tokens),
# ~85 catalogue prompts of ~96 tokens; a larger cache buys no throughput on CPU and was 2.35 GB per Ray actor at
# 100k songs.
POOL_KV_TOKENS = 8192


def kv_bytes_per_token(lm_cfg: dict, dtype: str) -> int:
    """Bytes one token takes in a KV cache of the LM described by `lm_cfg` (its config.json): K and V per layer."""
    heads = int(lm_cfg["num_attention_heads"])
    kv_heads = int(lm_cfg.get("num_key_value_heads") or heads)
    head_dim = int(lm_cfg.get("head_dim") or int(lm_cfg["hidden_size"]) // heads)
    return 2 * int(lm_cfg["num_hidden_layers"]) * kv_heads * head_dim * _DTYPES[dtype].itemsize


def pooling_kv_cache_bytes(serve_cfg, lm_cfg: dict, dtype: str, max_model_len: int) -> int:
    """KV-cache size of the pooling (embedding) engine: `serve.vllm_kv_cache_gib` when set, else room for
    `POOL_KV_TOKENS` tokens or one longest prompt, whichever is more (vLLM refuses a cache that cannot hold one
    `max_model_len` prompt). A smaller cache only means fewer prompts per scheduler step."""
    explicit = explicit_kv_cache_bytes(serve_cfg)
    if explicit is not None:
        return explicit
    return max(POOL_KV_TOKENS, max_model_len) * kv_bytes_per_token(lm_cfg, dtype)


@contextlib.contextmanager
def _engine_core_in_process(enabled: bool):
    """vLLM reads VLLM_ENABLE_V1_MULTIPROCESSING while `LLM(...)` builds its engine: set it for that long only."""
    key, old = "VLLM_ENABLE_V1_MULTIPROCESSING", os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
    if enabled:
        os.environ[key] = "0"
    try:
        yield
    finally:
        if enabled:
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


def scheduler_args(serve_cfg) -> dict[str, int]:
    """The generate engine's scheduler limits that `serve.vllm_max_num_seqs` / `serve.vllm_max_num_batched_tokens`
    set (0 or absent: vLLM's own default, which on CPU is 256 sequences and 4096 tokens per step)."""
    out = {}
    for key in ("max_num_seqs", "max_num_batched_tokens"):
        value = int(getattr(serve_cfg, f"vllm_{key}", 0) or 0)
        if value < 0:
            raise ValueError(f"serve.vllm_{key} must be >= 0 (0 = vLLM's default), got {value}")
        if value:
            out[key] = value
    return out


class _ContinuousBatcher:
    """Drives one vLLM engine from a single background thread, so that requests from concurrent callers join the
    batch that is already running (continuous batching across calls, vLLM's main advantage over a static batch).
    `LLM.generate` would run each call's batch to completion while other callers wait; `LLMEngine` itself is not
    thread-safe, hence one owner thread: callers only put requests into its inbox and wait on futures.

    A caller that stops waiting (its request timed out: the client already got a 504) aborts its requests in the
    engine through the same inbox, so abandoned generations stop taking KV cache and compute from the live ones."""

    def __init__(self, llm_engine):
        self.engine = llm_engine
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._pending: dict[str, Future] = {}
        self._ids = itertools.count()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="vllm-generate", daemon=True)
        self._thread.start()

    def submit(self, prompt: dict, params) -> Future:
        if self._closed:
            raise RuntimeError("the vLLM engine is closed")
        fut: Future = Future()
        fut.request_id = rid = str(next(self._ids))
        self._inbox.put((rid, prompt, params, fut))
        return fut

    def cancel(self, futures: list[Future]) -> None:
        """Abort the engine requests of `futures` that are still running (done by the owner thread)."""
        rids = [f.request_id for f in futures if not f.done()]
        if rids and not self._closed:
            self._inbox.put(("abort", rids))

    def wait(self, futures: list[Future], timeout_s: float | None) -> list:
        """Results of `futures`, in order. Past `timeout_s` (None: no limit) the unfinished requests are aborted
        and TimeoutError is raised."""
        deadline = None if not timeout_s else time.monotonic() + timeout_s
        try:
            return [f.result(None if deadline is None else max(0.0, deadline - time.monotonic())) for f in futures]
        except FutureTimeout:
            self.cancel(futures)
            raise TimeoutError(f"vLLM generation not finished within {timeout_s:g}s (serve.request_timeout_s); "
                               f"its requests were aborted") from None

    def _abort(self, rids: list[str]) -> None:
        rids = [r for r in rids if r in self._pending]
        if rids:
            self.engine.abort_request(rids)
            for r in rids:
                self._pending.pop(r).set_exception(TimeoutError(f"vLLM request {r} was aborted"))

    def _admit(self, job) -> None:
        if job[0] == "abort":
            self._abort(job[1])
            return
        rid, prompt, params, fut = job
        try:
            self.engine.add_request(rid, prompt, params)
        except Exception as e:  # noqa: BLE001 - a bad request fails alone, the batch goes on
            fut.set_exception(e)
        else:
            self._pending[rid] = fut

    def _run(self) -> None:
        while True:
            if not self._pending:  # idle: sleep until work (or the stop sentinel) arrives
                job = self._inbox.get()
                if job is None:
                    return
                self._admit(job)
            while True:  # admit everything that arrived since the last step
                try:
                    job = self._inbox.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    return
                self._admit(job)
            try:
                outputs = self.engine.step()
            except Exception as e:  # noqa: BLE001 - the engine failed: every waiting caller gets the error
                for fut in self._pending.values():
                    fut.set_exception(e)
                self._pending.clear()
                continue
            for out in outputs:
                if out.finished and out.request_id in self._pending:
                    self._pending.pop(out.request_id).set_result(out)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._inbox.put(None)
            self._thread.join(timeout=30)
            for fut in self._pending.values():
                fut.set_exception(RuntimeError("the vLLM engine was closed"))


class VLLMEngine(Engine):
    name = "vllm"
    concurrent_calls = True  # generate() is thread-safe and batches across concurrent calls (continuous batching)

    def __init__(self, bundle_dir: str | os.PathLike, serve_cfg=None, dtype: str | None = None,
                 embed_only: bool = False):
        """`embed_only`: build the pooling `LLM` alone (bulk embedding: `serve --build-index`), not the generating
        one beside it; each `LLM` holds a KV cache of its own, so this halves the engine's memory."""
        from vllm import LLM, SamplingParams  # noqa: F401 - fail here, clearly, when vLLM is missing
        from vllm.config import PoolerConfig

        self.bundle_dir = Path(bundle_dir)
        self.meta = read_bundle_meta(self.bundle_dir)
        lm_dir = self.bundle_dir / self.meta["lm"]
        self.dtype = dtype or checkpoint_dtype(lm_dir)
        lm_cfg = json.loads((lm_dir / "config.json").read_text())
        tokenizer = AutoTokenizer.from_pretrained(lm_dir)
        self.model = MultimodalLM(_InputEmbeddings(load_input_embeddings(lm_dir)), tokenizer,
                                  read_mm_config(self.bundle_dir))
        self.model.load_multimodal(self.bundle_dir)
        self.model.eval()

        max_len = int(getattr(serve_cfg, "vllm_max_model_len", 0) or lm_cfg.get("max_position_embeddings", 2048))
        self.max_positions = max_len
        self.in_process = runs_in_process(serve_cfg)
        common = dict(
            model=str(lm_dir), dtype=self.dtype, enable_prompt_embeds=True, enforce_eager=True,
            max_model_len=max_len, seed=0,
            gpu_memory_utilization=float(getattr(serve_cfg, "vllm_memory_fraction", 0.2)),
        )
        pool_kv_bytes = pooling_kv_cache_bytes(serve_cfg, lm_cfg, self.dtype, max_len)
        self.timeout_s = float(getattr(serve_cfg, "request_timeout_s", 0) or 0) or None
        self.temperature = sampling_temperature(serve_cfg)
        self._lock = threading.Lock()  # `LLM` is not thread-safe: one pooling call at a time
        self._gen = self._pool = self._batcher = None
        try:
            with _engine_core_in_process(self.in_process):
                if not embed_only:
                    self._gen = LLM(**common, kv_cache_memory_bytes=kv_cache_bytes(serve_cfg, self.in_process),
                                    **scheduler_args(serve_cfg))
                    self._batcher = _ContinuousBatcher(self._gen.llm_engine)
                self._pool = LLM(**common, kv_cache_memory_bytes=pool_kv_bytes,
                                 runner="pooling", convert="embed",
                                 pooler_config=PoolerConfig(pooling_type="LAST", use_activation=False))
        except BaseException:
            self.close()
            raise

    @torch.inference_mode()
    def prompt_embeds(self, item: EngineInput, ids: list[int]) -> dict:
        """One vLLM prompt: the spliced [T, H] embeddings of one request, in the served dtype."""
        embeds = self.model.splice(torch.tensor([ids]), item.media)[0]
        return {"prompt_embeds": embeds.to(_DTYPES[self.dtype]).contiguous()}

    # ------------------------------------------------------------------------------------------------ engine
    def generate_ids(self, items: list[EngineInput], max_new_tokens: int) -> list[list[int]]:
        """New token ids per prompt (EOS included when it was generated), as `MultimodalLM.generate`: greedy, or
        sampled with the item's `sample_seed` (vLLM seeds each request on its own)."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        if not items:
            return []
        if self._batcher is None:
            raise RuntimeError("this vLLM engine was built with embed_only=True (bulk embedding) and cannot generate; "
                               "load it without embed_only to serve reasons")
        prompts = [self.prompt_embeds(it, self.token_ids(it, max_new_tokens)) for it in items]
        # detokenize=False: we decode with the bundle's tokenizer exactly as the transformers engine does;
        # FINAL_ONLY: no partial outputs per step.
        def params(item: EngineInput):
            sampled = {} if item.sample_seed is None else dict(temperature=self.temperature, top_p=0.95,
                                                               seed=item.sample_seed)
            return SamplingParams(**{"temperature": 0.0, **sampled}, max_tokens=max_new_tokens, detokenize=False,
                                  output_kind=RequestOutputKind.FINAL_ONLY)

        futures = [self._batcher.submit(p, params(it)) for p, it in zip(prompts, items)]
        return [list(out.outputs[0].token_ids) for out in self._batcher.wait(futures, self.timeout_s)]

    def generate(self, items: list[EngineInput], max_new_tokens: int) -> list[str]:
        return self.decode(self.generate_ids(items, max_new_tokens))

    def hidden_states(self, items: list[EngineInput]) -> torch.Tensor:
        """[N, H] final hidden state at each prompt's last token (`<emb>`), computed by the pooling engine."""
        prompts = []
        for it in items:
            ids = self.token_ids(it)
            check_embed_prompt(self.model, ids)
            prompts.append(self.prompt_embeds(it, ids))
        with self._lock:
            outs = self._pool.embed(prompts, use_tqdm=False)
        return torch.stack([torch.as_tensor(o.outputs.embedding, dtype=torch.float32) for o in outs])

    @torch.inference_mode()
    def embed(self, items: list[EngineInput]) -> np.ndarray:
        if not items:
            return np.zeros((0, self.embedding_dim), dtype=np.float32)
        emb = self.model.head(self.hidden_states(items), concat_media(items))
        return emb.float().cpu().numpy()

    def close(self) -> None:
        if getattr(self, "_batcher", None) is not None:
            self._batcher.close()
            self._batcher = None
        for attr in ("_gen", "_pool"):
            llm = getattr(self, attr, None)
            setattr(self, attr, None)
            if llm is not None:
                llm.llm_engine.engine_core.shutdown()
