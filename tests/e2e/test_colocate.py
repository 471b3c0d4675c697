"""placement.mode colocate through the CLI: the tiny recipe learns with its generator inside
learner rank 0 (one copy of the weights, no weight sync), from the full-weight warm-up; and
with a vLLM generator in learner rank 0's bundle that sleeps while the rank trains."""
import json

import pytest
import r1ray_cli
from r1ray_cli import QUIET

# grpo.steps: both keep the recipe's 100 (see their tests)
STEPS = {"hf": 100, "vllm": 100}


def _colocated(out, tiny_world, warmed, backend: str = "hf") -> tuple[dict, list[dict]]:
    """A colocated synchronous run from the warm-up's checkpoint, every step on-policy; its
    summary and step records."""
    proc = r1ray_cli.run("train", "configs/tiny-cpu.yaml", "--output-dir", out, "--set", f"model.tiny_dir={tiny_world}",
                         "--set", f"model.path={warmed / 'checkpoint-sft'}", "--set", "sft.steps=0",
                         "--set", "eval.num_prompts=100", "--set", "placement.mode=colocate",
                         "--set", "grpo.max_staleness=0", "--set", f"generator.backend={backend}",
                         "--set", f"grpo.steps={STEPS[backend]}", *QUIET, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == STEPS[backend] and all(r["staleness/mean"] == 0 for r in records)
    return summary, records


@pytest.mark.timeout(1500)
def test_the_tiny_recipe_learns_colocated(tmp_path, tiny_world, warmed):
    # +0.1: the greedy pass@1 of 100 held-out problems swings by about 0.1 from one
    # checkpoint to the next (0.88 at step 50, 0.71 at step 70, 0.82 at 100, from 0.61), so a
    # +0.2 bar at a fixed step tested that swing more than the learning (0.82 cleared it by one problem)
    summary, records = _colocated(tmp_path / "colocate", tiny_world, warmed)
    assert summary["eval_after"] >= summary["eval_before"] + 0.1, (summary["eval_before"], summary["eval_after"])
    # on-policy with one copy of the weights: the behaviour log-probs are the learner's own
    assert max(r["logprob_mismatch/mean_abs"] for r in records) < 1e-4
    assert max(r["time/weight_sync_s"] for r in records) < 1.0  # a version label, nothing moved


@pytest.mark.timeout(1500)
def test_the_tiny_recipe_learns_colocated_with_vllm(tmp_path, tiny_world, warmed):
    pytest.importorskip("vllm")
    out = tmp_path / "colocate-vllm"
    _, records = _colocated(out, tiny_world, warmed, backend="vllm")
    # Learning, as the reward GRPO climbs: the sampled accuracy of the last 20 steps against the
    # first 20 (2,560 samples each): 0.18 -> 0.45 in a run that ended at held-out 0.87, about
    # 0.16 -> 0.31-0.41 in one that ended at 0.64. Not held-out pass@1 as for hf: vLLM batches what
    # arrives when it arrives, so its samples, and the whole trajectory, differ from run to run;
    # one run in about eight ended at 0.64 from 0.61 (its KL to the reference wandered to 0.29,
    # against about 0.05) where others reached 0.87 (and 0.91 at 50 steps). The hf run is seeded
    # per call and proves the held-out gain of the same training.
    accuracy = [r["reward/accuracy/mean"] for r in records]
    assert sum(accuracy[-20:]) / 20 >= sum(accuracy[:20]) / 20 + 0.1, accuracy
    assert max(r["logprob_mismatch/mean_abs"] for r in records) < 1e-3  # vLLM's kernels against the learner's
    events = json.loads((out / "timeline.json").read_text())["traceEvents"]
    assert sum(e["name"] == "sleep" for e in events) == STEPS["vllm"]  # the generator slept before each step
