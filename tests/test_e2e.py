"""The main job through Ray, as a user runs it: the CLI, real actors, DeepSpeed with 2 ranks.

Small step counts: these check the plumbing and the artifacts; learning itself is shown by
the full tiny recipe (README) and by benchmarks/.
"""
import json
import subprocess
import sys

import pytest
import yaml

REQUIRED = {"step", "reward/mean", "reward/accuracy/mean", "reward/format/mean", "loss", "kl", "completion_len/mean",
            "time/step_s", "time/generate_s", "time/train_s", "time/weight_sync_s", "policy_version"}


def _train(tmp_path, tiny_world, backend: str, extra=()):
    out = tmp_path / f"run-{backend}"
    cmd = [sys.executable, "-m", "r1ray.controllers.cli", "train", "configs/tiny-cpu.yaml", "--output-dir", str(out),
           "--set", f"model.tiny_dir={tiny_world}", "--set", "ray.dashboard=false",
           "--set", "sft.steps=3", "--set", "grpo.steps=3", "--set", "grpo.prompts_per_step=4",
           "--set", "grpo.num_generations=4", "--set", "sampling.max_new_tokens=16", "--set", "eval.num_prompts=8",
           "--set", f"generator.backend={backend}", "--set", "learner.micro_batch_size=4", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return out, proc


def _check_run(out, steps=3, samples_per_step=16):
    assert yaml.safe_load((out / "config.yaml").read_text())["grpo"]["steps"] == steps
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    for r in records:
        assert REQUIRED <= set(r), REQUIRED - set(r)
        assert r["samples"] == samples_per_step
        assert r["kl"] >= 0 and r["time/weight_sync_s"] > 0
    # one policy version per learner step, starting after the SFT sync (version 1)
    assert [r["policy_version"] for r in records] == [2 + i for i in range(steps)]
    summary = json.loads((out / "summary.json").read_text())
    for key in ("eval_before", "eval_after", "wall_s", "checkpoint"):
        assert key in summary
    assert 0.0 <= summary["eval_after"] <= 1.0
    consumed = json.loads((out / "consumed_sample_ids.json").read_text())
    assert len(consumed) == len(set(consumed)) == steps * samples_per_step  # nothing lost or duplicated
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ckpt = out / "checkpoint-final"
    AutoModelForCausalLM.from_pretrained(ckpt)
    AutoTokenizer.from_pretrained(ckpt)
    assert any((out / "tensorboard").iterdir())


@pytest.mark.timeout(900)
def test_tiny_recipe_end_to_end_hf_backend(tmp_path, tiny_world):
    out, proc = _train(tmp_path, tiny_world, "hf")
    _check_run(out)
    assert "eval_after" in proc.stdout


@pytest.mark.timeout(900)
def test_tiny_recipe_end_to_end_vllm_backend_zero3(tmp_path, tiny_world):
    pytest.importorskip("vllm")
    out, _ = _train(tmp_path, tiny_world, "vllm", ["--set", "learner.zero_stage=3", "--set", "generator.max_model_len=96"])
    _check_run(out)


def test_existing_run_directory_is_never_overwritten(tmp_path):
    from r1ray.controllers.config import load_recipe
    from r1ray.controllers.train import run_dir_for

    first = tmp_path / "run"
    first.mkdir()
    (first / "metrics.jsonl").write_text("precious\n")
    second = run_dir_for(load_recipe("configs/tiny-cpu.yaml", output_dir=str(first)))
    assert second != first and second.name == "run-1"
    assert (first / "metrics.jsonl").read_text() == "precious\n"
