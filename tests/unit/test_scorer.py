"""RewardScorer on real reward functions through the real VerifierPool (no Ray), and
RewardHealth on stats windows: misbehaving rewards are counted, logged once, and a
function that fails on every completion stops the run or is dropped."""
import logging
import math
import sys
from pathlib import Path

import pytest

from r1ray.actors.rollout import Rollout
from r1ray.actors.scorer import BrokenRewardError, RewardHealth, RewardScorer, RewardSpec, ScorerConfig, add_stats

pytestmark = pytest.mark.timeout(90)

NAMED = "plugin_rewards:returns_named_value"
BROKEN = "plugin_rewards:raises_every_time"
GOOD = "<think>a</think><answer>b</answer>"  # format scores 1.0


def _scored(scorer, rollouts):
    """What RewardScorer.score sends back, written onto the rollouts: (the rollouts, the stats)."""
    result = scorer.score(rollouts)
    return result.apply(rollouts), result.stats


def rollouts(texts):
    return [Rollout(f"p/{i}", "p", [1], [2], [0.0], [0], "stop", text=t) for i, t in enumerate(texts)]


@pytest.fixture(scope="module")
def plugins_importable():
    # tests/plugin_rewards.py, by import path: the folder goes on sys.path before any
    # pool starts (spawned workers copy it), as the e2e tests do with PYTHONPATH.
    folder = str(Path(__file__).parents[1])  # tests/: plugin_rewards
    sys.path.insert(0, folder)
    yield
    sys.path.remove(folder)


@pytest.fixture
def make_scorer(plugins_importable):
    """A scorer of (name, weight) pairs, one worker each; each its own pool, so its own log-once state."""
    made = []

    def make(*specs):
        made.append(RewardScorer([RewardSpec(name, weight) for name, weight in specs],
                                 ScorerConfig(workers_per_actor=1, timeout_s=5.0)))
        return made[-1]

    yield make
    for s in made:
        s.close()


def test_a_reward_gets_completion_ids_as_lists_of_ints(make_scorer):
    """The generator's rollouts carry their ids as int32 arrays (cheap through the driver); reward
    functions get lists of Python ints, as TRL passes them."""
    import numpy as np

    scorer = make_scorer(("plugin_rewards:ids_are_lists", 1.0))
    rs = [Rollout("p/0", "p", [1], np.array([5, 6, 7], np.int32), [0.0] * 3, [0] * 3, "stop", text="a"),
          Rollout("p/1", "p", [1], [8, 9], [0.0] * 2, [0] * 2, "stop", text="b")]
    scored, stats = _scored(scorer, rs)
    assert [r.reward for r in scored] == [1.0, 1.0], stats


def _records(caplog, name):
    return [r for r in caplog.records if r.name == "r1ray.rewards" and repr(name) in r.getMessage()]


def test_values_that_are_not_scores_score_none_and_are_counted(make_scorer, caplog):
    caplog.set_level(logging.WARNING, logger="r1ray.rewards")
    scorer = make_scorer((NAMED, 1.0), ("format", 0.5))
    texts = ["nan", "inf", "-inf", "str", "bool", "list", "dict", "none", GOOD]
    scored, stats = _scored(scorer, rollouts(texts))
    assert [r.scores[NAMED] for r in scored] == [None] * 8 + [1.0]
    assert all(math.isfinite(r.reward) for r in scored)
    assert [r.reward for r in scored] == [0.0] * 8 + [1.5]  # None adds nothing; format adds 0.5 to the last
    assert {k: v for k, v in stats.items() if k.startswith(NAMED)} == {
        f"{NAMED}/calls": 9, f"{NAMED}/errors": 0, f"{NAMED}/invalid": 7, f"{NAMED}/timeouts": 0,
        f"{NAMED}/first_error": "sample 'p/0': returned float nan, which is not a score "
                                "(accepted: a finite int or float, or None for not applicable)"}
    assert stats["format/calls"] == 9 and stats["format/invalid"] == 0 and "format/first_error" not in stats
    assert isinstance(stats["time_s"], float)
    assert len(_records(caplog, NAMED)) == 1  # seven invalid values, one record


def test_a_reward_that_always_raises_is_counted_logged_once_and_found_broken(make_scorer, caplog):
    caplog.set_level(logging.WARNING, logger="r1ray.rewards")
    scorer = make_scorer((BROKEN, 1.0), ("format", 0.5))
    health = RewardHealth([s.name for s in scorer.specs], max_failed_steps=2, on_broken="fail")
    for step in range(2):
        window = {}
        for _ in range(2):  # two score() calls in each learner step
            scored, stats = _scored(scorer, rollouts([GOOD] * 4))
            assert [r.scores[BROKEN] for r in scored] == [None] * 4
            assert [r.reward for r in scored] == [0.5] * 4  # the other rewards still count
            assert stats[f"{BROKEN}/errors"] == stats[f"{BROKEN}/calls"] == 4
            add_stats(window, stats)
        assert window[f"{BROKEN}/errors"] == 8 and window[f"{BROKEN}/first_error"].startswith("sample 'p/0'")
        if step == 0:
            assert health.end_step(window) == []
    with pytest.raises(BrokenRewardError) as e:
        health.end_step(window)
    message = str(e.value)
    assert f"reward {BROKEN!r} failed on every completion for 2 consecutive learner steps" in message
    assert "KeyError: 'solution' (at plugin_rewards.py:" in message and "8 errors" in message
    assert (e.value.reward, e.value.steps) == (BROKEN, 2)
    # Sixteen failed completions: one log record, no traceback.
    [record] = _records(caplog, BROKEN)
    assert "KeyError: 'solution'" in record.getMessage() and "Traceback" not in caplog.text


def test_drop_removes_a_reward_from_later_calls(make_scorer):
    scorer = make_scorer((BROKEN, 1.0), ("format", 1.0))
    assert scorer.score(rollouts([GOOD])).stats[f"{BROKEN}/errors"] == 1
    scorer.drop(BROKEN)
    scorer.drop(BROKEN)  # every scorer is told; telling twice is harmless
    scored, stats = _scored(scorer, rollouts([GOOD, "no"]))
    assert [r.scores for r in scored] == [{"format": 1.0}, {"format": 0.0}]
    assert sorted(stats) == ["format/calls", "format/errors", "format/invalid", "format/timeouts", "time_s"]
    with pytest.raises(ValueError, match="no reward 'acuracy'; configured: 'format'"):
        scorer.drop("acuracy")


# ---- RewardHealth on windows ------------------------------------------------


def window(name, calls, errors=0, invalid=0, timeouts=0, example=None):
    w = {f"{name}/calls": calls, f"{name}/errors": errors, f"{name}/invalid": invalid, f"{name}/timeouts": timeouts}
    if example:
        w[f"{name}/first_error"] = example
    return w


def failed(name, calls=4, example="sample 'p/0': raised KeyError: 'solution'"):
    return window(name, calls, errors=calls - 1, timeouts=1, example=example)


def test_fails_after_max_failed_steps_consecutive_all_failed_steps():
    health = RewardHealth(["acc", "fmt"], max_failed_steps=3)
    for _ in range(2):
        assert health.end_step({**failed("acc"), **window("fmt", 4)}) == []
    with pytest.raises(BrokenRewardError, match=r"reward 'acc' failed on every completion for 3 consecutive "
                                                r"learner steps \(last step: 4 calls, 3 errors, 0 invalid, "
                                                r"1 timeouts\); example: sample 'p/0': raised KeyError"):
        health.end_step({**failed("acc"), **window("fmt", 4)})


def test_one_good_score_resets_the_count_and_a_step_without_calls_changes_nothing():
    health = RewardHealth(["acc"], max_failed_steps=2)
    steps = [failed("acc"), window("acc", 4, errors=3), failed("acc"), {}, window("acc", 0)]
    assert [health.end_step(w) for w in steps] == [[]] * 5
    assert health.failed_steps["acc"] == 1
    with pytest.raises(BrokenRewardError, match="for 2 consecutive"):
        health.end_step(failed("acc"))


def test_drop_mode_returns_the_broken_function_once_and_keeps_the_others():
    health = RewardHealth(["acc", "fmt"], max_failed_steps=2, on_broken="drop")
    assert health.end_step({**failed("acc"), **failed("fmt")}) == []
    assert health.end_step({**failed("acc"), **window("fmt", 4)}) == ["acc"]
    assert health.active == ["fmt"]
    assert health.end_step({**failed("acc"), **window("fmt", 4)}) == []  # dropped: no longer watched


def test_drop_mode_stops_when_no_function_would_be_left():
    health = RewardHealth(["acc", "fmt"], max_failed_steps=1, on_broken="drop")
    with pytest.raises(BrokenRewardError, match="reward 'acc'.*nothing would be left to train on"):
        health.end_step({**failed("acc"), **failed("fmt")})


def test_max_failed_steps_zero_never_stops():
    health = RewardHealth(["acc"], max_failed_steps=0)
    assert all(health.end_step(failed("acc")) == [] for _ in range(50))


def test_bad_settings_and_prefixed_keys_are_refused_clearly():
    with pytest.raises(ValueError, match=r"on_broken must be 'fail' or 'drop', got 'skip'"):
        RewardHealth(["acc"], on_broken="skip")
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="max_failed_steps must be an integer >= 0"):
            RewardHealth(["acc"], max_failed_steps=bad)
    with pytest.raises(ValueError, match="keys must be as RewardScorer.score returns them"):
        RewardHealth(["acc"]).end_step({"reward/acc/calls": 4, "reward/acc/errors": 4})


def test_add_stats_sums_counts_and_keeps_the_first_example():
    w = add_stats({}, {**failed("acc", example="first"), "time_s": 0.5})
    add_stats(w, {**failed("acc", example="second"), "time_s": 0.25})
    assert w == {"acc/calls": 8, "acc/errors": 6, "acc/invalid": 0, "acc/timeouts": 2, "acc/first_error": "first",
                 "time_s": 0.75}
