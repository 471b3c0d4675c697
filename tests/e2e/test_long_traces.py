"""Long-trace settings through the CLI on the tiny recipe: Ulysses sequence parallelism (the
two learner ranks one group, each holding half of every row) with token-budget micro-batches,
for an SFT warm-up and GRPO. The numbers themselves are ``test_equivalence.py``'s ``sp2`` and
``tokens`` cases; here the driver's sharding, the actors and the metrics around them."""
import json

import pytest
import r1ray_cli
from r1ray_cli import QUIET


@pytest.mark.timeout(900)
def test_sft_and_grpo_run_sequence_parallel_with_token_budgets(tmp_path, tiny_world, warmed):
    out = tmp_path / "run"
    proc = r1ray_cli.run(
        "train", "configs/tiny-cpu.yaml", "--output-dir", out, "--set", f"model.tiny_dir={tiny_world}",
        "--set", f"model.path={warmed / 'checkpoint-sft'}", *QUIET, "--set", "learner.sequence_parallel_size=2",
        "--set", "learner.max_tokens_per_micro_batch=1024", "--set", "sft.steps=6", "--set", "sft.lr=1.0e-4",
        "--set", "grpo.steps=8", "--set", "grpo.max_staleness=0", "--set", "eval.num_prompts=0",
        "--set", "checkpoint.every_steps=0", timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    sft = [json.loads(line) for line in (out / "sft_metrics.jsonl").read_text().splitlines()]
    assert len(sft) == 6 and all(0 < r["loss"] < 2 for r in sft)  # the warmed-up model's loss, not doubled or halved
    grpo = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(grpo) == 8
    # On-policy fp32 steps: the sequence-parallel learner's log-probs of the sampled tokens are
    # the generator's (one rank attends to the other's half of every row through the all-to-all).
    assert max(r["logprob_mismatch/mean_abs"] for r in grpo) < 1e-4
    assert all(r["grad_norm"] > 0 for r in grpo)
    assert json.loads((out / "summary.json").read_text())["status"] == "completed"
