"""The main job through Ray, as a user runs it: the CLI, real actors, DeepSpeed with 2 ranks.

Small step counts: these check the plumbing and the artifacts; learning itself is shown by
the full tiny recipe (README) and by benchmarks/.
"""
import json
import re
from pathlib import Path

import pytest
import r1ray_cli
import yaml

REQUIRED = {"step", "reward/mean", "reward/accuracy/mean", "reward/format/mean", "loss", "kl", "completion_len/mean",
            "time/step_s", "time/generate_s", "time/train_s", "time/weight_sync_s", "policy_version"}


def _train(tmp_path, tiny_world, backend: str, extra=(), name=None):
    out = tmp_path / (name or f"run-{backend}")
    proc = r1ray_cli.run("train", "configs/tiny-cpu.yaml", "--output-dir", out,
                         "--set", f"model.tiny_dir={tiny_world}", "--set", "ray.dashboard=false",
                         "--set", "sft.steps=3", "--set", "grpo.steps=3", "--set", "grpo.prompts_per_step=4",
                         "--set", "grpo.num_generations=4", "--set", "sampling.max_new_tokens=16",
                         "--set", "eval.num_prompts=8", "--set", f"generator.backend={backend}",
                         "--set", "learner.micro_batch_size=4", *extra, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return out, proc


def _samples(out):
    return [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]


def _check_run(out, steps=3, samples_per_step=16, vllm=False):
    assert yaml.safe_load((out / "config.yaml").read_text())["grpo"]["steps"] == steps
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    for r in records:
        assert REQUIRED <= set(r), REQUIRED - set(r)
        assert r["samples"] == samples_per_step
        assert r["kl"] >= 0 and r["time/weight_sync_s"] > 0
    # one policy version per learner step, after the SFT sync (version 1, or later when SFT probes synced too)
    first = records[0]["policy_version"]
    assert first >= 2 and [r["policy_version"] for r in records] == [first + i for i in range(steps)]
    timeline = json.loads((out / "timeline.json").read_text())
    boxes = [e for e in timeline["traceEvents"] if e["ph"] == "X"]
    weights = {"weight_update", "send_weights"} if vllm else {"load_weights", "export_weights"}
    assert {"generate", "score", "train"} | weights <= {e["name"] for e in boxes}
    assert all(isinstance(e["ts"], float) and e["dur"] >= 0 and isinstance(e["tid"], int) for e in boxes)
    named = {e["tid"] for e in timeline["traceEvents"] if e["ph"] == "M" and e["name"] == "thread_name"}
    assert {e["tid"] for e in boxes} <= named
    summary = json.loads((out / "summary.json").read_text())
    for key in ("eval_before", "eval_after", "wall_s", "checkpoint"):
        assert key in summary
    for when in ("before", "after"):  # every held-out prompt was generated, scored and counted
        detail = summary[f"eval_{when}_detail"]
        assert detail["n"] == 8 and summary[f"eval_{when}"] == detail["passed"] / 8
        assert len(detail["examples"]) == 5 and all(e["prompt_id"].startswith("test-") for e in detail["examples"])
    samples = _samples(out)
    ids = [s["sample_id"] for s in samples]
    assert len(ids) == len(set(ids)) == steps * samples_per_step  # nothing lost or duplicated
    assert all(s["tokens"] == s["logprobs"] > 0 for s in samples)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ckpt = out / "checkpoint-final"
    AutoModelForCausalLM.from_pretrained(ckpt)
    AutoTokenizer.from_pretrained(ckpt)
    assert any((out / "tensorboard").iterdir())


# Benchmarks during GRPO: the held-out split, 2 samples of 6 problems, after steps 2 (of 3).
EVAL_EVERY_2 = ["--set", "eval.every_steps=2", "--set", "eval.tasks=[{task: heldout, num_samples: 2, max_problems: 6}]"]


def _check_evaluated_during_training(out, every):
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for r in records:
        evaluated = r["step"] % every == 0
        assert ("eval/heldout/pass@1" in r) == evaluated and ("eval/heldout/maj@2" in r) == evaluated
        if evaluated:
            assert 0 <= r["eval/heldout/pass@1"] <= r["eval/heldout/pass@2"] <= 1 and r["time/eval_s"] > 0
            report = json.loads((out / "eval" / f"step-{r['step']}" / "heldout.json").read_text())
            assert report["pass@1"] == r["eval/heldout/pass@1"] and report["problems"] == 6
            assert report["policy_versions"] == [r["policy_version"]]  # exactly the step's weights


def _check_eval_of_run_directory(out):
    """``r1ray eval --checkpoint <run dir>``: its checkpoint-final, its config, its held-out split,
    plus a local fixture task; reports, per-problem details and the table."""
    fixture = Path(__file__).parents[1] / "fixtures" / "math_small.jsonl"
    tasks = (f"eval.tasks=[{{task: heldout, num_samples: 4, max_problems: 6}}, "
             f"{{task: generic, name: fixture_math, path: '{fixture}', num_samples: 2}}]")
    proc = r1ray_cli.run("eval", "--checkpoint", out, "--set", tasks)  # (tests/ importable: the run's plugin reward)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    where = out / "eval" / "checkpoint-final"
    combined = json.loads((where / "results.json").read_text())
    assert combined["checkpoint"] == str(out / "checkpoint-final") and set(combined["tasks"]) == {"heldout", "fixture_math"}
    for name, problems, n in [("heldout", 6, 4), ("fixture_math", 4, 2)]:
        report = json.loads((where / f"{name}.json").read_text())
        assert report["problems"] == problems and report["num_samples"] == n
        assert {"pass@1", f"pass@{n}", f"maj@{n}", "answered", "truncated", "sampling", "source"} <= set(report)
        assert report["sampling"]["temperature"] == 0.6 and report["sampling"]["top_p"] == 0.95
        details = [json.loads(line) for line in (where / f"{name}.details.jsonl").read_text().splitlines()]
        assert [d["row"] for d in details] == list(range(problems))
        for d in details:
            assert len(d["completions"]) == len(d["answers"]) == len(d["correct"]) == len(d["completion_tokens"]) == n
        assert report["pass@1"] == pytest.approx(sum(sum(d["correct"]) / n for d in details) / problems)
        assert name in proc.stdout
    assert "pass@1" in proc.stdout and str(where) in proc.stdout
    assert re.search(r"eval \(10 problems\): 32/32 samples \(100%\), problems=10/10 \|", proc.stderr), proc.stderr[-3000:]
    _check_no_bars(proc)


def _check_no_bars(proc):
    """Output to a pipe, not a terminal: plain progress lines, no bar fragments (ours or the libraries')."""
    output = proc.stdout + proc.stderr
    assert "\r" not in output and "it/s]" not in output and "Loading weights" not in output, output[-3000:]


@pytest.mark.timeout(900)
def test_tiny_recipe_end_to_end_hf_backend(tmp_path, tiny_world):
    """Also the SFT early stop: the probe (judged here by a reward that passes everything) is
    first taken at step 2 and stops the warm-up there; the SFT checkpoint is written."""
    out, proc = _train(tmp_path, tiny_world, "hf", [
        "--set", "sft.stop_at_pass_rate=0.5", "--set", "sft.probe_from=2", "--set", "sft.probe_every=1",
        "--set", "rewards=[{name: accuracy}, {name: format}, {name: 'plugin_rewards:every_answer', weight: 0.0}]",
        "--set", "eval.reward=plugin_rewards:every_answer", *EVAL_EVERY_2])
    _check_run(out)
    _check_evaluated_during_training(out, every=2)
    _check_eval_of_run_directory(out)
    assert "eval_after" in proc.stdout
    _check_no_bars(proc)  # the SFT warm-up stopped by the probe at step 2 of 3; GRPO's last line
    assert re.search(r"SFT warm-up: 2/3 steps \(67%\), loss=[\d.]+, probe_pass@1=1\.000 \|", proc.stderr)
    assert re.search(r"GRPO \(max_staleness=\d+\): 3/3 steps \(100%\), reward=[\d.]+, loss=-?[\d.]+, stale=[\d.]+ \|",
                     proc.stderr), proc.stderr[-3000:]
    sft = [json.loads(line) for line in (out / "sft_metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in sft] == [1, 2] and "probe_pass@1" not in sft[0] and sft[1]["probe_pass@1"] == 1.0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["sft"]["steps"] == 2 and summary["sft"]["probes"] == {"2": 1.0}
    assert summary["eval_before"] == summary["eval_after"] == 1.0  # the eval reward passes every completion
    # versions: 1 = the probe's weights, 2 = the end of SFT, 3 = after GRPO step 1
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["policy_version"] == 3
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out / "checkpoint-sft")


@pytest.mark.timeout(900)
def test_tiny_recipe_end_to_end_vllm_backend_zero3(tmp_path, tiny_world):
    """Also streams each completion on its own (grpo.completions_per_request=1): every group
    trains whole, its four completions generated, scored and referenced one by one."""
    pytest.importorskip("vllm")
    out, _ = _train(tmp_path, tiny_world, "vllm", ["--set", "learner.zero_stage=3", "--set", "generator.max_model_len=96",
                                                   "--set", "generator.bucket_mb=1", "--set", "grpo.completions_per_request=1",
                                                   *EVAL_EVERY_2])
    _check_run(out, vllm=True)
    groups = {}
    for s in _samples(out):
        groups.setdefault((s["step"], s["sample_id"].rsplit("/", 1)[0]), []).append(int(s["sample_id"].rsplit("/", 1)[1]))
    assert all(sorted(ks) == [0, 1, 2, 3] for ks in groups.values()) and len(groups) == 3 * 4
    events = json.loads((out / "timeline.json").read_text())["traceEvents"]
    boxes = [e for e in events if e["ph"] == "X"]
    assert sum(e["name"] == "score" for e in boxes) >= 3 * 16  # one call per completion
    # each sync's wait for the generators to pause is a box of its own on every rank (no busy
    # time of the learner's): on rank 0 between the two parts of its send_weights; under ZeRO-3
    # the other ranks wait in the same send's gathers, from their own send's start at the
    # earliest, and their send_weights goes on where the wait ends
    ranks = {e["tid"]: e["args"]["name"] for e in events
             if e["ph"] == "M" and e.get("args", {}).get("name", "").startswith("learner-rank-")}
    assert len(ranks) == 2
    for tid, name in ranks.items():
        waits = [e for e in boxes if e["name"] == "await_generators" and e["tid"] == tid]
        sends = [e for e in boxes if e["name"] == "send_weights" and e["tid"] == tid]
        assert len(waits) >= 3, name
        for w in waits:
            assert any(abs(w["ts"] + w["dur"] - s["ts"]) < 1 for s in sends), name
            if name == "learner-rank-0":
                assert any(abs(s["ts"] + s["dur"] - w["ts"]) < 1 for s in sends)
    _check_evaluated_during_training(out, every=2)  # on the vLLM generators


def test_existing_run_directory_is_never_overwritten(tmp_path):
    from r1ray.controllers.common.job import run_dir_for
    from r1ray.controllers.config import load_recipe

    first = tmp_path / "run"
    first.mkdir()
    (first / "metrics.jsonl").write_text("precious\n")
    second = run_dir_for(load_recipe("configs/tiny-cpu.yaml", output_dir=str(first)))
    assert second != first and second.name == "run-1"
    assert (first / "metrics.jsonl").read_text() == "precious\n"


def test_probe_without_held_out_prompts_is_refused_before_ray_starts(tmp_path, tiny_world, capsys):
    from r1ray.controllers.cli import main

    code = main(["train", "configs/tiny-cpu.yaml", "--output-dir", str(tmp_path / "run"), "--set",
                 f"model.tiny_dir={tiny_world}", "--set", "eval.num_prompts=100000"])
    assert code == 2
    err = capsys.readouterr().err
    assert "'sft.stop_at_pass_rate'" in err and "no held-out prompts are left" in err and "eval.num_prompts=100000" in err
    assert not (tmp_path / "run").exists()  # a refused run leaves no run directory behind


def _overlap(a, b):
    return min(a["ts"] + a["dur"], b["ts"] + b["dur"]) - max(a["ts"], b["ts"])


@pytest.mark.timeout(900)
def test_streaming_respects_the_staleness_bound_and_loses_nothing(tmp_path, tiny_world):
    """eta = 1 with partial rollouts (weights adopted every 4 tokens) over two scorers."""
    steps = 5
    out, _ = _train(tmp_path, tiny_world, "hf", name="run-async", extra=[
        "--set", f"grpo.steps={steps}", "--set", "grpo.max_staleness=1", "--set", "grpo.groups_per_request=2",
        "--set", "grpo.partial_rollout_tokens=4", "--set", "learner.loss.off_policy=tis",
        "--set", "scorer.num_actors=2", "--set", "scorer.cpus_per_actor=0.1"])
    samples = _samples(out)
    staleness = [s["trained_at"] - s["min_version"] for s in samples]
    assert max(staleness) <= 1  # the bound holds on every consumed sample, token by token
    # Streaming: 2 batches are admitted at the first version, so from step 2 on every batch was
    # admitted one version before the one it trains at (the next one starts as soon as a sync lands).
    lag = {s["step"]: {s["trained_at"] - s["admitted_at"]} for s in samples}
    assert lag == {1: {0}, **{k: {1} for k in range(2, steps + 1)}}
    assert all(s["min_version"] >= s["admitted_at"] for s in samples)
    # a request that adopted new weights mid-way is counted (tests/test_actors.py checks the adoption itself)
    summary = json.loads((out / "summary.json").read_text())
    interrupted = sum(s["max_version"] > s["min_version"] for s in samples)
    assert summary["grpo"]["counts"].get("samples/interrupted", 0) == interrupted
    ids = [s["sample_id"] for s in samples]
    assert len(ids) == len(set(ids)) == steps * 16
    assert {i.rsplit("/", 1)[1] for i in ids} == {"0", "1", "2", "3"}  # whole groups, all 4 completions each
    assert all(s["tokens"] == s["logprobs"] for s in samples)
    assert summary["grpo"]["staleness_histogram"].keys() <= {"0", "1"}
    assert sum(summary["grpo"]["staleness_histogram"].values()) == steps * 16
    util = summary["grpo"]["utilisation"]
    assert {"generator", "scorer", "learner", "reference"} <= set(util)
    assert all(0 <= u["idle_ratio"] <= 1 for u in util.values())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["staleness/max"] <= 1 and "util/generator/idle_ratio" in r for r in records)
    events = json.loads((out / "timeline.json").read_text())["traceEvents"]
    rows = {e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "thread_name"}
    assert {"generator-0", "reward-scorer-0", "reward-scorer-1", "learner-rank-0", "learner-rank-1", "reference-0"} <= rows


@pytest.mark.timeout(900)
def test_max_staleness_zero_is_the_synchronous_on_policy_loop(tmp_path, tiny_world):
    """Also dynamic sampling: groups with equal rewards are dropped and replaced."""
    out, _ = _train(tmp_path, tiny_world, "hf", name="run-sync", extra=[
        "--set", "grpo.max_staleness=0", "--set", "grpo.dynamic_sampling=true",
        "--set", "rewards=[{name: 'plugin_rewards:half_the_groups'}, {name: accuracy}, {name: format}]"])
    samples = _samples(out)
    assert all(s["min_version"] == s["max_version"] == s["trained_at"] == s["admitted_at"] for s in samples)
    events = [e for e in json.loads((out / "timeline.json").read_text())["traceEvents"] if e["ph"] == "X"]
    generate = [e for e in events if e["name"] == "generate"]
    train = [e for e in events if e["name"] == "train"]
    # on-policy: the generator never works while the learner trains
    assert all(_overlap(g, t) <= 0 for g in generate for t in train)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["grpo"]["counts"]["groups/dropped"] > 0  # dynamic sampling dropped and replaced groups
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert sum(r.get("groups/dropped", 0) for r in records) == summary["grpo"]["counts"]["groups/dropped"]
    assert all(r["reward/accuracy/timeouts"] == 0 and "reward/plugin_rewards:half_the_groups/mean" in r for r in records)
    # every kept group varies in reward, so no group of a batch has zero spread
    assert all(r["groups/zero_std_ratio"] == 0 for r in records)


LOSS_TYPES = {"grpo": [], "bnpo": [], "dr_grpo": [], "cispo": ["--set", "learner.loss.clip_eps_high=5.0"],
              "sapo": []}  # dapo: the recipe's own, run by the tests above


@pytest.mark.timeout(600)
@pytest.mark.parametrize("loss_type", list(LOSS_TYPES))
def test_every_loss_type_trains_end_to_end(tmp_path, tiny_world, loss_type):
    """Each loss type through the CLI, Ray and both DeepSpeed learner ranks: two streaming
    steps whose metrics are finite and whose weights move the policy version."""
    out = tmp_path / loss_type
    proc = r1ray_cli.run("train", "configs/tiny-cpu.yaml", "--output-dir", out,
                         "--set", f"model.tiny_dir={tiny_world}", "--set", "ray.dashboard=false", "--set", "sft.steps=0",
                         "--set", "sft.stop_at_pass_rate=null", "--set", "eval.num_prompts=0", "--set", "grpo.steps=2",
                         "--set", "grpo.prompts_per_step=4", "--set", "grpo.num_generations=4",
                         "--set", "sampling.max_new_tokens=16", "--set", "learner.micro_batch_size=4",
                         "--set", "rewards=[{name: accuracy}, {name: 'plugin_rewards:length_parity'}]",
                         "--set", f"learner.loss.loss_type={loss_type}", *LOSS_TYPES[loss_type], timeout=540)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert yaml.safe_load((out / "config.yaml").read_text())["learner"]["loss"]["loss_type"] == loss_type
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        assert all(isinstance(r[k], float) and r[k] == r[k] for k in ("loss", "kl", "grad_norm", "entropy/mean"))
        assert r["grad_norm"] > 0 and r["samples"] == 16
    assert records[1]["policy_version"] == records[0]["policy_version"] + 1
