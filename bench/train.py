"""Training strategies side by side: DDP vs DeepSpeed ZeRO-2 vs ZeRO-3, 2 processes, same model and batch.

    python bench/train.py [--quick] [--nproc 2] [--hidden 1024] [--layers 12] [--steps N] [--batch-size B]

Each strategy runs `testkit.tinyjob` (stage-2-shaped: LoRA + projectors + heads, LM loss + 2 InfoNCE losses) under
`torchrun --nproc_per_node 2` with DS_ACCELERATOR=cpu and gloo on CPU (nccl on GPUs). Measured per strategy:
median step time after the first step, tokens/s over all processes (prompt+answer tokens of the LM batch and of
both embedding batches), and per-process peak RSS up to the last training step ("model" = that peak minus the RSS
before the model was built, i.e. without the ~0.5 GB of imported libraries), and the parameter storage each
process holds after `prepare` (ZeRO-3 keeps a 1/N partition). ZeRO-3 builds the backbone already partitioned
(zero.Init), as from_pretrained does for a real checkpoint.

Two ZeRO-3 rows: `zero3` is train/configs/zero3.json as shipped, whose live-parameter cache and reuse distance
(1e9 parameters, HF's recommendation for GPUs) exceed these models, so after the first step every gathered layer
stays gathered; `zero3-capped` caps both at --zero3-live parameters, the setting for memory over speed.

RSS on CPU also counts what the C allocator keeps: glibc's mmap threshold adapts upwards once large blocks are
freed, so later ZeRO-3 all-gather buffers and activations come from the heap and are not returned to the system.
Every strategy therefore runs with MALLOC_MMAP_THRESHOLD_=65536 (a fixed threshold; --malloc-default leaves glibc's
adaptive one), so that peak RSS measures memory in use, not allocator retention.

Also counts LoRA's trainable share of the backbone for the `base` preset on a meta-device Baichuan2-7B-shaped Llama
(no weights allocated) and for the `tiny` preset. Prints a table; the last line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

# Baichuan2-7B's published config.json (the fields the Llama conversion reads).
BAICHUAN2_7B = {"architectures": ["BaichuanForCausalLM"], "model_type": "baichuan", "hidden_size": 4096,
                "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
                "vocab_size": 125696, "model_max_length": 4096, "rms_norm_eps": 1e-6, "hidden_act": "silu"}


def mmap_threshold() -> str:
    """The fixed glibc mmap threshold every strategy runs with: the caller's MALLOC_MMAP_THRESHOLD_, else 64 KiB."""
    return os.environ.get("MALLOC_MMAP_THRESHOLD_") or "65536"


def strategy_command(strategy: str, args) -> tuple[str, list[str]]:
    """(testkit.tinyjob strategy, its extra arguments) of a bench strategy name."""
    if strategy == "zero3-capped":
        cap = str(int(args.zero3_live))
        return "zero3", ["--ds-set", f"zero_optimization.stage3_max_live_parameters={cap}",
                         "--ds-set", f"zero_optimization.stage3_max_reuse_distance={cap}"]
    return strategy, []


def run_strategy(strategy: str, out: Path, args) -> dict:
    env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"), "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    if not args.malloc_default:
        env["MALLOC_MMAP_THRESHOLD_"] = mmap_threshold()
    job, extra = strategy_command(strategy, args)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc), "--master_port",
           str(args.port), "-m", "testkit.tinyjob", "--strategy", job, "--out", str(out), "--steps",
           str(args.steps), "--batch-size", str(args.batch_size), "--hidden", str(args.hidden), "--layers",
           str(args.layers), *extra]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{strategy} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    ranks = [json.loads((out / f"stats_rank{r}.json").read_text()) for r in range(args.nproc)]
    step_s = statistics.median(ranks[0]["step_times"][1:] or ranks[0]["step_times"])
    tokens_per_step = sum(r["tokens"] for r in ranks) / args.steps
    return {"step_s": step_s, "tokens_per_s": tokens_per_step / step_s,
            "peak_rss_mb": max(r["train_peak_rss_mb"] for r in ranks),
            "model_mem_mb": max(r["train_peak_rss_mb"] - r["rss_before_model_mb"] for r in ranks),
            "param_mb": max(r["local_param_mb"] for r in ranks),
            "final_loss": ranks[0]["losses"][-1], "trainable": ranks[0]["trainable"], "total": ranks[0]["total"]}


def lora_share(model_cfg, llama_config) -> dict:
    """LoRA parameters / backbone parameters, counted on the meta device (shapes only, nothing allocated)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        lm = LlamaForCausalLM(llama_config)
        backbone = sum(p.numel() for p in lm.parameters())
        lm = get_peft_model(lm, LoraConfig(r=model_cfg.lora_r, lora_alpha=model_cfg.lora_alpha,
                                           target_modules=model_cfg.lora_targets, task_type="CAUSAL_LM"))
    lora = sum(p.numel() for p in lm.parameters() if p.requires_grad)
    return {"backbone_params": backbone, "lora_params": lora, "lora_r": model_cfg.lora_r,
            "share_pct": 100 * lora / backbone}


def lora_shares() -> dict:
    from transformers import LlamaConfig

    from llmrec.config import load_config
    from llmrec.model.baichuan import llama_config_from_baichuan

    base, tiny = load_config(preset="base").model, load_config(preset="tiny").model
    tiny_llama = LlamaConfig(vocab_size=tiny.tokenizer_vocab, hidden_size=tiny.hidden_size,
                             intermediate_size=tiny.intermediate_size, num_hidden_layers=tiny.num_layers,
                             num_attention_heads=tiny.num_heads, tie_word_embeddings=False)
    return {"base": lora_share(base, llama_config_from_baichuan(BAICHUAN2_7B)), "tiny": lora_share(tiny, tiny_llama)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer steps (CI / 2-core machines)")
    ap.add_argument("--nproc", type=int, default=2)
    # 1024 x 12 (~130M parameters, 3M trainable): big enough that the frozen backbone, which ZeRO-3 partitions,
    # dominates a process's memory, as it does at 7B; at 512 x 4 (11.6M) fixed overheads hide the 22 MB it saves.
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--port", type=int, default=29561)
    ap.add_argument("--strategies", default="ddp,zero2,zero3,zero3-capped")
    ap.add_argument("--zero3-live", type=float, default=1e6,
                    help="zero3-capped: stage3_max_live_parameters and stage3_max_reuse_distance")
    ap.add_argument("--malloc-default", action="store_true",
                    help="keep glibc's adaptive mmap threshold (RSS then includes freed memory the allocator keeps)")
    args = ap.parse_args()
    args.steps = args.steps or (4 if args.quick else 12)
    args.batch_size = args.batch_size or (2 if args.quick else 4)

    shares = lora_shares()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for strategy in args.strategies.split(","):
            print(f"running {strategy} ({args.nproc} processes, {args.steps} steps) ...", flush=True)
            results[strategy] = run_strategy(strategy, Path(tmp) / strategy, args)

    first = next(iter(results.values()))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"\nmodel: tiny Llama hidden={args.hidden} layers={args.layers} + LoRA/projectors/heads "
          f"({first['total'] / 1e6:.1f}M params, {first['trainable'] / 1e3:.0f}k trainable), batch "
          f"{args.batch_size}/process, {args.nproc} processes on {device}")
    print(f"C allocator: {'glibc default' if args.malloc_default else f'MALLOC_MMAP_THRESHOLD_={mmap_threshold()}'}; "
          f"zero3-capped: live parameters and reuse distance {args.zero3_live:.0e}")
    print(f"{'strategy':12s} {'step s':>8s} {'tokens/s':>10s} {'peak RSS MB':>12s} {'model MB':>9s} "
          f"{'params MB':>10s} {'loss':>7s}")
    for name, r in results.items():
        print(f"{name:12s} {r['step_s']:8.3f} {r['tokens_per_s']:10.0f} {r['peak_rss_mb']:12.0f} "
              f"{r['model_mem_mb']:9.0f} {r['param_mb']:10.1f} {r['final_loss']:7.3f}")
    print("(peak RSS: per process, up to the last step; model MB: that peak minus RSS before the model was built; "
          "params MB: parameter storage held per process)")
    print(f"\n{'LoRA share':10s} {'r':>4s} {'backbone':>14s} {'LoRA':>12s} {'share':>8s}")
    for name, s in shares.items():
        print(f"{name:10s} {s['lora_r']:4d} {s['backbone_params']:14,d} {s['lora_params']:12,d} {s['share_pct']:7.2f}%")

    ratios = {}
    if "ddp" in results and "zero2" in results:
        ratios["zero2_step_over_ddp"] = results["zero2"]["step_s"] / results["ddp"]["step_s"]
    for z3 in ("zero3", "zero3-capped"):
        if "zero2" in results and z3 in results:
            key = z3.replace("-", "_")
            for fig, label in (("peak_rss_mb", "peak_rss"), ("model_mem_mb", "model_mem"), ("param_mb", "param_mem"),
                               ("step_s", "step")):
                ratios[f"{key}_{label}_over_zero2"] = results[z3][fig] / results["zero2"][fig]
    print("ratios: " + ", ".join(f"{k}={v:.2f}" for k, v in ratios.items()))
    print(json.dumps({"device": device, "nproc": args.nproc, "hidden": args.hidden, "layers": args.layers,
                      "zero3_live": args.zero3_live,
                      "malloc_mmap_threshold": None if args.malloc_default else int(mmap_threshold()),
                      "steps": args.steps, "batch_size": args.batch_size, "strategies": results, "ratios": ratios,
                      "lora_share": shares}))


if __name__ == "__main__":
    main()
