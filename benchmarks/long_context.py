"""Long traces on the learner: the longest row one step takes with and without sequence
parallelism and gradient checkpointing, and token-budget micro-batches against counted ones.

    python benchmarks/long_context.py [--parts longest budget] [--lengths 1024 2048 4096]
                                      [--tries 3] [--ckpt-tries 0] [--max-len 1024] [--samples 20]
                                      [--steps 2]

A random Qwen2-shaped model of about 90M parameters (``weight_sync.py``'s "100M" shape: hidden
768, 10 layers, vocabulary 32768, tied embeddings) and two real learner ranks (DeepSpeed ZeRO-2
over gloo, one thread each, fp32, as the tiny recipe).

``longest``: GRPO steps on single rows of ``--lengths`` tokens (a 32-token prompt, the rest
completion), for sequence_parallel_size 1 (each rank trains a row of its own) and 2 (both
ranks one row, half of its positions each), gradient checkpointing off and on. Each rank's
resident memory is sampled every 2 ms during the step, after a warm-up step that allocates
gradients and optimizer states, with every allocation over 64 KiB mapped on its own (so what
a rank holds, not glibc's heap high-water mark); the peak over ranks is reported. Against the
row's length it is not one line: the LM head runs ``chunk_tokens`` = 2,048 positions at a time,
so its logits grow with a rank's positions up to 2,048 and stay constant beyond, and the slope
past that is the activation memory per token. The memory limit is what one rank needs for the
longest of ``--lengths`` without sequence parallelism or checkpointing; for each setting, up
to ``--tries`` longer rows are trained (``--ckpt-tries`` with checkpointing, whose rows run to
tens of thousands of tokens: minutes a step on one CPU thread), each length a secant step on
peak(length) = limit from the two newest points, and the longest row whose step stayed within
the limit is reported, beside the secant estimate from ``--lengths`` alone. (Equal losses with
and without sequence parallelism are tests/e2e/test_equivalence.py's.)

``budget``: one GRPO batch whose lengths follow a long tail: 90% short completions
(``max-len``/16 to ``max-len``/8 tokens) and 10% at ``max-len``, shuffled, after a 32-token
prompt. Two plans for the same batch:

- ``counted``: contiguous rank shards, ``--micro-batch-size`` rows per micro-batch in order
  (every micro-batch holding a long row is padded to its length);
- ``token budget``: ``learner.max_tokens_per_micro_batch`` = ``--budget`` (rows of like
  lengths together, shards balanced by tokens).

Each plan: fresh learners from the same weights, learning rate 0 (every step sees the same
weights), one warm-up step, then ``--steps`` timed steps; the step's seconds are the slower
rank's (median over the steps), with the loss and gradient norm, which must agree between the
plans (the same step, cut differently).

Writes benchmarks/results/long_context.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import threading
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


def _learner(model: str, rank: int, ranks: int, port: int, **cfg):
    from r1ray.actors.learner import LearnerConfig, LearnerRank, OptimConfig

    config = LearnerConfig(num_ranks=ranks, zero_stage=2, optim=OptimConfig(lr=0.0, grad_clip=1e9), **cfg)
    learner = LearnerRank(model, config, rank=rank, world_size=ranks, seed=0)
    learner.setup("127.0.0.1", port)  # the process group is joined once: later setups reuse it
    learner.start_phase(lr=0.0)  # every step sees the same weights
    return learner


def _timed_step(learner, samples: list, ranks: int, peak: bool = False) -> tuple[float, float, dict]:
    """One GRPO step of every rank on its share of ``samples``: (seconds of the slower rank,
    peak resident GiB of the fullest rank during the step, the step's metrics)."""
    import torch
    import torch.distributed as dist

    from r1ray.actors.batching import item_tokens, learner_shards, step_micro_batches
    from r1ray.actors.learner import GrpoStats
    from r1ray.actors.loss import global_denominator

    cfg = learner.cfg
    lengths = [s.loss_tokens for s in samples]
    denom = global_denominator("dapo", lengths, max(lengths), step_micro_batches(
        [item_tokens(s) for s in samples], cfg.data_parallel_size, cfg.micro_batch_size, cfg.max_tokens_per_micro_batch))
    shard = learner_shards(samples, ranks, cfg.max_tokens_per_micro_batch, cfg.sequence_parallel_size)[learner.rank]
    sampler = _PeakRss() if peak else None
    dist.barrier()
    t0 = time.perf_counter()
    stats = learner.grpo_step(shard, denom, float(sum(lengths)))
    measured = torch.tensor([time.perf_counter() - t0, sampler.stop() if sampler else 0.0])
    dist.all_reduce(measured, op=dist.ReduceOp.MAX)
    parts = [None] * ranks
    dist.all_gather_object(parts, stats)
    return float(measured[0]), float(measured[1]), GrpoStats.combine(parts)


class _PeakRss:
    """This process's resident memory, sampled every 2 ms until ``stop`` (GiB, the peak)."""

    def __init__(self):
        self.peak, self.done = _rss(), False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.done:
            self.peak = max(self.peak, _rss())
            time.sleep(0.002)

    def stop(self) -> float:
        self.done = True
        self.thread.join()
        return max(self.peak, _rss()) / 2**30


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def rows(n: int, length: int, seed: int = 0):
    """``n`` samples of ``length`` tokens (a 32-token prompt)."""
    from r1ray.actors.rollout import TrainSample

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        ids = [rng.randint(300, SHAPE["vocab_size"] - 1) for _ in range(length)]
        out.append(TrainSample(ids[:PROMPT], ids[PROMPT:], logprobs=[-10.0] * (length - PROMPT), advantage=1.0))
    return out


def _longest_worker(rank: int, ranks: int, port: int, model: str, sp: int, ckpt: bool, lengths: list,
                    limit: float | None, tries: int, out: str):
    """One setting in processes of its own (resident memory is a process's own high-water mark)."""
    os.environ["DS_ACCELERATOR"] = "cpu"
    import torch

    torch.set_num_threads(1)
    learner = _learner(model, rank, ranks, port, micro_batch_size=1, sequence_parallel_size=sp,
                       gradient_checkpointing=ckpt)
    shares = ranks // sp  # rows per step: one per data-parallel share
    _timed_step(learner, rows(shares, 256), ranks)  # gradients and Adam's states exist from here on
    points = []
    for length in lengths:
        seconds, gib, _ = _timed_step(learner, rows(shares, length), ranks, peak=True)
        points.append({"length": length, "step_s": seconds, "peak_gib": gib})
    slope = (points[-1]["peak_gib"] - points[-2]["peak_gib"]) / (points[-1]["length"] - points[-2]["length"])
    limit = limit or points[-1]["peak_gib"]  # the first setting's (no SP, no checkpointing) at the longest length
    estimate = int(lengths[-1] + (limit - points[-1]["peak_gib"]) / slope) if slope > 0 else None
    checks = []
    for _ in range(tries):  # secant steps on peak(length) = limit, from the two newest points; each one trained
        (a, pa), (b, pb) = [(p["length"], p["peak_gib"]) for p in (points + checks)[-2:]]
        if pb == pa:
            break
        length = int(b + (limit - pb) * (b - a) / (pb - pa)) // 64 * 64
        if length <= lengths[-1] or any(c["length"] == length for c in checks):
            break
        seconds, gib, _ = _timed_step(learner, rows(shares, length), ranks, peak=True)
        checks.append({"length": length, "step_s": seconds, "peak_gib": gib})
    fits = [p for p in points + checks if p["peak_gib"] <= limit]
    if rank == 0:
        Path(out).write_text(json.dumps({
            "sequence_parallel_size": sp, "gradient_checkpointing": ckpt, "points": points, "checks": checks,
            "limit_gib": limit, "gib_per_1k_tokens": slope * 1000, "estimated_longest": estimate,
            "longest": max(fits, key=lambda p: p["length"]) if fits else None,
            "s_per_1k_tokens": points[-1]["step_s"] / (shares * lengths[-1]) * 1000}))


def _budget_worker(rank: int, ranks: int, port: int, model: str, mbs: int, budget: int | None, samples: list,
                   steps: int, out: str):
    """One plan in processes of its own (two DeepSpeed engines in one process share state)."""
    os.environ["DS_ACCELERATOR"] = "cpu"
    import torch

    torch.set_num_threads(1)
    learner = _learner(model, rank, ranks, port, micro_batch_size=mbs, max_tokens_per_micro_batch=budget)
    times, metrics = [], None
    for step in range(steps + 1):
        seconds, _, metrics = _timed_step(learner, samples, ranks)
        if step:
            times.append(seconds)
    if rank == 0:
        Path(out).write_text(json.dumps({"step_s": statistics.median(times), "steps_s": times,
                                         "loss": metrics["loss"], "grad_norm": metrics["grad_norm"]}))


def _spawn(worker, *args) -> dict:
    import torch.multiprocessing as mp

    from r1ray.cluster.groups import free_port

    out = Path(tempfile.mkdtemp()) / "result.json"
    mp.start_processes(worker, args=(2, free_port(), *args, str(out)), nprocs=2, start_method="spawn")
    return json.loads(out.read_text())


def longest(model: str, lengths: list[int], tries: int, ckpt_tries: int) -> tuple[dict, list[str]]:
    settings = {"no SP": (1, False), "SP 2": (2, False), "no SP, checkpointing": (1, True),
                "SP 2, checkpointing": (2, True)}
    res: dict = {"settings": {}}
    for name, (sp, ckpt) in settings.items():
        res["settings"][name] = _spawn(_longest_worker, model, sp, ckpt, lengths, res.get("limit_gib"),
                                       ckpt_tries if ckpt else tries)
        res.setdefault("limit_gib", res["settings"][name]["limit_gib"])
    base = res["settings"]["no SP"]["longest"]["length"]
    lines = [f"## The longest row one step takes ({res['limit_gib']:.2f} GiB per rank: what a {lengths[-1]}-token "
             "row needs without SP or checkpointing)", "",
             f"| setting | peak GiB at {' / '.join(map(str, lengths))} tokens | GiB per 1k tokens | lengths tried: "
             "peak GiB | longest row trained within the limit | x no SP | secant estimate from the first three | "
             "s per 1k tokens |", "|---|---|---|---|---|---|---|---|"]
    for name, r in res["settings"].items():
        peaks = " / ".join(f"{p['peak_gib']:.2f}" for p in r["points"])
        tried = ", ".join(f"{c['length']}: {c['peak_gib']:.2f}" for c in r["checks"]) or "-"
        best = r["longest"]["length"] if r["longest"] else 0
        lines.append(f"| {name} | {peaks} | {r['gib_per_1k_tokens']:.3f} | {tried} | {best} | {best / base:.2f} | "
                     f"{r['estimated_longest'] or '-'} | {r['s_per_1k_tokens']:.1f} |")
    return res, lines


def budget(model: str, args) -> tuple[dict, list[str]]:
    from r1ray.actors.batching import item_tokens, micro_batch_plan, shard_indices

    samples = long_tail(args.samples, args.max_len)
    tokens = args.budget or 2 * (PROMPT + args.max_len)
    plans = {"counted": (args.micro_batch_size, None), "token budget": (64, tokens)}
    lengths = [item_tokens(s) for s in samples]
    results = {name: _spawn(_budget_worker, model, mbs, b, samples, args.steps) for name, (mbs, b) in plans.items()}
    for name, (mbs, b) in plans.items():  # per rank: the padded tokens of its micro-batches
        results[name]["padded_tokens"] = [
            sum(len(mb) * max(part_len[i] for i in mb) for mb in micro_batch_plan(part_len, mbs, b))
            for part in shard_indices(lengths, 2, b) for part_len in [[lengths[i] for i in part]]]
    counted, budgeted = results["counted"], results["token budget"]
    summary = {"samples": args.samples, "max_len": args.max_len, "tokens": sum(lengths),
               "micro_batch_size": args.micro_batch_size, "budget": tokens, "plans": results,
               "speedup": counted["step_s"] / budgeted["step_s"], "loss_gap": abs(counted["loss"] - budgeted["loss"]),
               "grad_norm_rel_gap": abs(counted["grad_norm"] - budgeted["grad_norm"]) / counted["grad_norm"]}
    lines = [f"## Token-budget micro-batches on a long-tailed batch ({args.samples} samples, {sum(lengths)} tokens, "
             f"10% at {PROMPT}+{args.max_len})", "",
             "| plan | step s | padded tokens per rank | loss | grad norm |", "|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['step_s']:.1f} | {' / '.join(map(str, r['padded_tokens']))} | {r['loss']:.6f} "
                     f"| {r['grad_norm']:.6f} |")
    lines += ["", f"Token budget {tokens}: {summary['speedup']:.2f}x faster than {args.micro_batch_size} rows per "
              f"micro-batch; loss gap {summary['loss_gap']:.1e}, gradient-norm gap {summary['grad_norm_rel_gap']:.1e} "
              "(relative)."]
    return summary, lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", nargs="+", default=["longest", "budget"], choices=["longest", "budget"])
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096], help="rows of the longest part")
    ap.add_argument("--tries", type=int, default=3, help="longest: lengths tried beyond --lengths per setting")
    ap.add_argument("--ckpt-tries", type=int, default=0, help="longest: the same, with gradient checkpointing")
    ap.add_argument("--max-len", type=int, default=1024, help="budget: completion tokens of the long 10%%")
    ap.add_argument("--samples", type=int, default=20)
    ap.add_argument("--micro-batch-size", type=int, default=4, help="budget: rows per micro-batch when counted")
    ap.add_argument("--budget", type=int, default=0, help="tokens per micro-batch (default: 2 x (prompt + max-len))")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--name", default="long_context")
    args = ap.parse_args()

    # Every allocation over 64 KiB its own mapping, returned to the system when freed: a rank's resident
    # memory is then what it holds, not glibc's heap high-water mark (its default threshold grows to 32 MiB,
    # and freed tensors below it stay resident). Read by the spawned ranks at their start.
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(64 * 1024))
    model = build_model(Path(tempfile.gettempdir()) / "r1ray-long-context")
    summary: dict = {"model": SHAPE, "machine": f"{os.cpu_count()} CPUs, 2 ranks x 1 thread, ZeRO-2, fp32"}
    lines = [f"# Long traces on the learner ({summary['machine']}, a 90M Qwen2-shaped model)", ""]
    rdir = HERE / "results"
    rdir.mkdir(exist_ok=True)
    for part in args.parts:
        result, text = longest(model, args.lengths, args.tries, args.ckpt_tries) if part == "longest" else budget(model, args)
        summary[part] = result
        lines += [*text, ""]
        print("\n".join(text), flush=True)
        (rdir / f"{args.name}.json").write_text(json.dumps(summary, indent=2))  # after each part: a crash keeps it
        (rdir / f"{args.name}.md").write_text("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
