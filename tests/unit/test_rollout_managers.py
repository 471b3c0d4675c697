"""Rollout managers (``grpo.rollout_managers``) on the simulated fleet: the driver's own code
with the real ``RolloutManager`` in-process (benchmarks/simfleet.py: ``SimManager``). The same
steps as without them, fewer calls from the driver, and losses under a manager handled as
the driver handles them without one (no Ray, no model; seconds)."""
import sys
from collections import Counter
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from simfleet import QWEN_7B, WALL0, Fleet, GpuCosts, Lengths, run_driver, run_logged  # noqa: E402

from r1ray.controllers.config import ConfigError, load_recipe  # noqa: E402

RECIPE = "configs/qwen2.5-math-7b-grpo-h100.yaml"


def _recipe(*sets):
    return load_recipe(RECIPE, ["generator.num_actors=8", "scorer.num_actors=2", "grpo.prompts_per_step=32", *sets],
                       cpus=1e9, gpus=1e9)


def _run(r, seed=4, at=None, kill=None, spans=None):
    """A run on the simulated 7B fleet: (fleet, driver, records, samples.jsonl's lines); ``kill(fleet)``
    runs ``at`` simulated seconds in."""
    fleet = Fleet(r, GpuCosts(QWEN_7B, start_s=20.0), Lengths(1024, 300), seed=seed)
    if kill is not None:
        fleet.tr.later(at, lambda: kill(fleet))
    driver, records, lines = run_logged(r, fleet, prompt_tokens=lambda rng: 200, spans=spans)
    return fleet, driver, records, lines


def _killer(group: str, i: int, killed: dict):
    """What kills actor ``i`` of ``group`` (e.g. "generators"), counting its calls in flight then."""
    def kill(fleet):
        actor = getattr(fleet.system, group).actors[i]
        killed["calls"] = len(actor.calls)
        actor.kill()
    return kill


def _consumed_once(r, records, lines):
    ids = [line["sample_id"] for line in lines]
    assert len(ids) == len(set(ids)) == r.grpo.steps * r.grpo.prompts_per_step * r.grpo.num_generations
    assert set(Counter(i.rsplit("/", 1)[0] for i in ids).values()) == {r.grpo.num_generations}  # whole groups
    assert [x["step"] for x in records] == list(range(1, r.grpo.steps + 1))


def test_managers_run_the_same_synchronous_steps_with_fewer_driver_calls():
    """max_staleness 0: with two managers the steps train on the same prompts, in the same
    order, as the driver alone, and take the same time to 1% (a manager's report adds Ray's
    dispatch latency, and each manager answers at once with the last group the batch waits
    for); the driver makes about half the calls; every group went through a manager."""
    base = _recipe("grpo.max_staleness=0", "grpo.steps=5")
    managed = _recipe("grpo.max_staleness=0", "grpo.steps=5", "grpo.rollout_managers=2")
    fleet0, _, records0, lines0 = _run(base)
    fleet, driver, records, lines = _run(managed)
    _consumed_once(managed, records, lines)

    def prompts(ls):
        return [(x["step"], x["sample_id"].rsplit("/", 1)[0]) for x in ls]

    assert prompts(lines) == prompts(lines0)
    for a, b in zip(records, records0):
        assert a["time/step_s"] == pytest.approx(b["time/step_s"], rel=0.01)
        assert a["staleness/max"] == 0
    calls = fleet.tr.calls["remote calls"]
    assert calls < 0.6 * fleet0.tr.calls["remote calls"]
    managers = fleet.system.managers.actors
    made = sum(m.ray_calls["remote calls"] for m in managers)
    assert made == 3 * 5 * 32  # generate, score, reference: one call a group (8 generators, 4 groups each)
    assert all(m.ray_calls["remote calls"] > 0 for m in managers)
    assert all(x["managers/reports"] >= 1 for x in records)


def test_managers_keep_the_staleness_bound_and_the_pace_when_streaming():
    """max_staleness 1: the bound holds on every sample, and the steady steps are as fast as the
    driver alone's within 5% (a manager reports what is not urgent once a second)."""
    r0 = _recipe("grpo.max_staleness=1", "grpo.steps=8")
    r = _recipe("grpo.max_staleness=1", "grpo.steps=8", "grpo.rollout_managers=2")
    _, _, records0, _ = _run(r0)
    _, driver, records, lines = _run(r)
    _consumed_once(r, records, lines)
    assert max(driver.books.histogram) == 1
    steady0, steady = (sum(x["time/step_s"] for x in rs[2:]) for rs in (records0, records))
    assert steady == pytest.approx(steady0, rel=0.05)


def test_a_generator_lost_under_a_manager_has_its_groups_generated_again():
    """generator-0 dies while its manager holds its generate calls: the manager reports them,
    the driver re-queues them and replaces the generator, which joins through a sync; nothing
    is lost or trained on twice, and the staleness bound holds."""
    r = _recipe("grpo.max_staleness=1", "grpo.steps=8", "grpo.rollout_managers=2")
    killed = {}
    fleet, driver, records, lines = _run(r, at=5.0, kill=_killer("generators", 0, killed))
    assert killed["calls"] >= 1
    assert dict(driver.elastic.counts) == {"generator/lost": 1, "generator/restarted": 1}
    assert fleet.system.generators.incarnation[0] == 1 and fleet.system.generators.state[0] == "ready"
    assert sum(x.get("groups/requeued", 0) for x in records) >= 1
    _consumed_once(r, records, lines)
    assert max(driver.books.histogram) <= 1


def test_two_generators_of_one_manager_lost_at_once_lose_nothing():
    """generator-0 and generator-2 (both under manager 0) die together, as a node's would: the
    report that names the first re-queues its groups, which may go to the second before the same
    report names it too; those are taken back before they are sent, and no call reaches a
    replacement before it joined (on Ray such a call waits for the actor to start, for ever
    where no node has room for it). Nothing is lost or trained on twice."""
    r = _recipe("grpo.max_staleness=1", "grpo.steps=8", "grpo.rollout_managers=2")

    def kill(fleet):
        for i in (0, 2):
            fleet.system.generators.actors[i].kill()

    spans = []
    fleet, driver, records, lines = _run(r, at=5.0, kill=kill, spans=spans)
    assert dict(driver.elastic.counts) == {"generator/lost": 2, "generator/restarted": 2}
    for name in ("generator-0", "generator-2"):  # (the replacements start 20 s after they were lost)
        assert not [sp for sp in spans if sp["actor"] == name and sp["kind"] == "generate"
                    and WALL0 + 5.0 < sp["t0"] < WALL0 + 25.0]
    assert fleet.system.generators.incarnation[:3] == [1, 0, 1]
    _consumed_once(r, records, lines)
    assert max(driver.books.histogram) <= 1


def test_a_generator_the_driver_replaces_first_leaves_nothing_behind_in_its_manager():
    """The driver's watchdog finds generator-0 silent and replaces it before its manager reports
    anything: the driver re-queues the calls it had sent there; the manager then reports them
    failed (ignored) or generated (forgotten, and whatever it still carries of them is never
    reported): every prompt is trained on once."""
    r = _recipe("grpo.max_staleness=1", "grpo.steps=8", "grpo.rollout_managers=2", "grpo.manager_report_s=3")

    def replace_it(fleet):
        fleet.driver.elastic.actor_lost(fleet.system.generators, 0, "no answer to a ping within 45 s")

    fleet, driver, records, lines = _run(r, at=9.0, kill=replace_it)
    assert dict(driver.elastic.counts) == {"generator/lost": 1, "generator/restarted": 1}
    assert sum(x.get("groups/requeued", 0) for x in records) >= 1
    assert sum(len(m.manager.forgotten) for m in fleet.system.managers.actors) >= 1
    _consumed_once(r, records, lines)


def test_a_scorer_lost_under_a_manager_is_replaced_and_its_groups_scored_again():
    """reward-scorer-0 dies (scoring takes milliseconds: the next call a manager sends it fails):
    the manager reports it, the only way the simulated driver learns of it (its pings answer
    nothing here), and scores those groups on the other scorer; the driver replaces it; every
    sample has a reward."""
    r = _recipe("grpo.max_staleness=1", "grpo.steps=6", "grpo.rollout_managers=2")
    fleet, driver, records, lines = _run(r, at=12.0, kill=_killer("scorers", 0, {}))
    assert dict(driver.elastic.counts) == {"reward-scorer/lost": 1, "reward-scorer/restarted": 1}
    assert fleet.system.scorers.incarnation[0] == 1
    _consumed_once(r, records, lines)
    assert all(line["reward"] is not None for line in lines)


def test_time_the_driver_spends_evaluating_is_added_to_the_managers_deadlines():
    """A step's evaluation (eval.every_steps) holds the driver's loop, and the generators serve it:
    the driver gives its own work in flight that time (InFlight.postpone) and, with managers,
    theirs, through their next orders."""
    r = _recipe("grpo.max_staleness=1", "grpo.steps=3", "grpo.rollout_managers=2")
    seen = {}

    def evaluated(fleet):
        seen["before"] = {w: w.deadline for a in fleet.system.managers.actors for w in a.manager.inflight.work}
        fleet.driver.managers.postpone(500.0)

    def check(fleet):
        seen["after"] = {w: w.deadline for a in fleet.system.managers.actors for w in a.manager.inflight.work}

    fleet = Fleet(r, GpuCosts(QWEN_7B), Lengths(1024, 300), seed=4)
    fleet.tr.later(5.0, lambda: evaluated(fleet))
    fleet.tr.later(6.0, lambda: check(fleet))
    run_driver(r, fleet, prompt_tokens=lambda rng: 200)
    kept = [w for w in seen["before"] if w in seen["after"]]
    assert kept and all(seen["after"][w] == pytest.approx(seen["before"][w] + 500.0) for w in kept)


@pytest.mark.parametrize("sets, message", [
    (["grpo.completions_per_request=2"], r"'grpo.rollout_managers': got 2 with grpo.completions_per_request; "
                                         r"accepted: 0 there \(a group in parts"),
    (["placement.mode=colocate", "grpo.max_staleness=0", "generator.num_actors=4"], r"'grpo.rollout_managers': got 2 with placement.mode: colocate; accepted: 0 there"),
    (["grpo.rollout_managers=9"], r"got 9 with generator.max_actors 8; accepted: at most one manager per generator"),
    (["grpo.manager_report_s=0"], r"'grpo.manager_report_s'"),
])
def test_setups_whose_chain_needs_the_driver_are_refused_with_managers(sets, message):
    with pytest.raises(ConfigError, match=message):
        _recipe("grpo.rollout_managers=2", *sets)
