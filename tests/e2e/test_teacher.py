"""A teacher inside the GRPO loop, through the CLI: teacher actors score every sampled token
beside the reference, counted in the timeline and the utilisation; with the initial policy as
the teacher, the first step's reverse KL is the sampling noise alone (any token or sample
out of line would show), and on-policy distillation trains on it."""
import json

import pytest
import r1ray_cli


def _jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.timeout(600)
def test_on_policy_distillation_from_the_initial_policy_streams_beside_the_reference(tmp_path, tiny_world):
    out = tmp_path / "run"
    proc = r1ray_cli.run(
        "train", "configs/tiny-cpu.yaml", "--output-dir", out, "--set", f"model.tiny_dir={tiny_world}",
        *r1ray_cli.QUIET, "--set", "sft.steps=0", "--set", "grpo.steps=3", "--set", "grpo.prompts_per_step=4",
        "--set", "grpo.num_generations=4", "--set", "sampling.max_new_tokens=16", "--set", "eval.num_prompts=4",
        "--set", "grpo.max_staleness=0", "--set", f"teacher.model={tiny_world / 'model'}",
        "--set", "teacher.num_actors=2", "--set", "teacher.cpus=0.25", "--set", "ray.num_cpus=3",
        "--set", "grpo.advantage_estimator=on_policy_distill",
        "--set", "learner.loss.kl_coef=0.01", timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = _jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3]
    # Step 1 samples the initial weights, which are the teacher's: only the numerical noise
    # between the generator's and the teacher's forward passes (as logprob_mismatch measures it)
    first = records[0]
    assert abs(first["teacher/reverse_kl"]) <= 2 * first["logprob_mismatch/mean_abs"] + 1e-6
    assert all(r["time/teacher_s"] > 0 and r["util/teacher/busy_s"] > 0 and r["time/reference_s"] > 0
               for r in records)
    assert all("queue/teacher_groups" in r for r in records)
    assert all(r["samples"] == 16 for r in records)
    events = json.loads((out / "timeline.json").read_text())["traceEvents"]
    spans = [e for e in events if e["ph"] == "X" and e["name"] == "teacher_logprobs"]
    threads = {e["tid"]: e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "thread_name"}
    assert {threads[e["tid"]] for e in spans} == {"teacher-0", "teacher-1"}  # both teachers took work
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and "teacher" in summary["grpo"]["utilisation"]
