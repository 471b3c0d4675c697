"""VerifierPool and the code sandbox: hard time limits, crashes, adversarial
inputs, plug-ins in workers, and the sandbox's resource limits.

One pool is shared by the module (workers are reused across calls, as in
the scorer); tests that need other settings build a small one.
"""
import logging
import os
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from r1ray import rewards
from r1ray.rewards import ScoreResult, VerifierPool
from r1ray.rewards.sandbox import Isolation, Limits, _run, isolation, run_python

pytestmark = pytest.mark.timeout(90)

POOL_TIMEOUT_S = 3.0
PLUGIN_MODULE = "r1ray_plugin_pool"

PLUGIN = textwrap.dedent('''
    """TRL-style reward functions that misbehave on purpose."""
    import os
    import time

    def _text(c):
        return c if isinstance(c, str) else c[-1]["content"]

    def misbehave(completions, **kwargs):
        text = _text(completions[0])
        if text == "hang":
            time.sleep(600)
        if text == "spin":
            while True:
                pass
        if text == "crash":
            os._exit(3)
        if text == "raise":
            raise RuntimeError("a bug in the reward")
        if text == "exit":
            raise SystemExit(0)
        if text == "alloc":
            bytearray(2 * 1024 ** 3)
        return [float(len(text))]

    def worker_pid(completions, **kwargs):
        return [float(os.getpid()) for _ in completions]

    def scaled_length(completions, factor=1.0, **kwargs):
        return [factor * len(_text(c)) for c in completions]

    def wrong_length(completions, **kwargs):
        return [1.0] * (len(completions) + 1)

    def value_named(completions, **kwargs):
        """The value each completion names: what a careless reward might return."""
        import numpy as np

        values = {"nan": float("nan"), "inf": float("inf"), "-inf": -float("inf"), "str": "0.5",
                  "bool": True, "np-bool": np.bool_(True), "list": [1.0], "dict": {"score": 1.0},
                  "none": None, "int": 1, "float32": np.float32(0.25), "float": 0.5}
        out = []
        for c in completions:
            if _text(c) == "raise":
                raise ValueError("cannot score " + "x" * 1000)
            out.append(values[_text(c)])
        return out

    def always_raises(completions, **kwargs):
        raise KeyError("solution")
''')


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory):
    # Workers are spawned: they see the sys.path the parent had when they
    # started, so the plug-in's folder goes on it before any pool exists.
    folder = tmp_path_factory.mktemp("plugin")
    (folder / f"{PLUGIN_MODULE}.py").write_text(PLUGIN)
    sys.path.insert(0, str(folder))
    yield folder
    sys.path.remove(str(folder))
    sys.modules.pop(PLUGIN_MODULE, None)


@pytest.fixture(scope="module")
def pool(plugin_dir):
    with VerifierPool(num_workers=2, timeout_s=POOL_TIMEOUT_S) as p:
        yield p


def _scored(scorer, rollouts):
    """What RewardScorer.score sends back, written onto the rollouts: (the rollouts, the stats)."""
    result = scorer.score(rollouts)
    return result.apply(rollouts), result.stats


def plugin(fn):
    return f"{PLUGIN_MODULE}:{fn}"


def timed(fn, *args, **kwargs):
    start = time.monotonic()
    out = fn(*args, **kwargs)
    return out, time.monotonic() - start


# ---- the pool ---------------------------------------------------------------


def test_pool_scores_like_the_function_in_process(pool):
    completions = ["\\boxed{42}", [{"role": "assistant", "content": "\\boxed{41}"}], "\\boxed{7}"]
    columns = {"solution": ["$42$", "$42$", "no math"], "prompts": ["p"] * 3}
    result = pool.score("accuracy", {}, completions, columns, sample_ids=["a", "b", "c"])
    assert result == ScoreResult(scores=[1.0, 0.0, None], timeouts=[], errors=[])
    assert result.scores == rewards.get("accuracy")(completions, **columns)


def test_pool_passes_params_and_every_column(pool):
    result = pool.score("soft_overlong_punishment", {"max_completion_len": 10, "soft_punish_cache": 4},
                        ["a", "b"], {"completion_ids": [[0] * 3, [0] * 8], "prompts": ["p", "p"]})
    assert result.scores == [0.0, -0.5]


def test_group_relative_rewards_see_the_whole_group(pool):
    completions = ["\\boxed{42}", "abc \\boxed{42}", "abcdefgh \\boxed{41}"]
    columns = {"solution": ["$42$"] * 3}
    result = pool.score("length", {}, completions, columns)
    assert result.scores == pytest.approx(rewards.get("length")(completions, **columns))
    assert result.scores[0] == pytest.approx(0.5)


def test_import_path_functions_run_in_workers_with_params(pool):
    result = pool.score(plugin("scaled_length"), {"factor": 2.0}, ["abc", "hello"], {"prompts": ["p", "p"]})
    assert result.scores == [6.0, 10.0]


def test_bad_names_params_and_columns_raise_in_the_caller(pool):
    with pytest.raises(ValueError, match="nope"):
        pool.score("nope", {}, ["x"], {})
    with pytest.raises(ValueError, match="max_penalty"):
        pool.score("repetition_penalty", {"max_penalty": 1.0}, ["x"], {})
    with pytest.raises(ValueError, match="solution"):
        pool.score("accuracy", {}, ["x", "y"], {"solution": ["$1$"]})


@pytest.mark.timeout(60)
def test_a_hung_call_is_killed_scored_zero_and_logged(pool, caplog):
    caplog.set_level(logging.WARNING, logger="r1ray.rewards")
    completions = ["ok", "hang", "fine", "spin"]
    ids = ["s-ok", "s-hang", "s-fine", "s-spin"]
    result, elapsed = timed(pool.score, plugin("misbehave"), {}, completions, {}, ids)
    assert result.scores == [2.0, 0.0, 4.0, 0.0]
    assert sorted(result.timeouts) == [1, 3] and result.errors == []
    assert elapsed < 2 * POOL_TIMEOUT_S + 10  # two workers, one timeout each, in parallel
    assert "s-hang" in caplog.text and "s-spin" in caplog.text and "timed out" in caplog.text
    # The replacement workers serve the next call.
    assert pool.score(plugin("misbehave"), {}, ["again"], {}).scores == [5.0]


def test_crashes_and_exceptions_are_errors_not_failures_of_the_pool(pool, caplog):
    caplog.set_level(logging.WARNING, logger="r1ray.rewards")
    completions = ["crash", "raise", "exit", "ok"]
    result = pool.score(plugin("misbehave"), {}, completions, {}, ["s-crash", "s-raise", "s-exit", "s-ok"])
    assert result.scores == [None, None, None, 2.0]
    assert sorted(result.errors) == [0, 1, 2] and result.timeouts == []
    assert "a bug in the reward" in caplog.text and "s-crash" in caplog.text
    assert "crashed its worker (exit status: 3)" in caplog.text  # the status it exited with, never "None"


def test_a_bad_return_value_is_an_error(pool):
    result = pool.score(plugin("wrong_length"), {}, ["x"], {})
    assert result.scores == [None] and result.errors == [0]


INVALID = ["nan", "inf", "-inf", "str", "bool", "np-bool", "list", "dict"]


def _records(caplog, *needles):
    return [r for r in caplog.records if r.name == "r1ray.rewards" and all(n in r.getMessage() for n in needles)]


def test_values_that_are_not_scores_are_invalid_and_score_none(pool, caplog):
    caplog.set_level(logging.WARNING, logger="r1ray.rewards")
    valid = ["none", "int", "float32", "float"]
    result = pool.score(plugin("value_named"), {}, INVALID + valid, {}, INVALID + valid)
    assert result.scores == [None] * len(INVALID) + [None, 1.0, 0.25, 0.5]
    assert all(type(s) is float for s in result.scores[-3:])
    assert sorted(result.invalid) == list(range(len(INVALID)))
    assert result.errors == [] and result.timeouts == []
    assert "not a score" in result.first_error
    # Eight invalid values, one log record (with its example), no traceback.
    [record] = _records(caplog, "value_named")
    assert "not a score" in record.getMessage() and "Traceback" not in caplog.text


def test_errors_are_logged_once_per_reward_and_kind(pool, caplog):
    caplog.set_level(logging.WARNING, logger="r1ray.rewards")
    ids = [f"s-{i}" for i in range(6)]
    for _ in range(2):  # the second call logs nothing new
        result = pool.score(plugin("always_raises"), {}, ["a"] * 6, {}, ids)
        assert result.scores == [None] * 6 and sorted(result.errors) == list(range(6))
        assert result.first_error.startswith("sample 's-") and "KeyError: 'solution'" in result.first_error
    [record] = _records(caplog, "always_raises")
    message = record.getMessage()
    assert "KeyError: 'solution' (at r1ray_plugin_pool.py:" in message and "logged once" in message
    assert "Traceback" not in caplog.text
    # The same function failing in two ways: one record for each kind.
    result = pool.score(plugin("value_named"), {}, ["raise", "str", "raise", "nan", "float"], {})
    assert result.scores == [None, None, None, None, 0.5]
    assert sorted(result.errors) == [0, 2] and sorted(result.invalid) == [1, 3]
    [raised] = _records(caplog, "value_named", "raised")
    assert "ValueError: cannot score xxx" in raised.getMessage() and len(raised.getMessage()) < 700
    assert "... (at r1ray_plugin_pool.py:" in raised.getMessage()  # clipped, still says where
    assert len(_records(caplog, "value_named", "not a score")) <= 1  # logged once by the test above


def test_workers_are_reused_across_calls(pool):
    workers = {w.process.pid for w in pool._workers}
    first = pool.score(plugin("worker_pid"), {}, ["a", "b", "c", "d"], {}).scores
    second = pool.score(plugin("worker_pid"), {}, ["a", "b", "c", "d"], {}).scores
    assert {int(pid) for pid in first + second} <= workers
    assert {w.process.pid for w in pool._workers} == workers
    assert os.getpid() not in workers


def test_score_is_safe_to_call_from_threads(pool):
    texts = [f"<think>{i}</think><answer>{i}</answer>" if i % 2 else str(i) for i in range(6)]
    with ThreadPoolExecutor(max_workers=3) as threads:
        results = list(threads.map(lambda _: pool.score("format", {}, texts, {}).scores, range(6)))
    assert results == [[0.0, 1.0] * 3] * 6


def test_importing_and_getting_rewards_does_not_import_sympy():
    # Workers and scorers start fast: math-verify loads on first use only.
    code = ("import sys\nfrom r1ray import rewards\n"
            "[rewards.get(n) for n in rewards.names() if n != 'judge']\n"
            "rewards.get('judge', model='m', base_url='http://127.0.0.1:9/v1')\n"
            "print(sorted(m for m in ('sympy', 'math_verify') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stderr


ADVERSARIAL = {
    "power-tower": "\\boxed{9^{9^{9^{9}}}}",
    "one-megabyte": "The answer is " + "9" * 1_000_000,
    "nested-braces": "\\boxed{" + "{" * 10_000 + "1" + "}" * 10_000 + "}",
    "unclosed-boxed": "so \\boxed{42",
    "surrogate": "\ud800 \\boxed{\ud800}",
}


@pytest.mark.timeout(60)
def test_adversarial_math_inputs_are_bounded_and_score_zero(pool):
    ids = list(ADVERSARIAL)
    completions = list(ADVERSARIAL.values()) + ["\\boxed{42}"]
    result, elapsed = timed(pool.score, "accuracy", {}, completions,
                            {"solution": ["$42$"] * len(completions)}, ids + ["control"])
    # Every adversarial input scores 0 (by timeout, or because nothing
    # parses); the control after them still scores.
    assert result.scores == [0.0] * len(ADVERSARIAL) + [1.0]
    assert result.errors == []
    # sympy's power tower defeats math-verify's 5 s alarm budget here: the
    # pool's 3 s limit is what stops it.
    assert ids.index("power-tower") in result.timeouts
    assert elapsed < 30  # a few kills and worker restarts, not minutes


def test_adversarial_inputs_through_the_text_rewards(pool):
    names = ["format", "tag_count", "reasoning_steps", "repetition_penalty", "code_format"]
    completions = list(ADVERSARIAL.values())
    for name in names:
        result, elapsed = timed(pool.score, name, {}, completions, {"solution": ["$42$"] * len(completions)})
        assert result.errors == [], name
        assert all(s is not None and s <= 0.0 for s in result.scores), (name, result)
        assert elapsed < len(completions) * POOL_TIMEOUT_S, name


def test_worker_memory_limit_turns_a_blow_up_into_an_error(plugin_dir):
    with VerifierPool(num_workers=1, timeout_s=10.0, memory_mb=1024) as small:
        result = small.score(plugin("misbehave"), {}, ["alloc", "ok"], {})
    assert result.scores == [None, 2.0] and result.errors == [0]


def test_close_is_idempotent_and_final(plugin_dir):
    p = VerifierPool(num_workers=1, timeout_s=5.0)
    processes = [w.process for w in p._workers]
    assert p.score("format", {}, ["<think>a</think><answer>b</answer>"], {}).scores == [1.0]
    p.close()
    p.close()
    assert not any(proc.is_alive() for proc in processes)
    with pytest.raises(RuntimeError, match="closed"):
        p.score("format", {}, ["x"], {})


def test_empty_batches(pool):
    assert pool.score("accuracy", {}, [], {"solution": []}) == ScoreResult(scores=[])
    assert pool.score("length", {}, [], {"solution": []}) == ScoreResult(scores=[])


# ---- the code sandbox ---------------------------------------------------------

# QUICK for programs the sandbox must stop; ROOMY for programs that must finish: a loaded
# 2-core CI machine once took over 2 s to start one (unshare, confine, setuid, two interpreters).
QUICK = Limits(timeout_s=2.0, memory_mb=256, max_processes=16)
ROOMY = Limits(timeout_s=30.0, memory_mb=256, max_processes=16)


def test_sandbox_runs_in_a_fresh_temporary_cwd_that_is_removed():
    result = run_python("import os\nprint(os.getcwd())\nprint(input())", "hello\n", ROOMY)
    assert result.returncode == 0 and not result.timed_out
    cwd, echoed = result.stdout.split()
    assert os.path.basename(cwd).startswith("r1ray-sandbox-")
    assert os.path.dirname(cwd) == tempfile.gettempdir()
    assert echoed == "hello"
    assert not os.path.exists(cwd)


def test_sandbox_kills_an_infinite_loop_at_the_wall_clock_limit():
    result, elapsed = timed(run_python, "while True:\n    pass", "", QUICK)
    assert result.timed_out and result.returncode is None
    assert elapsed < QUICK.timeout_s + 5


def test_sandbox_bounds_memory():
    result, elapsed = timed(run_python, "x = []\nwhile True:\n    x.append(bytearray(10 ** 7))", "", QUICK)
    assert result.returncode != 0 and "MemoryError" in result.stderr
    assert elapsed < QUICK.timeout_s + 5


def test_sandbox_bounds_output():
    small = Limits(timeout_s=5.0, output_mb=1)
    result = run_python("while True:\n    print('x' * 1000)", "", small)
    assert result.returncode != 0 and len(result.stdout) <= 1024 * 1024


def test_sandbox_survives_a_fork_bomb():
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    result, elapsed = timed(run_python, bomb, "", QUICK)
    assert result.returncode != 0 or result.timed_out
    assert elapsed < QUICK.timeout_s + 5
    if isolation().uid is not None:
        # RLIMIT_NPROC binds: the program cannot have more than 16 processes.
        probe = run_python("import os\nn = 0\ntry:\n    for _ in range(64):\n        if os.fork() == 0:\n"
                           "            import time; time.sleep(5); os._exit(0)\n        n += 1\n"
                           "except OSError:\n    pass\nprint(n)", "", ROOMY)
        assert 0 < int(probe.stdout.strip()) < 16


def test_sandbox_leaves_no_process_behind():
    marker = f"r1ray-leftover-{uuid.uuid4().hex}"
    escape = ("import os, sys\nif os.fork() == 0:\n    os.setsid()\n"
              f"    os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(60)  # {marker}'])\n"
              "print('parent done')")
    result = run_python(escape, "", ROOMY)
    assert "parent done" in result.stdout
    if not isolation().prefix:
        pytest.skip("no PID namespace here: a child that calls setsid() escapes the process-group kill")
    deadline = time.monotonic() + 5
    while _processes_with(marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _processes_with(marker) == []


def test_killing_a_worker_mid_program_kills_the_program(pool):
    # The pool's limit (3 s) is shorter than the sandbox's (30 s): the
    # worker is SIGKILLed while its program runs; the program must not
    # outlive it.
    marker = f"r1ray-orphan-{uuid.uuid4().hex}"
    code = f"import os, sys\nos.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(60)  # {marker}'])"
    info = {"language": "python", "test_cases": [{"input": "", "output": "", "type": "stdin_stdout"}]}
    result = pool.score("code", {"timeout_s": 30.0}, [f"```python\n{code}\n```"], {"verification_info": [info]})
    assert result.timeouts == [0]
    deadline = time.monotonic() + 5
    while _processes_with(marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _processes_with(marker) == []


def _processes_with(marker):
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    found.append(pid)
        except OSError:
            pass
    return found


def test_sandbox_has_no_network():
    # Even loopback is unreachable: a service on this machine is a target too.
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    program = textwrap.dedent(f"""
        import socket
        for address in [("127.0.0.1", {port}), ("1.1.1.1", 80)]:
            try:
                socket.create_connection(address, timeout=2).close()
                print("connected", address)
            except OSError as e:
                print("refused", type(e).__name__)
    """)
    try:
        result, elapsed = timed(run_python, program, "", Limits(timeout_s=10.0))
    finally:
        server.close()
    assert "connected" not in result.stdout
    assert result.stdout.count("refused") == 2
    assert elapsed < 10


def test_sandbox_confines_files_to_the_programs_folder(tmp_path):
    """Writes anywhere outside its folder fail and leave nothing (world-writable folders, the
    shared temporary ones, this checkout, /etc); /tmp is private and empty but for its folder;
    /proc shows its own processes only. Where mount namespaces are missing this machine's
    fallback is said (isolation().files) and the test is skipped."""
    if isolation().files != "mount-namespace":
        pytest.skip(f"no mount namespace here: files confined by {isolation().files} only")
    marker = f"r1ray-escape-{uuid.uuid4().hex}"
    shared = tmp_path / "world-writable"
    shared.mkdir()
    shared.chmod(0o1777)
    targets = [f"/tmp/{marker}", f"/var/tmp/{marker}", f"/dev/shm/{marker}", str(shared / marker),
               str(Path(__file__).resolve().parent / marker), f"/etc/{marker}", f"/run/{marker}"]
    program = textwrap.dedent(f"""
        import os
        for target in {targets!r} + [os.path.join(os.getcwd(), "..", "{marker}")]:
            try:
                with open(target, "w") as f:
                    f.write("escaped")
                print("WROTE", target)
            except OSError as e:
                print("refused", e.errno)
        with open("mine.txt", "w") as f:
            f.write("ok")
        print("own", open("mine.txt").read())
        print("tmp", sorted(os.listdir("/tmp")) == [os.path.basename(os.getcwd())])
        print("pids", max(int(p) for p in os.listdir("/proc") if p.isdigit()))
        print("etc", len(open("/etc/passwd").read()) > 0)
    """)
    result = run_python(program, "", Limits(timeout_s=10.0))
    lines = result.stdout.split("\n")
    assert "WROTE" not in result.stdout and sum(line.startswith("refused") for line in lines) == len(targets) + 1, \
        result.stdout + result.stderr
    assert "own ok" in result.stdout and "tmp True" in result.stdout and "etc True" in result.stdout
    assert int(next(line for line in lines if line.startswith("pids")).split()[1]) < 10  # not the host's pids
    assert not any(os.path.exists(t) for t in targets) and not (Path(tempfile.gettempdir()) / marker).exists()
    # the limits still hold inside the namespace
    assert run_python("x = []\nwhile True:\n    x.append(bytearray(10 ** 7))", "", QUICK).returncode != 0


def test_sandbox_fallback_without_namespaces_still_refuses_sockets():
    # What a machine without unshare gets: limits, and Python-level blocking.
    bare = Isolation(prefix=(), uid=None, python=sys.executable)
    program = ("import socket\ntry:\n    socket.socket()\nexcept PermissionError:\n    print('refused')\n"
               "import resource\nprint(resource.getrlimit(resource.RLIMIT_AS)[0] // 2 ** 20)")
    result = _run(program, "", ROOMY, bare)
    assert result.stdout.split() == ["refused", str(ROOMY.memory_mb)], result.stderr


@pytest.mark.timeout(90)
def test_code_reward_in_the_pool_survives_hostile_programs(pool, caplog):
    caplog.set_level(logging.WARNING, logger="r1ray.rewards")
    info = {"language": "python", "test_cases": [
        {"input": "1 2\n", "output": "3", "type": "stdin_stdout"},
        {"input": "2 2\n", "output": "4", "type": "stdin_stdout"},
    ]}
    programs = {
        "correct": "print(sum(map(int, input().split())))",
        "fork-bomb": "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
        "memory-hog": "x = []\nwhile True:\n    x.append(bytearray(10 ** 7))",
        "infinite-loop": "while True:\n    pass",
        "network": "import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=1)\nprint(3)",
    }
    completions = [f"```python\n{code}\n```" for code in programs.values()]
    result, elapsed = timed(pool.score, "code", {"timeout_s": 1.0, "memory_mb": 256, "max_processes": 16},
                            completions, {"verification_info": [info] * len(completions)}, list(programs))
    assert result.scores == [1.0, 0.0, 0.0, 0.0, 0.0]
    assert result.timeouts == [] and result.errors == []  # the sandbox, not the pool, stopped them
    assert elapsed < 30


@pytest.mark.timeout(60)
def test_a_reward_that_keeps_timing_out_is_not_run_on_the_rest_of_the_call(plugin_dir, caplog):
    """Every completion would hang: after 2 timeouts in a row the other 18 are not run, so the
    call costs one round of timeouts on 2 workers instead of ten."""
    caplog.set_level(logging.WARNING, logger="r1ray.rewards")
    with VerifierPool(num_workers=2, timeout_s=1.0, max_timeouts_in_a_row=2) as small:
        result, elapsed = timed(small.score, plugin("misbehave"), {}, ["hang"] * 20, {})
        assert result.timeouts == list(range(20)) and result.scores == [0.0] * 20 and result.errors == []
        assert elapsed < 8  # ten rounds of 1 s timeouts would take > 10 s
        assert "not run: the reward timed out on 2 completions in a row" in caplog.text
    with VerifierPool(num_workers=1, timeout_s=1.0, max_timeouts_in_a_row=2) as one:  # in order
        # a good completion between timeouts resets the count
        result = one.score(plugin("misbehave"), {}, ["hang", "ok", "hang", "ok", "ok"], {})
        assert result.timeouts == [0, 2] and result.scores == [0.0, 2.0, 0.0, 2.0, 2.0]


def test_reward_workers_have_a_memory_cap_by_default(plugin_dir):
    """scorer.memory_mb "auto": half the node's memory over the verifiers. A plug-in that asks
    for more than its share scores None, is counted with the cap named, and the next completion
    is scored by the same pool; null turns the cap off."""
    from r1ray.actors.rollout import Rollout
    from r1ray.actors.scorer import RewardScorer, RewardSpec, ScorerConfig

    cfg = ScorerConfig(num_actors=1, workers_per_actor=1, timeout_s=20.0)
    assert cfg.memory_mb == "auto"
    cap = rewards.auto_memory_mb(1)
    total_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
    assert 1024 <= cap <= 16384 and cap <= max(1024, total_mb // 2)
    assert rewards.auto_memory_mb(64) == max(1024, min(16384, total_mb // 2 // 64))
    over = textwrap.dedent(f"""
        def greedy(completions, **kwargs):
            return [float(len(bytearray({cap + 512} * 2**20))) if c[-1]["content"] == "big" else 1.0
                    for c in completions]
    """)
    (plugin_dir / "r1ray_plugin_greedy.py").write_text(over)
    scorer = RewardScorer([RewardSpec("r1ray_plugin_greedy:greedy", 1.0)], cfg)
    try:
        assert scorer.memory_mb == cap
        rollouts = [Rollout(f"p/{i}", "p", [1], [2], [0.0], [0], "stop", text=t) for i, t in enumerate(["big", "small"])]
        for r in rollouts:  # one call each: the failure does not take the next call down
            scored, stats = _scored(scorer, [r])
            key = "r1ray_plugin_greedy:greedy"
            if r.text == "big":
                assert scored[0].scores[key] is None and stats[f"{key}/errors"] == 1
            else:
                assert scored[0].scores[key] == 1.0 and stats[f"{key}/errors"] == 0
    finally:
        scorer.close()
    with VerifierPool(num_workers=1, timeout_s=10.0, memory_mb=1024) as small:
        result = small.score(plugin("misbehave"), {}, ["alloc"], {})
    assert result.errors == [0] and "memory cap of 1024 MB" in result.first_error
