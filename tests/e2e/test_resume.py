"""Exact resume through the CLI: a run whose driver was killed resumes to the same samples as a
run that was not, and resume errors are named before Ray starts."""
import json
import re
import signal
import subprocess
import time

import pytest
import r1ray_cli

from r1ray.controllers.common.checkpoint import Checkpoints


def _cli(*args):
    return r1ray_cli.run("train", *args, timeout=120)


def test_resume_errors_name_the_problem_before_ray_starts(tmp_path):
    proc = _cli("--resume", str(tmp_path / "nope"))
    assert proc.returncode == 2 and "no config.yaml there" in proc.stderr and "nope" in proc.stderr
    proc = _cli()
    assert proc.returncode == 2 and "--resume RUN_DIR" in proc.stderr
    (tmp_path / "config.yaml").write_text("seed: 0\n")
    proc = _cli("--resume", str(tmp_path), "--output-dir", str(tmp_path / "x"))
    assert proc.returncode == 2 and "--output-dir" in proc.stderr
    proc = _cli("--resume", "auto")
    assert proc.returncode == 2 and "--resume auto needs the recipe" in proc.stderr
    proc = _cli("configs/tiny-cpu.yaml", "--resume", str(tmp_path))
    assert proc.returncode == 2 and "config key 'model.path'" in proc.stderr and "a resumed run must see the same data" in proc.stderr


SHORT = ["--set", "ray.dashboard=false", "--set", "sft.steps=0", "--set", "sft.stop_at_pass_rate=null",
         "--set", "eval.num_prompts=0", "--set", "grpo.prompts_per_step=4", "--set", "grpo.num_generations=4",
         "--set", "sampling.max_new_tokens=16", "--set", "learner.micro_batch_size=4",
         "--set", "checkpoint.every_steps=2"]


def _cmd(out, tiny_world, steps, *extra):
    return r1ray_cli.cmd("train", "configs/tiny-cpu.yaml", "--output-dir", out, "--set", f"model.tiny_dir={tiny_world}",
                         "--set", f"grpo.steps={steps}", *SHORT, *extra)


def _run(cmd):
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=r1ray_cli.env())
    assert proc.returncode == 0, proc.stderr[-4000:]


def _by_step(out):
    steps: dict = {}
    for line in (out / "samples.jsonl").read_text().splitlines():
        r = json.loads(line)
        steps.setdefault(r["step"], []).append((r["sample_id"], r["trained_at"]))
    return steps


@pytest.mark.timeout(900)
def test_a_killed_driver_resumes_to_the_samples_of_an_uninterrupted_run(tmp_path, tiny_world):
    whole = tmp_path / "whole"
    _run(_cmd(whole, tiny_world, 10))

    cut = tmp_path / "cut"
    proc = subprocess.Popen(_cmd(cut, tiny_world, 8), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=r1ray_cli.env())
    t0 = time.monotonic()
    while not ((cut / "metrics.jsonl").exists() and len((cut / "metrics.jsonl").read_text().splitlines()) >= 5):
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() - t0 < 300, "the run never reached step 5"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # the driver dies between checkpoints: no clean-up at all
    proc.wait()
    written = len((cut / "metrics.jsonl").read_text().splitlines())
    assert 5 <= written < 8

    _run(_cmd(cut, tiny_world, 8, "--resume", "auto"))  # the same command again, as a retried job runs it
    summary = json.loads((cut / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["resumed_from_step"] in (4, 6)
    assert summary["resumed_from_step"] < written  # records past the checkpoint were redone, not kept twice
    # and once more, past the end: the recipe's steps raised on resume
    _run(r1ray_cli.cmd("train", "--resume", str(cut), "--set", "grpo.steps=10"))

    got, want = _by_step(cut), _by_step(whole)
    assert list(got) == list(range(1, 11))
    assert got == want  # the same samples, step by step, trained at the same policy versions
    records = [json.loads(line) for line in (cut / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 11))
    summary = json.loads((cut / "summary.json").read_text())
    assert summary["resumed_from_step"] == 8 and summary["grpo_steps_done"] == 10
    assert summary["grpo"]["samples"] == 10 * 16 and summary["grpo"]["steps"] == 10
    assert [p.name for p in Checkpoints(cut, 2, 2).steps()] == ["step-000008", "step-000010"]
    # each attempt's timeline kept, the killed one's up to its last drain
    assert sorted(p.name for p in cut.glob("*timeline*")) == ["timeline.1.json", "timeline.2.json", "timeline.json"]
    killed = json.loads((cut / "timeline.1.json").read_text())["traceEvents"]
    assert sum(e["name"] == "train" for e in killed) >= 4
    proc = _cli("--resume", str(cut))  # nothing left to train: said before anything starts
    assert proc.returncode == 2 and "grpo.steps" in proc.stderr and "already trained 10 steps" in proc.stderr

    # The newest checkpoint cut short (a full disk, a node lost mid-copy): the resume takes the
    # one before it, says why, and loses no step beyond it.
    shard = cut / "checkpoints" / "step-000010" / "mp_rank_00_model_states.pt"
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.truncate(size // 2)
    proc = r1ray_cli.run("train", "--resume", cut, "--set", "grpo.steps=12")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"step-000010 is damaged: mp_rank_00_model_states.pt has {size // 2} bytes, expected {size}" in proc.stderr
    summary = json.loads((cut / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["resumed_from_step"] == 8
    records = [json.loads(line) for line in (cut / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 13))
    progress = re.findall(r"GRPO \(max_staleness=\d+\): (\d+)/12 steps", proc.stderr)  # counted from step 8 on
    assert progress == ["9", "10", "11", "12"], proc.stderr[-3000:]
    assert {k: v for k, v in _by_step(cut).items() if k <= 10} == want  # steps 9 and 10 redone as before
    # Every checkpoint damaged: refused before anything starts, naming each; the outcome stays.
    for step in ("step-000010", "step-000012"):
        with open(cut / "checkpoints" / step / "rng_rank1.pt", "ab") as f:
            f.write(b"garbage")
    proc = _cli("--resume", str(cut), "--set", "grpo.steps=14")
    assert proc.returncode == 2 and "no intact checkpoint" in proc.stderr, proc.stderr[-3000:]
    assert "step-000012: rng_rank1.pt has" in proc.stderr and "step-000010: rng_rank1.pt has" in proc.stderr
    assert json.loads((cut / "summary.json").read_text())["status"] == "completed"
