"""Failing well, through the real CLI: faults injected into short tiny runs while they run.

The runs join one `ray start` head (as on a shared cluster), so the test can find the run's
actors by name and kill or stop them. Every fault must end the run fast, name its cause, and
leave a run directory that says how it ended.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import r1ray_cli

BASE = ["--set", "ray.dashboard=false", "--set", "sft.steps=0", "--set", "sft.stop_at_pass_rate=null",
        "--set", "eval.num_prompts=0", "--set", "grpo.prompts_per_step=4", "--set", "grpo.num_generations=4",
        "--set", "sampling.max_new_tokens=16", "--set", "learner.micro_batch_size=4",
        "--set", "ray.heartbeat_s=1", "--set", "ray.liveness_timeout_s=5"]


def _env(extra=None):
    return r1ray_cli.env(RAY_AUTH_MODE="token", **(extra or {}))  # `ray start` clusters use token auth


def _start(tmp_path, tiny_world, steps, *extra, env=None, name="run"):
    out = tmp_path / name
    cmd = r1ray_cli.cmd("train", "configs/tiny-cpu.yaml", "--output-dir", out, "--set", f"model.tiny_dir={tiny_world}",
                        "--set", f"grpo.steps={steps}", *BASE, *extra)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(env))
    return out, proc


def _wait_for_steps(out, proc, n=2, timeout=240):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        path = out / "metrics.jsonl"
        if path.exists() and len(path.read_text().splitlines()) >= n:
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended early ({proc.returncode}): {proc.stderr.read()[-3000:]}")
        time.sleep(0.2)
    raise AssertionError("the run never reached GRPO")


def _finish(proc, timeout):
    """(exit code, stderr, seconds until the process ended)."""
    t0 = time.monotonic()
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        raise AssertionError(f"the run did not end within {timeout} s: {err[-3000:]}") from None
    return proc.returncode, err, time.monotonic() - t0


def _summary(out):
    return json.loads((out / "summary.json").read_text())


def _jsonl_whole(path):
    text = path.read_text()
    assert not text or text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


ON_CLUSTER = Path(__file__).parent / "clusters" / "on_cluster.py"


def _on_cluster(address, *op, timeout=60):
    """One operation on the cluster's r1ray actors (``clusters/on_cluster.py``), from a driver of
    its own; returns what it prints. This test process stays out of Ray."""
    proc = subprocess.run([sys.executable, str(ON_CLUSTER), address, *op], capture_output=True, text=True,
                          env=_env(), timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip()


def _kill(address, name):
    _on_cluster(address, "kill", name)


def _pid(address, name):
    return int(_on_cluster(address, "pid", name))


def _no_actors_left(address, timeout=30):
    return _on_cluster(address, "left", str(timeout), timeout=timeout + 60) == "0"


@pytest.mark.timeout(400)
@pytest.mark.parametrize("victim", ["learner-rank-1", "reference-0"])
def test_a_killed_actor_is_named_within_seconds(tmp_path, tiny_world, ray_head, victim):
    """A learner rank (whose peer sees only a broken collective) or the reference, killed
    mid-run: neither can be replaced within a step (scorers and generators are: test_elastic)."""
    out, proc = _start(tmp_path, tiny_world, 2000, env={"RAY_ADDRESS": ray_head})
    _wait_for_steps(out, proc)
    _kill(ray_head, victim)
    code, err, seconds = _finish(proc, 120)
    assert code == 1 and seconds < 60, (code, seconds, err[-3000:])
    message = err.strip().splitlines()[-1]
    assert message.startswith("r1ray: run failed:") and f"{victim} died" in message, message
    assert f"r1ray train --resume {out}" in err  # how to go on from the last checkpoint
    summary = _summary(out)
    assert summary["status"] == "failed" and f"{victim} died" in summary["error"]
    assert summary["stage"] == "grpo" and summary["grpo_steps_done"] >= 2
    assert len(_jsonl_whole(out / "metrics.jsonl")) == summary["grpo_steps_done"]
    assert _no_actors_left(ray_head)


@pytest.mark.timeout(400)
def test_a_stopped_learner_rank_is_found_by_the_liveness_check(tmp_path, tiny_world, ray_head):
    out, proc = _start(tmp_path, tiny_world, 2000, env={"RAY_ADDRESS": ray_head})
    _wait_for_steps(out, proc)
    pid = _pid(ray_head, "learner-rank-0")
    os.kill(pid, signal.SIGSTOP)
    try:
        code, err, seconds = _finish(proc, 120)
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:  # already gone: removing the run's placement groups kills their actors
            pass
    assert code == 1 and seconds < 30, (code, seconds, err[-3000:])
    message = err.strip().splitlines()[-1]
    # named first, with what it was doing (training, or exporting the weights of the step before)
    assert message.startswith("r1ray: run failed:") and "learner-rank-0 no answer to a ping within 5 s" in message
    assert "while it was running train" in message or "while it was running sync" in message, message
    assert _summary(out)["status"] == "failed"


@pytest.mark.timeout(400)
@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_and_ctrl_c_stop_cleanly(tmp_path, tiny_world, ray_head, sig, code):
    """Ctrl-C also saves the weights when asked (checkpoint.on_interrupt)."""
    save = sig == signal.SIGINT
    out, proc = _start(tmp_path, tiny_world, 2000, "--set", f"checkpoint.on_interrupt={str(save).lower()}",
                       env={"RAY_ADDRESS": ray_head})
    _wait_for_steps(out, proc)
    proc.send_signal(sig)
    got, err, seconds = _finish(proc, 120)
    assert got == code and seconds < 60, (got, err[-3000:])
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(f"r1ray: stopped by {signal.Signals(sig).name}")
    summary = _summary(out)
    assert summary["status"] == "interrupted" and summary["signal"] == signal.Signals(sig).name
    assert len(_jsonl_whole(out / "metrics.jsonl")) == summary["grpo_steps_done"] >= 2
    _jsonl_whole(out / "samples.jsonl")
    events = json.loads((out / "timeline.json").read_text())["traceEvents"]  # what was drained before the stop
    assert sum(e["name"] == "train" for e in events) >= 2 and not list(out.glob(".timeline.json.part-*"))
    assert ("checkpoint_interrupted" in summary) == save == (out / "checkpoint-interrupted").exists()
    if save:
        from transformers import AutoModelForCausalLM

        AutoModelForCausalLM.from_pretrained(out / "checkpoint-interrupted")
    assert _no_actors_left(ray_head)


@pytest.mark.timeout(300)
def test_a_ray_start_record_whose_head_is_gone_does_not_hold_up_a_local_run():
    """``ray start`` records its head's address on the machine (``ray/ray_current_cluster``); a
    head that went without ``ray stop`` (killed, out of memory) leaves it behind, and
    ``ray.init()`` without an address joins what it names. Before, the run then retried that
    address for minutes (a fresh-clone suite hung 15 minutes on it after a killed run); now it
    starts a Ray of its own and says why, in seconds."""
    from r1ray.cluster.groups import free_port

    ray_tmp = tempfile.mkdtemp(prefix="r1ray-")  # (Ray's socket paths must stay under 108 bytes)
    gone = f"127.0.0.1:{free_port()}"
    (Path(ray_tmp) / "ray").mkdir()
    (Path(ray_tmp) / "ray" / "ray_current_cluster").write_text(gone)
    code = ("import ray\nfrom r1ray.cluster import runtime\n"
            "r = runtime.start(None, 'stale', 1, 0, False, 100, False)\nprint('CPU', r['CPU'])\nray.shutdown()")
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240,
                              env=r1ray_cli.env(RAY_TMPDIR=ray_tmp))
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "CPU 1.0" in proc.stdout  # its own cluster, with the resources it asked for
    assert f"recorded on this machine ({gone}, in {ray_tmp}/ray/ray_current_cluster) does not answer" in proc.stderr


@pytest.mark.timeout(600)
def test_a_build_lock_left_by_a_stopped_run_does_not_hold_up_the_next(tmp_path, tiny_world, monkeypatch):
    """A run stopped while its learners build DeepSpeed's shared-memory op (a CPU's first start)
    leaves torch's build ``lock`` file; the next run's learners remove it, say so, and start. Before,
    they waited on it until their setup's deadline (600 s; 300 s here) and the run failed with
    "setup (DeepSpeed init) did not answer". The run has an extensions folder of its own, with
    the op's build copied in when an earlier run built it (ninja then finds nothing to do:
    building it afresh takes about 50 CPU seconds)."""
    from deepspeed.accelerator import get_accelerator
    from torch.utils.cpp_extension import _get_build_directory

    op = get_accelerator().create_op_builder("ShareMemCommBuilder").name
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    built = Path(_get_build_directory(op, verbose=False))  # where the other runs of this machine build it
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "torch_extensions"))  # the run's, too
    folder = Path(_get_build_directory(op, verbose=False))
    if (built / "build.ninja").exists():
        shutil.copytree(built, folder, dirs_exist_ok=True, ignore=shutil.ignore_patterns("lock", "*.flock"))
    lock = folder / "lock"
    lock.touch()  # what a build stopped part-way leaves
    # a Ray of the run's own (it would join this module's `ray start` head, whose workers were
    # started without the folder), in a short folder: Ray's socket paths must stay under 108 bytes
    ray_tmp = tempfile.mkdtemp(prefix="r1ray-")
    try:
        out, proc = _start(tmp_path, tiny_world, 1, "--set", "ray.call_timeout_s=300", env={"RAY_TMPDIR": ray_tmp})
        got, err, seconds = _finish(proc, 540)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert got == 0, err[-3000:]
    assert _summary(out)["status"] == "completed" and not lock.exists()
    assert f"removing {lock}, left by a build of DeepSpeed's {op} op" in err


@pytest.mark.timeout(400)
def test_a_second_run_on_a_shared_cluster_gets_its_own_namespace(tmp_path, tiny_world, ray_head):
    """Another run's actor holds the name learner-rank-0 in namespace r1ray while this one starts."""
    squatter = subprocess.Popen([sys.executable, str(ON_CLUSTER), ray_head, "squat", "learner-rank-0"],
                                stdout=subprocess.PIPE, text=True, env=_env())
    try:
        assert squatter.stdout.readline().strip() == "up"
        out, proc = _start(tmp_path, tiny_world, 2, env={"RAY_ADDRESS": ray_head})
        code, err, _ = _finish(proc, 300)
        assert code == 0, err[-3000:]
        assert "Ray namespace 'r1ray' is in use by another run on this cluster: this run uses 'r1ray-2'" in err
        assert "namespace: r1ray-2" in (out / "config.yaml").read_text()
        assert _summary(out)["status"] == "completed"
        assert squatter.poll() is None  # the other run's driver and actor were left alone
        assert _on_cluster(ray_head, "ping", "learner-rank-0") == "ok"
    finally:
        squatter.kill()
        squatter.wait()


@pytest.mark.timeout(400)
def test_a_reward_that_always_raises_stops_the_run_or_is_dropped(tmp_path, tiny_world, ray_head):
    rewards = "rewards=[{name: accuracy}, {name: 'plugin_rewards:raises_every_time', weight: 0.5}]"
    out, proc = _start(tmp_path, tiny_world, 50, "--set", rewards, "--set", "scorer.max_failed_steps=2",
                       env={"RAY_ADDRESS": ray_head})
    code, err, _ = _finish(proc, 300)
    assert code == 1
    message = err.strip().splitlines()[-1]
    assert "reward 'plugin_rewards:raises_every_time' failed on every completion for 2 consecutive" in message
    assert "KeyError" in message and "scorer.on_broken: drop" in message
    assert err.count("raised KeyError") <= 2  # logged once per scorer, not per completion
    summary = _summary(out)
    assert summary["status"] == "failed" and 1 <= summary["grpo_steps_done"] <= 3  # stopped at once, not at step 50
    # drop: the run trains on without it
    out, proc = _start(tmp_path, tiny_world, 4, "--set", rewards, "--set", "scorer.max_failed_steps=2",
                       "--set", "scorer.on_broken=drop", env={"RAY_ADDRESS": ray_head}, name="run-drop")
    code, err, _ = _finish(proc, 300)
    assert code == 0, err[-3000:]
    records = _jsonl_whole(out / "metrics.jsonl")
    key = "reward/plugin_rewards:raises_every_time"
    (at,) = [i for i, r in enumerate(records) if r.get(f"{key}/dropped") == 1]  # dropped once, at step 2 or 3
    assert 1 <= at <= 2 and all(f"{key}/mean" not in r for r in records[at + 1:])
    assert all(r.get("reward/accuracy/errors", 0) == 0 for r in records)


def test_an_unreachable_cluster_fails_within_seconds_naming_the_address(tmp_path, tiny_world):
    out, proc = _start(tmp_path, tiny_world, 2, "--set", "ray.connect_timeout_s=2", env={"RAY_ADDRESS": "127.0.0.1:1"})
    code, err, seconds = _finish(proc, 120)
    assert code == 2 and seconds < 30
    assert "cannot reach the Ray cluster at '127.0.0.1:1' within 2 s" in err.strip().splitlines()[-1]
    assert not out.exists()


@pytest.mark.parametrize("make", ["file", "below-file"])
def test_an_output_dir_that_cannot_be_written_is_refused_before_ray(tmp_path, tiny_world, make, capsys):
    from r1ray.controllers.cli import main

    blocker = tmp_path / "taken"
    blocker.write_text("a file")
    target = blocker if make == "file" else blocker / "run"
    code = main(["train", "configs/tiny-cpu.yaml", "--output-dir", str(target), "--set", f"model.tiny_dir={tiny_world}"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("r1ray: invalid config: config key 'output_dir'") and str(target) in err
    assert blocker.read_text() == "a file" and sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_jsonl_never_ends_in_half_a_line_when_the_disk_fills(tmp_path):
    """RLIMIT_FSIZE stands in for a full disk: writes past it fail part-way."""
    script = f"""
import resource, signal, sys
from pathlib import Path
from r1ray.controllers.common.runlog import MetricsWriter, write_json_atomic
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
run = Path({str(tmp_path)!r})
write_json_atomic(run / "summary.json", {{"status": "running"}})
resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))
w = MetricsWriter(run)
n = 0
try:
    while True:
        if n % 3 == 2:  # (several lines in one write: a GRPO step's samples.jsonl)
            w.write_many([{{"step": n + k, "payload": "x" * 37}} for k in range(4)])
            n += 4
        else:
            w.write({{"step": n, "payload": "x" * 37}})
            n += 1
except OSError as e:
    print("written", n, e.errno)
try:
    write_json_atomic(run / "summary.json", {{"status": "completed", "pad": "y" * 5000}})
except OSError as e:
    print("summary refused", e.errno)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    written = int(proc.stdout.split()[1])
    assert written > 5 and "summary refused" in proc.stdout
    lines = _jsonl_whole(tmp_path / "metrics.jsonl")  # no partial last line
    assert [r["step"] for r in lines] == list(range(written))
    assert json.loads((tmp_path / "summary.json").read_text()) == {"status": "running"}  # the old one, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl", "summary.json"]


def test_a_reader_tolerates_one_cut_line(tmp_path):
    from r1ray.controllers.common.runlog import read_jsonl

    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"st')
    assert read_jsonl(path) == [{"step": 1}, {"step": 2}]
    path.write_text('{"step": 1}\n{"st\n{"step": 3}\n')
    with pytest.raises(json.JSONDecodeError):
        read_jsonl(path)


@pytest.mark.timeout(400)
def test_work_past_its_deadline_is_named(tmp_path, tiny_world, ray_head):
    """Actors that answer pings but whose work overruns: the deadline, scaled to the work."""
    out, proc = _start(tmp_path, tiny_world, 50, "--set", "ray.deadline_factor=0.001", "--set", "ray.deadline_min_s=0.001",
                       env={"RAY_ADDRESS": ray_head})
    code, err, _ = _finish(proc, 300)
    assert code == 1, err[-3000:]
    message = err.strip().splitlines()[-1]
    assert "past its deadline of" in message and "raise ray.deadline_factor" in message, message
    assert any(name in message for name in ("generator-0", "reward-scorer-0", "reference-0", "learner-rank-0"))
    assert _summary(out)["status"] == "failed"


def _bad_data(tmp_path, problem):
    from datasets import Dataset, DatasetDict

    from r1ray.controllers.common.tiny import make_example

    rows = [make_example(i, 2 * i + 7, 3) for i in range(40)]
    rows[6]["problem"] = problem
    DatasetDict({"train": Dataset.from_list(rows), "test": Dataset.from_list(rows[:10])}).save_to_disk(tmp_path / "d")
    return ["--set", f"data.path={tmp_path / 'd'}", "--set", "grpo.prompts_per_step=4", "--set", "eval.num_prompts=4",
            "--set", "sft.steps=0", "--set", "sft.stop_at_pass_rate=null"]


def _cli(args):
    return r1ray_cli.run(*args, timeout=300, extra_env={"RAY_AUTH_MODE": "token"})


def test_bad_data_is_refused_by_check_and_train_before_ray(tmp_path, tiny_world):
    data = _bad_data(tmp_path, "7" * 100_000)  # one 100 KB problem
    tiny = ["--set", f"model.tiny_dir={tiny_world}"]
    for command in (["check", "configs/tiny-cpu.yaml"], ["train", "configs/tiny-cpu.yaml", "--output-dir",
                                                         str(tmp_path / "run")]):
        proc = _cli([*command, *tiny, *data])
        assert proc.returncode == 2, proc.stderr[-3000:]
        message = proc.stderr.strip().splitlines()[-1]
        assert message.startswith("r1ray: invalid config: data rule 'prompt_too_long': split 'train'")
        assert "row 6" in message and "data.on_invalid_row=drop" in message
        assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()
    proc = _cli(["check", "configs/tiny-cpu.yaml", *tiny, *data, "--set", "data.on_invalid_row=drop"])
    assert proc.returncode == 0 and "'train/prompt_too_long': 1" in proc.stdout
    proc = _cli(["check", "configs/tiny-cpu.yaml", *tiny, *data, "--set", "data.solution_column=gold"])
    assert proc.returncode == 2 and "'data.solution_column': got 'gold'" in proc.stderr


@pytest.mark.timeout(600)
def test_a_generator_lost_during_eval_is_replaced_and_no_problem_is_lost(tmp_path, tiny_world, ray_head):
    """``r1ray eval`` on two generators of a shared cluster: generator-0 is killed while the
    evaluation runs; it is replaced as in GRPO, its calls are sent again, and every problem is
    reported once with all its samples."""
    out, log = tmp_path / "eval", tmp_path / "eval.log"
    problems, n = 500, 32  # the tiny world's whole test split: the evaluation outlasts the kill (about a minute)
    cmd = r1ray_cli.cmd("eval", "configs/tiny-cpu.yaml", "--checkpoint", tiny_world / "model", "--output-dir", out,
                        "--set", f"model.tiny_dir={tiny_world}", "--set", "ray.dashboard=false",
                        "--set", "generator.num_actors=2", "--set", "ray.heartbeat_s=1",
                        "--set", "ray.liveness_timeout_s=5",
                        "--set", f"eval.tasks=[{{task: heldout, num_samples: {n}, max_problems: {problems}}}]")
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=_env({"RAY_ADDRESS": ray_head}))
        t0 = time.monotonic()
        while True:  # both generators up (their constructors load the model): the evaluation is dispatching
            if proc.poll() is not None:
                raise AssertionError(f"eval ended early ({proc.returncode}): {log.read_text()[-3000:]}")
            if all(_actor_answers(ray_head, f"generator-{i}") for i in (0, 1)):
                break
            assert time.monotonic() - t0 < 180, log.read_text()[-3000:]
            time.sleep(1)
        time.sleep(0.5)
        _kill(ray_head, "generator-0")
        code, _, _ = _finish(proc, 420)
    _assert_replaced_and_every_problem_reported_once(log.read_text(), code, out, problems, n)
    assert _no_actors_left(ray_head)


def _assert_replaced_and_every_problem_reported_once(text: str, code: int, out: Path, problems: int, n: int) -> dict:
    """The run ended well, generator-0 was replaced, and the heldout report in ``out`` has every
    problem once, in order, with its ``n`` samples; returns the report."""
    assert code == 0, text[-4000:]
    assert "generator-0" in text and "replacing it" in text, text[-4000:]
    report = json.loads((out / "heldout.json").read_text())
    assert report["problems"] == problems and report["num_samples"] == n
    assert report["actors"]["generator/lost"] >= 1 and report["actors"]["generator/restarted"] >= 1
    details = [json.loads(line) for line in (out / "heldout.details.jsonl").read_text().splitlines()]
    assert [d["row"] for d in details] == list(range(problems))  # each problem once, in order
    assert all(len(d["completions"]) == n for d in details)
    return report


@pytest.mark.timeout(600)
def test_a_generator_lost_during_a_steps_evaluation_is_replaced_with_the_steps_weights(tmp_path, tiny_world,
                                                                                       ray_head):
    """``r1ray train`` evaluating every step on two generators: generator-0 is killed during
    step 1's evaluation. The run goes on: the replacement joins with step 1's weights, the lost
    calls are sent again, every problem is reported once, and the held-out pass@1 after GRPO
    (also streamed by the evaluator) is measured on the group."""
    problems, n = 500, 32  # the evaluation outlasts the kill (about a minute)
    log = tmp_path / "train.log"
    out = tmp_path / "run"
    cmd = r1ray_cli.cmd("train", "configs/tiny-cpu.yaml", "--output-dir", out, "--set", f"model.tiny_dir={tiny_world}",
                        "--set", "grpo.steps=1", *BASE, "--set", "eval.num_prompts=100",
                        "--set", "generator.num_actors=2", "--set", "generator.cpus_per_actor=0.25",
                        "--set", "eval.every_steps=1", "--set", "eval.sampling.max_new_tokens=16",
                        "--set", f"eval.tasks=[{{task: heldout, num_samples: {n}, max_problems: {problems}}}]")
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=_env({"RAY_ADDRESS": ray_head}))
        t0 = time.monotonic()
        while "step 1 evaluation starts" not in log.read_text():
            if proc.poll() is not None:
                raise AssertionError(f"train ended early ({proc.returncode}): {log.read_text()[-3000:]}")
            assert time.monotonic() - t0 < 300, log.read_text()[-3000:]
            time.sleep(0.2)
        time.sleep(2)
        _kill(ray_head, "generator-0")
        code, _, _ = _finish(proc, 480)
    text = log.read_text()
    report = _assert_replaced_and_every_problem_reported_once(text, code, out / "eval" / "step-1", problems, n)
    assert "generator-0 joined at policy version 1" in text, text[-4000:]
    assert report["policy_versions"] == [1]  # every sample, the replacement's too, of step 1's weights
    summary = _summary(out)
    assert summary["status"] == "completed" and summary["eval_after_detail"]["n"] == 100
    [record] = _jsonl_whole(out / "metrics.jsonl")
    assert record["step"] == 1 and 0 <= record["eval/heldout/pass@1"] <= 1
    assert _no_actors_left(ray_head)


def _actor_answers(address, name) -> bool:
    proc = subprocess.run([sys.executable, str(ON_CLUSTER), address, "ping", name], capture_output=True, text=True,
                          env=_env(), timeout=60)
    return proc.returncode == 0 and proc.stdout.strip() == "ok"
