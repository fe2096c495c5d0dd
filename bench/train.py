"""Training strategies side by side: DDP vs DeepSpeed ZeRO-2 vs ZeRO-3, 2 processes, same model and batch.

    python bench/train.py [--quick] [--nproc 2] [--hidden H] [--layers L] [--steps N]

Each strategy runs `train.tinyjob` (stage-2-shaped: LoRA + projectors + heads, LM loss + 2 InfoNCE losses) under
`torchrun --nproc_per_node 2` with DS_ACCELERATOR=cpu and gloo on CPU (nccl on GPUs). Measured per strategy:
median step time after the first step, tokens/s over all processes (prompt+answer tokens of the LM batch and of
both embedding batches), and per-process peak RSS up to the last training step ("model" = that peak minus the RSS
before the model was built, i.e. without the ~0.5 GB of imported libraries), and the parameter storage each
process holds after `prepare` (ZeRO-3 keeps a 1/N partition). On CPU, RSS also counts allocator caching of ZeRO-3's
transient all-gathered parameters, so at this small scale it need not fall with ZeRO-3 (see README). ZeRO-3
builds the backbone already partitioned (zero.Init), as from_pretrained does for a real checkpoint.

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


def run_strategy(strategy: str, out: Path, args) -> dict:
    env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"), "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc), "--master_port",
           str(args.port), "-m", "train.tinyjob", "--strategy", strategy, "--out", str(out), "--steps",
           str(args.steps), "--batch-size", str(args.batch_size), "--hidden", str(args.hidden), "--layers",
           str(args.layers)]
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
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--port", type=int, default=29561)
    ap.add_argument("--strategies", default="ddp,zero2,zero3")
    args = ap.parse_args()
    args.layers = args.layers or (4 if args.quick else 8)
    args.steps = args.steps or (6 if args.quick else 20)

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
    print(f"{'strategy':10s} {'step s':>8s} {'tokens/s':>10s} {'peak RSS MB':>12s} {'model MB':>9s} "
          f"{'params MB':>10s} {'loss':>7s}")
    for name, r in results.items():
        print(f"{name:10s} {r['step_s']:8.3f} {r['tokens_per_s']:10.0f} {r['peak_rss_mb']:12.0f} "
              f"{r['model_mem_mb']:9.0f} {r['param_mb']:10.1f} {r['final_loss']:7.3f}")
    print("(peak RSS: per process, up to the last step; model MB: that peak minus RSS before the model was built; "
          "params MB: parameter storage held per process)")
    print(f"\n{'LoRA share':10s} {'r':>4s} {'backbone':>14s} {'LoRA':>12s} {'share':>8s}")
    for name, s in shares.items():
        print(f"{name:10s} {s['lora_r']:4d} {s['backbone_params']:14,d} {s['lora_params']:12,d} {s['share_pct']:7.2f}%")

    ratios = {}
    if "ddp" in results and "zero2" in results:
        ratios["zero2_step_over_ddp"] = results["zero2"]["step_s"] / results["ddp"]["step_s"]
    if "zero2" in results and "zero3" in results:
        ratios["zero3_peak_rss_over_zero2"] = results["zero3"]["peak_rss_mb"] / results["zero2"]["peak_rss_mb"]
        ratios["zero3_model_mem_over_zero2"] = results["zero3"]["model_mem_mb"] / results["zero2"]["model_mem_mb"]
        ratios["zero3_param_mem_over_zero2"] = results["zero3"]["param_mb"] / results["zero2"]["param_mb"]
    print("ratios: " + ", ".join(f"{k}={v:.2f}" for k, v in ratios.items()))
    print(json.dumps({"device": device, "nproc": args.nproc, "hidden": args.hidden, "layers": args.layers,
                      "steps": args.steps, "batch_size": args.batch_size, "strategies": results, "ratios": ratios,
                      "lora_share": shares}))


if __name__ == "__main__":
    main()
