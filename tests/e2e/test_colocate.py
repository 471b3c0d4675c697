"""placement.mode colocate through the CLI: the tiny recipe learns with its generator inside
learner rank 0 (one copy of the weights, no weight sync), from the full-weight warm-up; and
with a vLLM generator in learner rank 0's bundle that sleeps while the rank trains."""
import json

import pytest
import r1ray_cli
from r1ray_cli import QUIET

# grpo.steps: both keep the recipe's 100 (hf: see its test); vLLM's 50-step run raised pass@1
# 0.61 -> 0.91 here but only to 0.67 in one CI run (it needs +0.1)
STEPS = {"hf": 100, "vllm": 100}


def _colocated(out, tiny_world, warmed, gain: float, backend: str = "hf") -> list[dict]:
    """A colocated synchronous run from the warm-up's checkpoint that raised held-out pass@1 by
    ``gain`` at least, every step on-policy; its step records."""
    proc = r1ray_cli.run("train", "configs/tiny-cpu.yaml", "--output-dir", out, "--set", f"model.tiny_dir={tiny_world}",
                         "--set", f"model.path={warmed / 'checkpoint-sft'}", "--set", "sft.steps=0",
                         "--set", "eval.num_prompts=100", "--set", "placement.mode=colocate",
                         "--set", "grpo.max_staleness=0", "--set", f"generator.backend={backend}",
                         "--set", f"grpo.steps={STEPS[backend]}", *QUIET, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["eval_after"] >= summary["eval_before"] + gain, (summary["eval_before"], summary["eval_after"])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == STEPS[backend] and all(r["staleness/mean"] == 0 for r in records)
    return records


@pytest.mark.timeout(1500)
def test_the_tiny_recipe_learns_colocated(tmp_path, tiny_world, warmed):
    # +0.1 as for vLLM: the greedy pass@1 of 100 held-out problems swings by about 0.1 from one
    # checkpoint to the next (0.88 at step 50, 0.71 at step 70, 0.82 at 100, from 0.61), so a
    # +0.2 bar at a fixed step tested that swing more than the learning (0.82 cleared it by one problem)
    records = _colocated(tmp_path / "colocate", tiny_world, warmed, gain=0.1)
    # on-policy with one copy of the weights: the behaviour log-probs are the learner's own
    assert max(r["logprob_mismatch/mean_abs"] for r in records) < 1e-4
    assert max(r["time/weight_sync_s"] for r in records) < 1.0  # a version label, nothing moved


@pytest.mark.timeout(1500)
def test_the_tiny_recipe_learns_colocated_with_vllm(tmp_path, tiny_world, warmed):
    pytest.importorskip("vllm")
    out = tmp_path / "colocate-vllm"
    records = _colocated(out, tiny_world, warmed, gain=0.1, backend="vllm")
    assert max(r["logprob_mismatch/mean_abs"] for r in records) < 1e-3  # vLLM's kernels against the learner's
    events = json.loads((out / "timeline.json").read_text())["traceEvents"]
    assert sum(e["name"] == "sleep" for e in events) == STEPS["vllm"]  # the generator slept before each step
