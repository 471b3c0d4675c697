"""The ``judge`` reward against the fault-injecting OpenAI server: verdicts parsed, cached and
counted; 429s retried after Retry-After; hangs, unparseable verdicts, failing and vanished
endpoints scored None and counted within the deadline; the concurrency and requests-per-second
limits measured at the server; the key in no error text or log."""
import logging
import re
import threading
import time

import pytest
from fake_openai import FakeOpenAI

from r1ray import rewards
from r1ray.actors.rollout import Rollout
from r1ray.actors.scorer import RewardScorer, RewardSpec, ScorerConfig
from r1ray.rewards.endpoint import RateLimit, retry_after_s
from r1ray.rewards.judge import Judge

KEY = "sk-judge-SECRET-9876543210"


def grade(prompt: str, i: int) -> str:
    """A judge that knows arithmetic: CORRECT when the student's answer contains the reference."""
    reference = re.search(r"Reference answer:\n(.*)\n", prompt).group(1).strip()
    student = prompt.split("Student's answer:\n", 1)[1].split("\n\nIs the student's", 1)[0]
    if "unparseable" in student:
        return "I am not sure what to say."
    return "They agree.\nCORRECT" if reference in student else "INCORRECT"


def judge(fake: FakeOpenAI, **params) -> Judge:
    params = {"model": "judge", "base_url": fake.url, "api_key_env": None, **params}
    return rewards.get("judge", **params)


def columns(answers: list[str]) -> dict:
    return {"prompts": [[{"role": "user", "content": f"What is {a}?"}] for a in answers], "solution": answers}


@pytest.fixture
def fake():
    server = FakeOpenAI(grade, key=KEY)
    yield server
    server.close()


def test_verdicts_are_parsed_thinking_is_stripped_and_duplicates_are_graded_once(fake):
    j = judge(fake).open(KEY)
    try:
        completions = ["<think>2+2 is 5?</think> 4", "5", "<think>still thinking", "4", "4"]
        res = j.score(completions, columns(["4"] * 5))
        # the think block is not graded; a trace cut inside it has no answer yet
        assert res.scores == [1.0, 0.0, 0.0, 1.0, 1.0]
        assert not (res.errors or res.invalid or res.timeouts)
        assert res.counts["requests"] == 3 and res.counts["cached"] == 0  # "4" twice: one request
        again = j.score(["4", "5"], columns(["4", "4"]))
        assert again.scores == [1.0, 0.0] and again.counts == {**again.counts, "requests": 0, "cached": 2}
        other = j.score(["4"], columns(["5"]))  # another reference: another request
        assert other.scores == [0.0] and other.counts["requests"] == 1
    finally:
        j.close()


def test_regex_choices_and_plugin_parsers():
    base = {"model": "m", "base_url": "http://127.0.0.1:9/v1"}
    j = rewards.get("judge", **base)
    assert j.parse("It looks CORRECT at first but is INCORRECT") == 0.0  # the last verdict wins
    assert j.parse("correct.") == 1.0
    with pytest.raises(ValueError, match="none of"):
        j.parse("incorrectly")  # not a whole word
    r = rewards.get("judge", **base, regex=r"Score:\s*(-?[0-9.]+)", score_range=[0, 10])
    assert r.parse("Score: 3 ... final Score: 7.5") == 0.75
    with pytest.raises(ValueError, match="outside score_range"):
        r.parse("Score: 11")
    p = rewards.get("judge", **base, parser="plugin_rewards:judge_verdict")
    assert p.parse("GOOD") == 1.0 and p.parse("meh") is None


@pytest.mark.parametrize("params, message", [
    ({"model": "m"}, "needs an endpoint"),
    ({"base_url": "http://x/v1"}, "model"),
    ({"model": "m", "base_url": "ftp://x"}, "http"),
    ({"model": "m", "base_url": "http://x/v1", "serve": {}}, "not both"),
    ({"model": "m", "base_url": "http://x/v1", "regex": "([0-9])", "choices": {"A": 1}}, "one parser"),
    ({"model": "m", "base_url": "http://x/v1", "regex": "[0-9]"}, "needs a group"),
    ({"model": "m", "base_url": "http://x/v1", "regex": "(["}, "does not compile"),
    ({"model": "m", "base_url": "http://x/v1", "choices": {"A": "yes"}}, "choices must map"),
    ({"model": "m", "base_url": "http://x/v1", "template": "{{ answer }}"}, "'answer'; accepted: problem"),
    ({"model": "m", "base_url": "http://x/v1", "template": "{{ problem "}, "does not parse"),
    ({"model": "m", "base_url": "http://x/v1", "requests_per_second": 0}, "requests_per_second"),
    ({"model": "m", "base_url": "http://x/v1", "max_concurrency": 0}, "max_concurrency"),
    ({"model": "m", "base_url": "http://x/v1", "score_range": [1, 0]}, "score_range"),
    ({"model": "m", "base_url": "http://x/v1", "deadline": 3}, "no parameter 'deadline'"),
])
def test_bad_judge_parameters_are_refused_by_name(params, message):
    with pytest.raises(ValueError, match=message):
        rewards.get("judge", **params)


def test_429s_are_retried_after_retry_after_and_counted(fake):
    fake.retry_after = "0.5"
    seen = {"n": 0}

    def first_two_limited(prompt):
        seen["n"] += 1
        return "429" if seen["n"] <= 2 else None

    fake.fault_fn = first_two_limited
    j = judge(fake).open(KEY)
    try:
        t0 = time.monotonic()
        res = j.score(["4"], columns(["4"]))
        assert res.scores == [1.0] and res.counts["rate_limited"] == 2 and res.counts["retries"] == 2
        assert time.monotonic() - t0 >= 1.0  # it waited as asked, twice
        assert len(fake.times) == 3
    finally:
        j.close()


def test_hangs_unparseable_verdicts_and_failures_score_none_within_the_deadline(fake, caplog):
    fake.hang_s = 30.0

    def faults(prompt):
        student = prompt.split("Student's answer:\n", 1)[1]
        return "hang" if student.startswith("7") else "echo-500" if student.startswith("8") else None

    fake.fault_fn = faults
    j = judge(fake, deadline_s=2.0, timeout_s=30.0, retries=0).open(KEY)  # a 500 fails at once
    try:
        t0 = time.monotonic()
        with caplog.at_level(logging.DEBUG):
            res = j.score(["4", "7", "unparseable", "8"], columns(["4"] * 4))
        took = time.monotonic() - t0
        assert took < 2.0 + 0.5, took  # the hang costs the deadline, no more
        assert res.scores == [1.0, None, None, None]
        assert res.timeouts == [1] and res.invalid == [2] and res.errors == [3]
        # the echoing proxy quoted the key back: it reaches no error text
        assert KEY not in res.first_error and KEY not in caplog.text
    finally:
        j.close()
    fake.fault_fn = lambda prompt: "echo-500"
    j = judge(fake, deadline_s=20.0, retries=1).open(KEY)
    try:
        res = j.score(["4"], columns(["4"]))
        assert res.errors == [0] and "HTTP 500" in res.first_error and "after 2 tries" in res.first_error
        assert "***" in res.first_error and KEY not in res.first_error
    finally:
        j.close()


def test_an_endpoint_down_mid_run_fails_its_completions_and_the_next_call_is_bounded(fake):
    j = judge(fake, deadline_s=3.0, retries=8).open(KEY)
    try:
        assert j.score(["4"], columns(["4"])).scores == [1.0]
        fake.close()  # the judge's server goes away
        t0 = time.monotonic()
        res = j.score(["5", "6"], columns(["4", "4"]))
        assert res.scores == [None, None] and len(res.errors) + len(res.timeouts) == 2
        assert time.monotonic() - t0 < 3.0 + 0.5
        assert "127.0.0.1" in res.first_error
    finally:
        j.close()


def test_the_rate_limit_and_the_concurrency_limit_hold_at_the_server(fake):
    fake.delay_s = 0.3
    j = judge(fake, max_concurrency=3, deadline_s=60.0).open(KEY)
    try:
        j.score([str(i) for i in range(12)], columns(["4"] * 12))
        assert fake.max_in_flight == 3
    finally:
        j.close()
    fake.delay_s, fake.times = 0.0, []
    j = judge(fake, requests_per_second=4.0, max_concurrency=16, deadline_s=60.0).open(KEY)
    try:
        j.score([str(i) for i in range(13)], columns(["4"] * 13))
        # any 5 arrivals span a second (less the server's own scheduling jitter on a busy machine)
        spans = [b - a for a, b in zip(fake.times, fake.times[4:])]
        assert len(fake.times) == 13 and min(spans) >= 0.75, spans
        rate = (len(fake.times) - 1) / (fake.times[-1] - fake.times[0])
        assert 3.5 < rate <= 4.0 + 0.1, rate
    finally:
        j.close()


def test_a_2_rps_judge_never_holds_a_step_past_its_deadline(fake):
    j = judge(fake, requests_per_second=2.0, deadline_s=2.0).open(KEY)
    try:
        t0 = time.monotonic()
        res = j.score([str(i) for i in range(16)], columns(["4"] * 16))
        took = time.monotonic() - t0
        graded = [s for s in res.scores if s is not None]
        assert took < 2.0 + 0.3, took
        assert 4 <= len(graded) <= 5 and len(res.timeouts) == 16 - len(graded)  # 2/s for 2 s, then None
        assert res.counts["requests"] == len(fake.times) <= 5
    finally:
        j.close()


def test_scorer_actors_split_the_endpoint_limits_and_count_the_judge(fake):
    specs = [RewardSpec("judge", 1.0, {"model": "judge", "base_url": fake.url, "api_key_env": "R1RAY_TEST_JUDGE_KEY",
                                       "requests_per_second": 4.0, "deadline_s": 30.0}),
             RewardSpec("accuracy", 0.5)]
    cfg = ScorerConfig(num_actors=2, workers_per_actor=1)
    scorers = [RewardScorer(specs, cfg, keys={"R1RAY_TEST_JUDGE_KEY": KEY}) for _ in range(2)]
    try:
        def rollouts(offset):
            return [Rollout(f"p{offset + i}/0", f"p{offset + i}", [1], [2], [-0.1], [0], "stop",
                            text=f"\\boxed{{{offset + i}}}", columns={"prompt": "q", "solution": f"\\boxed{{{offset}}}"})
                    for i in range(6)]

        results = {}
        threads = [threading.Thread(target=lambda k=k: results.__setitem__(k, scorers[k].score(rollouts(10 * k))))
                   for k in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        # two scorers at 2/s each: 12 requests take 2.5 s at the server, and no second holds
        # more than 4 (one more where an arrival is late on a busy machine)
        busiest = max(sum(t <= u < t + 0.9 for u in fake.times) for t in fake.times)
        assert len(fake.times) == 12 and fake.times[-1] - fake.times[0] >= 2.5 - 0.15 and busiest <= 5, fake.times
        s = results[0]
        assert [x["judge"] for x in s.per_function] == [1.0] + [0.0] * 5
        assert s.rewards == [1.5] + [0.0] * 5  # judge 1.0 + accuracy 0.5 x 1.0
        assert s.stats["judge/calls"] == 6 and s.stats["judge/requests"] == 6 and s.stats["judge/errors"] == 0
    finally:
        for s in scorers:
            s.close()


def test_retry_after_in_seconds_dates_and_milliseconds():
    class E:
        def __init__(self, headers):
            self.response = type("R", (), {"headers": headers})()

    assert retry_after_s(E({"retry-after": "2"})) == 2.0
    assert retry_after_s(E({"retry-after-ms": "250"})) == 0.25
    assert 0 <= retry_after_s(E({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"})) == 0.0
    assert retry_after_s(E({})) is None and retry_after_s(ValueError()) is None
    assert RateLimit(None).interval == 0.0 and RateLimit(2).interval == 0.5


TINY = "configs/tiny-cpu.yaml"
SERVED = ("rewards=[{name: accuracy}, {name: judge, params: {serve: {replicas: 2, cpus_per_replica: 1.5}, "
          "deadline_s: 30}}]")


def test_a_recipe_judge_is_checked_placed_and_counted_before_any_actor_starts(monkeypatch):
    from r1ray.controllers.common.system import EVALUATE, placement_plan
    from r1ray.controllers.config import judge_keys, load_recipe
    from r1ray.controllers.config.schema import ConfigError
    from r1ray.controllers.grpo.reward_book import RewardBook

    r = load_recipe(TINY, [SERVED, "ray.num_cpus=6"])
    assert [(k, s.replicas) for k, s in r.judge_servers] == [(1, 2)]
    names = [b.name for b in placement_plan(r)]
    assert "judge-1-0" in names and "judge-1-1" in names
    assert not [b for b in placement_plan(r, EVALUATE) if b.name.startswith("judge")]  # r1ray eval starts none
    book = RewardBook.__new__(RewardBook)  # its budget alone: no actors
    book.names, book.sc = ["accuracy", "judge"], r.scorer
    book.deadlines = {"judge": 30.0}
    assert book.score_budget(4) == r.scorer.timeout_s * 2 + 30.0
    with pytest.raises(ConfigError, match="judge servers 3"):  # 2 x 1.5 CPUs on top of the recipe's 2
        load_recipe(TINY, [SERVED, "ray.num_cpus=4"])
    with pytest.raises(ConfigError, match=r"rewards\[1\].params.serve': got 'gpus'; accepted: replicas"):
        load_recipe(TINY, ["rewards=[{name: accuracy}, {name: judge, params: {serve: {gpus: 1}}}]"])
    with pytest.raises(ConfigError, match=r"rewards\[0\].params.serve.model': './no/judge' is not a folder here"):
        load_recipe(TINY, ["rewards=[{name: judge, params: {serve: {model: ./no/judge}}}]", "ray.num_cpus=4"])
    keyed = "rewards=[{name: judge, params: {model: m, base_url: 'http://h/v1', api_key_env: R1RAY_TEST_JUDGE}}]"
    monkeypatch.delenv("R1RAY_TEST_JUDGE", raising=False)
    with pytest.raises(ConfigError, match=r"rewards\[0\].params.api_key_env': the environment variable "
                                          "R1RAY_TEST_JUDGE is not set"):
        load_recipe(TINY, [keyed])
    monkeypatch.setenv("R1RAY_TEST_JUDGE", KEY)
    r = load_recipe(TINY, [keyed])
    keys = judge_keys(r)
    assert keys["R1RAY_TEST_JUDGE"].get_secret_value() == KEY and KEY not in repr(keys)
