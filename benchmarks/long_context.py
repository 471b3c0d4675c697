"""Long traces on the learner: token-budget micro-batches against counted ones.

    python benchmarks/long_context.py [--max-len 1024] [--samples 20] [--steps 2]

A random Qwen2-shaped model of about 90M parameters (``weight_sync.py``'s "100M" shape: hidden
768, 10 layers, vocabulary 32768, tied embeddings), two real learner ranks (DeepSpeed ZeRO-2
over gloo, one thread each, fp32, as the tiny recipe) and one GRPO batch whose lengths follow a
long tail: 90% short completions (``max-len``/16 to ``max-len``/8 tokens) and 10% at
``max-len``, shuffled, after a 32-token prompt. Two plans for the same batch:

- ``counted``: contiguous rank shards, ``--micro-batch-size`` rows per micro-batch in order
  (every micro-batch holding a long row is padded to its length);
- ``token budget``: ``learner.max_tokens_per_micro_batch`` = ``--budget`` (rows of like
  lengths together, shards balanced by tokens).

Each plan: fresh learners from the same weights, learning rate 0 (every step sees the same
weights), one warm-up step, then ``--steps`` timed steps; the step's seconds are the slower
rank's (median over the steps), with the loss and gradient norm, which must agree between the
plans (the same step, cut differently). Writes benchmarks/results/long_context.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHAPE = {"hidden_size": 768, "num_hidden_layers": 10, "intermediate_size": 2048, "num_attention_heads": 12,
         "num_key_value_heads": 4, "vocab_size": 32768}
PROMPT = 32


def build_model(root: Path) -> str:
    """The random model (and the tiny tokenizer, which the learner loads beside it), once."""
    out = root / "model-90M"
    if (out / "config.json").exists():
        return str(out)
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from r1ray.controllers.common.tiny import build_tokenizer

    torch.manual_seed(0)
    cfg = Qwen2Config(**SHAPE, max_position_embeddings=65536, tie_word_embeddings=True)
    Qwen2ForCausalLM(cfg).save_pretrained(out)
    build_tokenizer().save_pretrained(out)
    return str(out)


def long_tail(n: int, max_len: int, seed: int = 0):
    """``n`` samples: 10% with ``max_len`` completion tokens, the rest max_len/16..max_len/8."""
    from r1ray.actors.rollout import TrainSample

    rng = random.Random(seed)
    longs = max(1, n // 10)
    lengths = [max_len] * longs + [rng.randint(max_len // 16, max_len // 8) for _ in range(n - longs)]
    rng.shuffle(lengths)
    samples = []
    for k, m in enumerate(lengths):
        ids = [rng.randint(300, SHAPE["vocab_size"] - 1) for _ in range(PROMPT + m)]
        samples.append(TrainSample(ids[:PROMPT], ids[PROMPT:], logprobs=[-10.0] * m,
                                   advantage=rng.gauss(0.0, 1.0), in_loss=True))
    return samples


def _worker(rank: int, ranks: int, port: int, model: str, plans: dict, samples: list, steps: int, out: str):
    os.environ["DS_ACCELERATOR"] = "cpu"
    import torch
    import torch.distributed as dist

    from r1ray.actors.batching import item_tokens, learner_shards, step_micro_batches
    from r1ray.actors.learner import GrpoStats, LearnerConfig, LearnerRank, OptimConfig
    from r1ray.actors.loss import global_denominator

    torch.set_num_threads(1)
    results = {}
    for name, (mbs, budget) in plans.items():
        cfg = LearnerConfig(num_ranks=ranks, zero_stage=2, micro_batch_size=mbs, max_tokens_per_micro_batch=budget,
                            optim=OptimConfig(lr=0.0, grad_clip=1e9))
        learner = LearnerRank(model, cfg, rank=rank, world_size=ranks, seed=0)
        learner.setup("127.0.0.1", port)  # the process group is joined once: later setups reuse it
        learner.start_phase(lr=0.0)
        lengths = [s.loss_tokens for s in samples]
        denom = global_denominator("dapo", lengths, max(lengths),
                                   step_micro_batches([item_tokens(s) for s in samples], ranks, mbs, budget))
        shard = learner_shards(samples, ranks, budget)[rank]
        times, metrics = [], None
        for step in range(steps + 1):
            dist.barrier()
            t0 = time.perf_counter()
            stats = learner.grpo_step(shard, denom, float(sum(lengths)))
            seconds = torch.tensor([time.perf_counter() - t0])
            dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
            parts = [None] * ranks
            dist.all_gather_object(parts, stats)
            metrics = GrpoStats.combine(parts)
            if step:
                times.append(float(seconds))
        results[name] = {"step_s": statistics.median(times), "steps_s": times, "loss": metrics["loss"],
                         "grad_norm": metrics["grad_norm"]}
        del learner
    if rank == 0:
        Path(out).write_text(json.dumps(results))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-len", type=int, default=1024, help="completion tokens of the long 10%%")
    ap.add_argument("--samples", type=int, default=20)
    ap.add_argument("--micro-batch-size", type=int, default=4, help="rows per micro-batch of the counted plan")
    ap.add_argument("--budget", type=int, default=0, help="tokens per micro-batch (default: 2 x (prompt + max-len))")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--name", default="long_context")
    args = ap.parse_args()

    import torch.multiprocessing as mp

    from r1ray.actors.batching import item_tokens, micro_batch_plan, shard_indices
    from r1ray.cluster.groups import free_port

    root = Path(tempfile.gettempdir()) / "r1ray-long-context"
    model = build_model(root)
    samples = long_tail(args.samples, args.max_len)
    budget = args.budget or 2 * (PROMPT + args.max_len)
    plans = {"counted": (args.micro_batch_size, None), "token budget": (64, budget)}
    lengths = [item_tokens(s) for s in samples]
    padded = {}  # per rank: the padded tokens of its micro-batches (the slower rank sets the step)
    for name, (mbs, b) in plans.items():
        padded[name] = [sum(len(mb) * max(part_len[i] for i in mb) for mb in micro_batch_plan(part_len, mbs, b))
                        for part in shard_indices(lengths, 2, b) for part_len in [[lengths[i] for i in part]]]
    out = root / "result.json"
    mp.start_processes(_worker, args=(2, free_port(), model, plans, samples, args.steps, str(out)), nprocs=2,
                       start_method="spawn")
    results = json.loads(out.read_text())
    for name in plans:
        results[name]["padded_tokens"] = padded[name]
    counted, budgeted = results["counted"], results["token budget"]
    speedup = counted["step_s"] / budgeted["step_s"]
    summary = {"model": SHAPE, "samples": args.samples, "max_len": args.max_len, "tokens": sum(lengths),
               "micro_batch_size": args.micro_batch_size, "budget": budget, "results": results,
               "speedup": speedup, "loss_gap": abs(counted["loss"] - budgeted["loss"]),
               "grad_norm_rel_gap": abs(counted["grad_norm"] - budgeted["grad_norm"]) / counted["grad_norm"]}
    rdir = HERE / "results"
    rdir.mkdir(exist_ok=True)
    (rdir / f"{args.name}.json").write_text(json.dumps(summary, indent=2))
    lines = [f"# Token-budget micro-batches on a long-tailed batch ({args.samples} samples, {sum(lengths)} tokens, "
             f"10% at {PROMPT}+{args.max_len})", "",
             "| plan | step s | padded tokens per rank | loss | grad norm |", "|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['step_s']:.1f} | {' / '.join(map(str, r['padded_tokens']))} | {r['loss']:.6f} "
                     f"| {r['grad_norm']:.6f} |")
    lines += ["", f"Token budget {budget}: {speedup:.2f}x faster than {args.micro_batch_size} rows per micro-batch; "
              f"loss gap {summary['loss_gap']:.1e}, gradient-norm gap {summary['grad_norm_rel_gap']:.1e} (relative)."]
    (rdir / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
