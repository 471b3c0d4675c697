"""A generative judge as a GRPO reward, through the CLI: against the fault-injecting OpenAI server
(429s, hangs, unparseable verdicts, then the server gone mid-run) the run goes on, every failure
is counted, the 4 requests/s limit holds at the server, no scoring call outlives its deadline,
and the key is in no file or log; and against a vLLM server r1ray starts for ``serve:``."""
import json
import threading
import time
from pathlib import Path

import pytest
import r1ray_cli
from fake_openai import FakeOpenAI

KEY = "sk-judge-e2e-SECRET-24680"


def _jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _tiny(out, tiny_world, *more):
    return ("train", "configs/tiny-cpu.yaml", "--output-dir", out, "--set", f"model.tiny_dir={tiny_world}",
            *r1ray_cli.QUIET, "--set", "sft.steps=0", "--set", "grpo.prompts_per_step=4",
            "--set", "grpo.num_generations=4", "--set", "sampling.max_new_tokens=16", "--set", "eval.num_prompts=0",
            "--set", "grpo.max_staleness=1", *more)


def _verdict(prompt: str, i: int) -> str:
    if len(prompt) % 5 == 0:
        return "Hmm."  # unparseable
    return "CORRECT" if len(prompt) % 5 in (1, 3) else "INCORRECT"


@pytest.mark.timeout(600)
def test_a_faulty_rate_limited_judge_is_bounded_counted_and_dropped_when_gone(tmp_path, tiny_world):
    served = {"n": 0}

    def faults(prompt):
        served["n"] += 1
        n = served["n"]
        return "hang" if n % 9 == 0 else "429" if n % 7 == 0 else None

    fake = FakeOpenAI(_verdict, key=KEY, fault_fn=faults, hang_s=30.0, retry_after="0.3")
    stop = threading.Event()

    def take_it_down():  # the judge's server goes away after 30 requests
        while not stop.is_set() and len(fake.times) < 30:
            time.sleep(0.05)
        fake.close()

    threading.Thread(target=take_it_down, daemon=True).start()
    out = tmp_path / "run"
    judge = (f"{{name: judge, weight: 1.0, params: {{model: judge, base_url: '{fake.url}', "
             "api_key_env: R1RAY_JUDGE_KEY, requests_per_second: 4, deadline_s: 3, timeout_s: 20}}")
    try:
        proc = r1ray_cli.run(*_tiny(out, tiny_world, "--set", "grpo.steps=6",
                                    "--set", f"rewards=[{{name: accuracy}}, {judge}]",
                                    "--set", "scorer.on_broken=drop", "--set", "scorer.max_failed_steps=1"),
                             timeout=600, extra_env={"R1RAY_JUDGE_KEY": KEY})
    finally:
        stop.set()
        fake.close()
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = _jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    total = {k: sum(r.get(f"reward/judge/{k}", 0) for r in records)
             for k in ("calls", "requests", "timeouts", "invalid", "errors", "rate_limited", "retries", "cached")}
    assert total["timeouts"] > 0 and total["invalid"] > 0 and total["rate_limited"] > 0 and total["retries"] > 0
    assert total["errors"] + total["timeouts"] > 0
    assert sum(r.get("reward/judge/dropped", 0) for r in records) == 1  # gone: dropped, the run went on
    assert "reward/judge/calls" not in records[-1] and "reward/judge/mean" not in records[-1]  # trained on without it
    assert 30 <= len(fake.times) <= total["requests"]  # every request the server saw was counted
    # 4 requests/s at the server, retries included: any 13 arrivals span 3 s and any 5 span 1 s
    # (less the server's own scheduling jitter on 2 busy cores: one arrival is stamped late, which
    # shortens a span by that much whatever its length: 0.12 s and 0.2 s seen; without the limit
    # the spans are a few milliseconds)
    for n, seconds, jitter in ((13, 3.0, 0.25), (5, 1.0, 0.25)):
        spans = [b - a for a, b in zip(fake.times, fake.times[n - 1:])]
        assert min(spans) >= seconds - jitter, (n, sorted(spans)[:3])
    scored = [e for e in json.loads((out / "timeline.json").read_text())["traceEvents"]
              if e.get("ph") == "X" and e["name"] == "score"]
    assert scored and max(e["dur"] for e in scored) / 1e6 < 3.0 + 2.0  # deadline 3 s (+ the verifiers' share)
    for path in out.rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path
    assert KEY not in proc.stdout and KEY not in proc.stderr
    session_logs = Path("/tmp/ray/session_latest/logs")  # the scorer actors were given the key
    for path in session_logs.rglob("*") if session_logs.exists() else []:
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path


@pytest.mark.timeout(900)
def test_a_self_hosted_vllm_judge_grades_the_run(tmp_path, tiny_world):
    out = tmp_path / "run"
    judge = ("{name: judge, weight: 0.5, params: {serve: {replicas: 1, cpus_per_replica: 1, max_model_len: 256, "
             "cpu_kv_cache_gib: 1}, template: 'Problem: {{ problem }} Answer: {{ completion }} Score 0-9:', "
             "regex: '([0-9])', score_range: [0, 9], max_tokens: 4, deadline_s: 60, requests_per_second: 20}}")
    proc = r1ray_cli.run(*_tiny(out, tiny_world, "--set", "grpo.steps=2", "--set", "ray.num_cpus=3",
                                "--set", f"rewards=[{{name: accuracy}}, {judge}]"), timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = _jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2]
    # (a step's record counts the scoring done since the step before: with max_staleness 1 both
    # steps' groups may be scored before step 1 ends, so the run's totals are what is checked)
    counts = json.loads((out / "summary.json").read_text())["grpo"]["counts"]
    judged = {k: counts[f"reward/judge/{k}"] for k in ("calls", "requests", "cached", "errors", "timeouts", "invalid")}
    assert judged["calls"] == 32 and judged["errors"] + judged["timeouts"] == 0, judged
    # the completions went to the server (a group's identical ones share a request)
    assert 0 < judged["requests"] + judged["cached"] <= 32
    log = (out / "servers" / "judge-1-0.log").read_text()
    assert log.strip()  # the server wrote its log into the run directory
