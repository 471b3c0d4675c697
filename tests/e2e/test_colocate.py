"""placement.mode colocate through the CLI: the tiny recipe learns with its generator inside
learner rank 0 (one copy of the weights, no weight sync), from the full-weight warm-up."""
import json

import pytest
import r1ray_cli
from r1ray_cli import QUIET


@pytest.mark.timeout(1500)
def test_the_tiny_recipe_learns_colocated(tmp_path, tiny_world, warmed):
    out = tmp_path / "colocate"
    proc = r1ray_cli.run("train", "configs/tiny-cpu.yaml", "--output-dir", out, "--set", f"model.tiny_dir={tiny_world}",
                         "--set", f"model.path={warmed / 'checkpoint-sft'}", "--set", "sft.steps=0",
                         "--set", "eval.num_prompts=100", "--set", "placement.mode=colocate",
                         "--set", "grpo.max_staleness=0", *QUIET, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["eval_after"] >= summary["eval_before"] + 0.2, (summary["eval_before"], summary["eval_after"])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 100 and all(r["staleness/mean"] == 0 for r in records)
    # on-policy with one copy of the weights: the behaviour log-probs are the learner's own
    assert max(r["logprob_mismatch/mean_abs"] for r in records) < 1e-4
    assert max(r["time/weight_sync_s"] for r in records) < 1.0  # a version label, nothing moved
