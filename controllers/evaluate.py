"""Held-out pass@1: one completion per test prompt (greedy by default), judged by one reward function."""
from __future__ import annotations

import time

from .system import System


def pass_at_1(system: System, prompts: list[dict], sampling, reward: str = "accuracy", greedy: bool = True) -> dict:
    """Fraction of prompts whose completion (greedy, or one sample with ``sampling``) scores 1
    (a None score counts as a miss)."""
    t0 = time.perf_counter()
    rollouts = system.generators.map("generate", prompts, 1, sampling, greedy)
    scores = system.scorers.map("score_one", rollouts, reward)
    passed = sum(1 for s in scores if s is not None and s >= 1.0)
    return {"pass@1": passed / max(1, len(prompts)), "n": len(prompts), "passed": passed,
            "completion_len/mean": sum(len(r.completion_ids) for r in rollouts) / max(1, len(rollouts)),
            "time_s": time.perf_counter() - t0,
            "examples": [{"prompt_id": r.prompt_id, "text": r.text, "score": s} for r, s in list(zip(rollouts, scores))[:5]]}
