"""The GRPO driver's records: a step's figures and samples.jsonl lines against a plain
computation, and its progress as a checkpoint's driver.json saves it and a resumed run restores it."""
import json
import math
import random
import statistics
from collections import Counter

import pytest

from r1ray.actors.rollout import Rollout, TokenIds
from r1ray.controllers.grpo.groups import Group
from r1ray.controllers.grpo.records import Progress, rollout_metrics, sample_lines


def _batch(seed=0, groups=6, G=4):
    """Groups of G rollouts: rewards with ties (some groups all equal), a reward function that
    skips some samples (None), versions that are one policy's or two (interrupted)."""
    rng = random.Random(seed)
    out = []
    for g in range(groups):
        same = g % 3 == 0
        rollouts = []
        for k in range(G):
            n = rng.randint(1, 40)
            versions = [g] * n if k % 2 else [g] * (n // 2) + [g + 1] * (n - n // 2)
            r = Rollout(f"p{g}/{k}", f"p{g}", [1, 2, 3], TokenIds.of(range(n)), [-0.5] * n, versions,
                        "length" if n == 40 else "stop")
            r.reward = 1.0 if same else rng.choice([0.0, 0.5, 1.0, 1.25])
            r.scores = {"accuracy": r.reward, "format": None if k == 0 else rng.random()}
            rollouts.append(r)
        out.append(Group(g, {"prompt_id": f"p{g}"}, admitted_at=max(0, g - 1), rollouts=rollouts))
    return out


def test_a_steps_figures_and_lines_equal_a_plain_computation():
    groups, G = _batch(), 4
    rollouts = [r for g in groups for r in g.rollouts]
    lines = sample_lines(7, 9, groups)
    want = [(r.sample_id, min(r.versions), max(r.versions), len(r.completion_ids), g.admitted_at)
            for g in groups for r in g.rollouts]
    assert [(x["sample_id"], x["min_version"], x["max_version"], x["tokens"], x["admitted_at"]) for x in lines] == want
    assert all(x["step"] == 7 and x["trained_at"] == 9 for x in lines)
    m = rollout_metrics(rollouts, ["accuracy", "format"], G, [x["tokens"] for x in lines])
    rewards = [r.reward for r in rollouts]
    fmt = [r.scores["format"] for r in rollouts if r.scores["format"] is not None]
    lens = [len(r.completion_ids) for r in rollouts]
    assert m["reward/mean"] == pytest.approx(statistics.fmean(rewards), abs=1e-12)
    assert m["reward/std"] == pytest.approx(statistics.pstdev(rewards), abs=1e-12)
    assert m["reward/format/mean"] == pytest.approx(statistics.fmean(fmt), abs=1e-12)
    assert m["reward/format/std"] == pytest.approx(statistics.pstdev(fmt), abs=1e-12)
    assert m["completion_len/mean"] == pytest.approx(statistics.fmean(lens)) and m["completion_len/max"] == max(lens)
    zero_std = [len({r.reward for r in g.rollouts}) == 1 for g in groups]
    assert m["groups/zero_std_ratio"] == sum(zero_std) / len(groups) == 2 / 6
    one = rollout_metrics(rollouts[:1], ["accuracy", "format"], 1, lens[:1])
    assert one["reward/std"] == 0.0 and math.isnan(one["reward/format/mean"])  # (the first sample has no format)


def test_progress_saved_and_restored_keeps_its_totals_and_reads_an_older_checkpoint():
    done = Progress(4, prompts_consumed=6, taken0=2, counts=Counter({"groups/dropped": 1}), tokens=50)
    state = json.loads(json.dumps(done.state(step=3, version=4, last_seq=7, histogram=Counter({0: 8, 1: 16}),
                                             reward_names=["accuracy"])))
    back = Progress.restore({**state, "records": [{"step": s} for s in (1, 2, 3)]}, 4)
    assert (back.samples, back.taken0, back.tokens, back.counts) == (24, 10, 50, Counter({"groups/dropped": 1}))
    assert back.histogram == Counter({0: 8, 1: 16}) and back.reward_names == ["accuracy"]
    # a checkpoint written before the count: the ids of the prompts consumed, read as their number
    older = {k: v for k, v in state.items() if k != "prompts_consumed"}
    older.update(consumed_prompts=[f"train-{i}.0" for i in range(6)], records=[])
    assert Progress.restore(older, 4).samples == 24
    # the driver's state does not grow with the run: a count, not each prompt's id
    many = done.state(step=3, version=4, last_seq=7, histogram=Counter(), reward_names=[])
    done.prompts_consumed = 10**6
    assert len(json.dumps(done.state(step=3, version=4, last_seq=7, histogram=Counter(), reward_names=[]))) \
        <= len(json.dumps(many)) + 6
