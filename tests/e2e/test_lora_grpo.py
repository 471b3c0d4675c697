"""LoRA GRPO through the CLI on the tiny recipe: it learns from a warmed-up model with adapters
only (the reference is the learner with them off), and a run with an SFT warm-up of its own
resumes onto the samples of an uninterrupted one."""
import json

import pytest
import r1ray_cli
from r1ray_cli import QUIET

LORA = ["--set", "learner.lora={r: 16, alpha: 32}", "--set", "learner.optim.lr=2.0e-3"]


def _ok(proc):
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.mark.timeout(1500)
def test_lora_grpo_learns_the_tiny_task_from_a_warmed_up_model(tmp_path, tiny_world, warmed):
    sft = warmed
    out = tmp_path / "grpo"
    proc = _ok(r1ray_cli.run("train", "configs/tiny-cpu.yaml", "--output-dir", out, "--set",
                             f"model.tiny_dir={tiny_world}", "--set", f"model.path={sft / 'checkpoint-sft'}",
                             "--set", "sft.steps=0", "--set", "eval.num_prompts=100", *QUIET, *LORA,
                             "--set", "grpo.steps=50", timeout=900))  # pass@1 0.61 -> 0.98 in 50 steps (100 before)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["eval_after"] >= summary["eval_before"] + 0.2, (summary["eval_before"], summary["eval_after"])
    assert "1 reference" not in proc.stderr  # the learner with its adapters off is the reference
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # its passes are timed; a step's window may hold none when the one before ran two batches'
    # (step 16 of 50 in one run: the learner referenced both batches, then trained twice)
    assert sum(r["time/reference_s"] > 0 for r in records) >= len(records) / 2 and max(r["kl"] for r in records) > 0
    events = json.loads((out / "timeline.json").read_text())["traceEvents"]
    rows = {e["tid"]: e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "thread_name"}
    assert {rows[e["tid"]] for e in events if e["ph"] == "X" and e["name"] == "ref_logprobs"} == \
        {"learner-rank-0", "learner-rank-1"}
    adapter = json.loads((out / "checkpoint-final" / "adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(sft / "checkpoint-sft") and adapter["r"] == 16


def _samples(out):
    return [(r["step"], r["sample_id"], r["trained_at"])
            for r in map(json.loads, (out / "samples.jsonl").read_text().splitlines())]


@pytest.mark.timeout(1200)
def test_a_lora_run_with_its_own_warm_up_resumes_onto_an_uninterrupted_run(tmp_path, tiny_world, warmed):
    """The warm-up trains adapters; they are folded into the base (checkpoint-sft) and GRPO's
    start from zero on it. The resumed run starts from checkpoint-sft and its GRPO checkpoint."""
    def cmd(out, steps):
        return ("train", "configs/tiny-cpu.yaml", "--output-dir", out, "--set", f"model.tiny_dir={tiny_world}",
                "--set", f"model.path={warmed / 'checkpoint-sft'}",
                *QUIET, *LORA, "--set", "learner.lora.dropout=0.0", "--set", "sft.steps=10", "--set", "eval.num_prompts=0",
                "--set", "grpo.prompts_per_step=4", "--set", "grpo.num_generations=4",
                "--set", "learner.micro_batch_size=4",
                "--set", "checkpoint.every_steps=2", "--set", f"grpo.steps={steps}", "--set", "grpo.max_staleness=0")

    whole, cut = tmp_path / "whole", tmp_path / "cut"
    _ok(r1ray_cli.run(*cmd(whole, 6)))
    _ok(r1ray_cli.run(*cmd(cut, 4)))
    _ok(r1ray_cli.run("train", "--resume", cut, "--set", "grpo.steps=6"))
    summary = json.loads((cut / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["resumed_from_step"] == 4
    assert _samples(cut) == _samples(whole)  # the same prompts, trained at the same versions
    # On-policy (max_staleness 0, no dropout) the learner's log-probs of what the generator sampled
    # are the behaviour log-probs: after the resume too, so the restarted generator (checkpoint-sft
    # + the synced adapters) holds the restored learner's policy, and it moved since the warm-up.
    records = [json.loads(line) for line in (cut / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert all(r["logprob_mismatch/mean_abs"] < 1e-4 for r in records), [r["logprob_mismatch/mean_abs"] for r in records]
    # the warm-up's adapters were folded into the base: the adapters-off reference is the policy GRPO starts at
    assert records[0]["kl"] < 1e-6 < max(r["kl"] for r in records)
    from safetensors.torch import load_file

    adapter = load_file(cut / "checkpoint-final" / "adapter" / "adapter_model.safetensors")
    assert any(bool(v.any()) for k, v in adapter.items() if "lora_B" in k)
    config = json.loads((cut / "checkpoint-final" / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(cut / "checkpoint-sft")
