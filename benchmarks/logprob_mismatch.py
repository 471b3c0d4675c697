"""Behaviour vs learner log-probs: how far apart are the generator's log-probs of its own samples
and the learner's of the same tokens at the same weights, per precision and LM-head dtype?

    python benchmarks/logprob_mismatch.py [--model PATH] [--backends hf vllm] [--samples 64]

For each generator backend and dtype (fp32, bf16) and each learner ``logits_dtype`` ("model":
the head's matmul in the model's dtype, logits upcast after, as vLLM does; "float32": the matmul
in fp32), one batch of samples is drawn and scored by a learner rank (DeepSpeed, ZeRO-2, a world
of one) in the same dtype. Prints a table (mean and worst |log-prob gap|, the off-policy ratio's
range) and writes benchmarks/results/logprob_mismatch.json. ``--model``: an HF folder (a trained
checkpoint such as the demo's ``checkpoint-final`` has sharper logits than the random tiny model);
default: the tiny world's model, built here.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
os.environ.setdefault("DS_ACCELERATOR", "cpu")


def measure(model: str, backend: str, dtype: str, logits_dtypes: list[str], samples: int, temperature: float) -> list:
    import torch
    from transformers import AutoTokenizer

    from r1ray.actors.batching import pad_batch, token_logprobs
    from r1ray.actors.generator import Generator, GeneratorConfig, SamplingConfig
    from r1ray.actors.learner import LearnerConfig, LearnerRank
    from r1ray.cluster.groups import free_port

    tok = AutoTokenizer.from_pretrained(model)
    prompts = []
    for i in range(max(1, samples // 8)):
        a, b = 100 + (i * 137) % 900, 100 + (i * 311) % 900
        ids = tok.apply_chat_template([{"role": "user", "content": f"{a}+{b}"}], add_generation_prompt=True,
                                      tokenize=True, return_dict=False)
        prompts.append({"prompt_id": f"p{i}", "prompt_ids": list(ids), "columns": {}})
    gen = Generator(model, GeneratorConfig(backend=backend, dtype=dtype, max_model_len=256), seed=0)
    rollouts = gen.generate(prompts, 8, SamplingConfig(max_new_tokens=64, temperature=temperature))
    if hasattr(gen, "close"):
        gen.close()
    rows = []
    for logits_dtype in logits_dtypes:
        learner = LearnerRank(model, LearnerConfig(num_ranks=1, zero_stage=2, micro_batch_size=16, dtype=dtype,
                                                   logits_dtype=logits_dtype), rank=0, world_size=1)
        learner.setup("127.0.0.1", free_port())
        gaps = []
        for i in range(0, len(rollouts), 16):
            mb = rollouts[i:i + 16]
            packed = pad_batch([r.prompt_ids for r in mb], [r.completion_ids for r in mb], learner.pad_id)
            with torch.no_grad():
                lp = packed.gather(token_logprobs(learner.engine, packed, temperature, logits_dtype=logits_dtype))
            gaps += [b - a for r, row in zip(mb, lp) for a, b in zip(r.logprobs, row)]
        worst = max(abs(g) for g in gaps)
        rows.append({"backend": backend, "dtype": dtype, "logits_dtype": logits_dtype, "tokens": len(gaps),
                     "mean_abs_gap": sum(abs(g) for g in gaps) / len(gaps), "worst_abs_gap": worst,
                     "ratio_min": math.exp(min(gaps)), "ratio_max": math.exp(max(gaps))})
        del learner
    return rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", help="HF folder; default: the tiny world's model, built here")
    ap.add_argument("--backends", nargs="+", default=["hf"], choices=["hf", "vllm"])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--name", default="logprob_mismatch")
    args = ap.parse_args()
    model = args.model
    if model is None:
        from r1ray.controllers.common.tiny import build_tiny_world

        model = str(build_tiny_world(Path(tempfile.mkdtemp())) / "model")
    rows = []
    for backend in args.backends:
        for dtype in args.dtypes:
            heads = ["model"] if dtype == "float32" else ["model", "float32"]
            rows += measure(model, backend, dtype, heads, args.samples, args.temperature)
    print(f"\nmodel {args.model or 'tiny (random weights)'}, temperature {args.temperature}\n")
    print("| generator | dtype | learner logits_dtype | tokens | mean abs gap | worst abs gap | ratio min .. max |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['backend']} | {r['dtype']} | {r['logits_dtype']} | {r['tokens']} | {r['mean_abs_gap']:.2e} | "
              f"{r['worst_abs_gap']:.2e} | {r['ratio_min']:.4f} .. {r['ratio_max']:.4f} |")
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / f"{args.name}.json").write_text(json.dumps({"model": args.model, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
