"""Cost per generated token of multi-turn episodes against single turns, on the hf generator.

    r1ray train configs/tiny-tools.yaml --output-dir runs/tiny-tools    # a model that calls tools
    python benchmarks/episode_cost.py --model runs/tiny-tools/checkpoint-final [--prompts 256] [--repeats 3]

The same model and held-out prompts (the tiny tools world's test split), sampled at the recipe's
temperature, once as episodes (``rollout.tools: [calculator]``: the model's call, a tool turn,
its answer) and once as single turns (no tools: the model stops where it would have waited for
the tool). Reported: model tokens per second of generation, tool time apart (the episodes'
``tool_time_s`` is subtracted), and the ratio of seconds per model token, median of the
repeats. Writes benchmarks/results/episode_cost.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from r1ray.actors.episodes import RolloutConfig
from r1ray.actors.generator import Generator, GeneratorConfig, SamplingConfig


def _prompts(model: str, n: int, world: Path) -> list[dict]:
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    test = load_from_disk(str(world / "data"))["test"]
    return [{"prompt_id": f"test-{i}", "prompt_ids": tok.apply_chat_template(
        [{"role": "user", "content": test[i]["problem"]}], add_generation_prompt=True, tokenize=True,
        return_dict=False), "columns": {}} for i in range(min(n, len(test)))]


def _measure(gen, prompts: list[dict], sampling) -> dict:
    t0 = time.perf_counter()
    out = gen.generate(prompts, 1, sampling)
    seconds = time.perf_counter() - t0 - sum(r.tool_time_s for r in out)
    tokens = sum(sum(r.loss_mask) if r.loss_mask else len(r.completion_ids) for r in out)
    return {"seconds": seconds, "model_tokens": tokens, "tokens_per_s": tokens / seconds,
            "turns_mean": statistics.fmean(r.turns for r in out),
            "tool_time_s": sum(r.tool_time_s for r in out)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="a tiny-tools checkpoint (HF folder)")
    ap.add_argument("--world", default="~/.cache/r1ray/tiny-tools", help="the tiny tools world (its test split)")
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    prompts = _prompts(args.model, args.prompts, Path(args.world).expanduser())
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=150)
    tools = RolloutConfig(tools=["calculator"], max_turns=3, max_total_tokens=150)
    result = {}
    for name, rollout in [("single_turn", None), ("episodes", tools)]:
        gen = Generator(args.model, GeneratorConfig(backend="hf"), seed=0, rollout=rollout)
        try:
            _measure(gen, prompts[:16], sampling)  # warm-up
            runs = [_measure(gen, prompts, sampling) for _ in range(args.repeats)]
        finally:
            gen.close()
        best = sorted(runs, key=lambda r: r["seconds"] / r["model_tokens"])[len(runs) // 2]
        result[name] = best
        print(f"{name}: {best['model_tokens']} model tokens in {best['seconds']:.2f} s "
              f"({best['tokens_per_s']:.0f}/s), {best['turns_mean']:.2f} turns, tools {best['tool_time_s']:.2f} s")
    per_token = {k: v["seconds"] / v["model_tokens"] for k, v in result.items()}
    result["cost_ratio"] = per_token["episodes"] / per_token["single_turn"]
    print(f"seconds per model token, episodes / single turn: {result['cost_ratio']:.2f}")
    out = Path(__file__).parent / "results" / "episode_cost.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), **result}, indent=1))


if __name__ == "__main__":
    main()
