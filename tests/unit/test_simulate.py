"""The fleet simulator (benchmarks/simfleet.py): its devices against hand computations, and the
GRPO driver's own code on it (no Ray, no model; seconds)."""
import itertools
import math
import sys
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from simfleet import (  # noqa: E402
    QWEN_7B,
    WALL0,
    CpuCosts,
    Fleet,
    GpuCosts,
    Job,
    Lengths,
    Pool,
    Ref,
    SimGroup,
    SimTransport,
    VllmDevice,
    call_payload,
    fit_cpu_costs,
    payload,
    read_timeline,
    run_driver,
    run_logged,
)

from r1ray.cluster.groups import RemoteCallError  # noqa: E402
from r1ray.controllers.common.runlog import MetricsWriter, read_jsonl  # noqa: E402
from r1ray.controllers.config import ConfigError, load_recipe  # noqa: E402
from r1ray.controllers.grpo.telemetry import utilisation  # noqa: E402


class _Actor:
    def __init__(self, name):
        self.name, self.spans, self.open = name, [], {}

    def span(self, kind, t0, t1, args=None):
        self.spans.append((kind, t0, t1))


def _done_at(tr: SimTransport, refs: list) -> list[float]:
    times = {}
    for r in refs:
        r.then.append(lambda r=r: times.setdefault(id(r), tr.t))
    tr.run_until(lambda: all(r.done for r in refs), math.inf)
    return [times[id(r)] for r in refs]


def test_pool_shares_its_cores_between_busy_actors():
    """Two actors on one core: both at half speed while both run (processor sharing); calls
    of one actor run one after another."""
    tr = SimTransport()
    pool, a, b = Pool(tr, cores=1.0), _Actor("a"), _Actor("b")
    refs = [Ref(), Ref(), Ref()]
    pool.submit(Job(refs[0], a, "x", 1.0))
    pool.submit(Job(refs[1], b, "x", 2.0))
    pool.submit(Job(refs[2], a, "x", 0.5))  # queued behind a's first call
    # 0-2 s: both at 1/2 -> a's first done at 2 s (b has 1 s left); a's second and b share
    # until a's is done at 3 s (b: 0.5 s left), b alone to 3.5 s
    assert _done_at(tr, refs) == pytest.approx([2.0, 3.5, 3.0])
    assert a.spans == [("x", 0.0, 2.0), ("x", 2.0, 3.0)]


class _FlatCosts:
    def decode_step(self, running, context):
        return 0.01

    def prefill(self, tokens):
        return 0.0


def test_vllm_device_decodes_in_steps_and_pauses_for_updates():
    tr = SimTransport()
    dev, actor = VllmDevice(tr, _FlatCosts(), max_num_seqs=2), _Actor("g")
    call, late = Ref(), Ref()
    dev.submit(Job(call, actor, "generate", 0.0), [(5, 10, "p"), (5, 30, "p")])
    dev.submit(Job(late, actor, "generate", 0.0), [(5, 10, "q")])  # waits for a free slot (max_num_seqs 2)
    assert _done_at(tr, [call, late]) == pytest.approx([0.30, 0.20])  # 'late' starts at 0.10
    # keep: the running sequence pauses 0.5 s mid-request; wait: it finishes first
    for mode, expect in (("keep", 0.65), ("wait", 0.15)):
        tr = SimTransport()
        dev = VllmDevice(tr, _FlatCosts(), max_num_seqs=8)
        first, after = Ref(), Ref()
        dev.submit(Job(first, actor, "generate", 0.0), [(5, 15, "p")])
        landed = []
        tr.later(0.05, lambda: dev.update(0.5, mode, lambda t0, t1: landed.append((t0, t1))))
        tr.later(0.06, lambda: dev.submit(Job(after, actor, "generate", 0.0), [(5, 1, "q")]))
        done = _done_at(tr, [first, after])
        assert done[0] == pytest.approx(expect)
        assert landed == [pytest.approx((0.05, 0.55) if mode == "keep" else (0.15, 0.65))]
        assert done[1] == pytest.approx(0.56 if mode == "keep" else 0.66)  # admitted after the update


class _PrefillCosts(_FlatCosts):
    def prefill(self, tokens):
        return 0.001 * tokens


def test_vllm_device_preempts_the_newest_sequence_when_its_kv_cache_is_full():
    """A KV cache of 100 tokens, two sequences of a 20-token prompt (prefilled once: 0.02 s)
    and 50 tokens each: at 0.32 s both hold 50 and the next step does not fit, so the newer is
    preempted and waits; the other ends at 0.52 s, then the preempted one is admitted again,
    its 50 tokens prefilled again (0.05 s), and decodes its last 20 by 0.77 s. Without the
    bound, both end at 0.52 s."""
    for kv, expect, preempted in ((100, 0.77, 1), (math.inf, 0.52, 0)):
        tr = SimTransport()
        dev, call = VllmDevice(tr, _PrefillCosts(), max_num_seqs=8, kv_tokens=kv), Ref()
        dev.submit(Job(call, _Actor("g"), "generate", 0.0), [(20, 50, "p"), (20, 50, "p")])
        assert _done_at(tr, [call]) == pytest.approx([expect])
        assert (dev.preempted, dev.peak_waiting) == (preempted, preempted)
        assert dev.peak_kv == pytest.approx(min(kv, 140))
    # a prompt that can never fit is an error, not a run that waits for ever
    tr = SimTransport()
    dev = VllmDevice(tr, _PrefillCosts(), max_num_seqs=8, kv_tokens=100)
    with pytest.raises(RuntimeError, match="a prompt of 120 tokens does not fit the engine's KV cache of 100 tokens"):
        dev.submit(Job(Ref(), _Actor("g"), "generate", 0.0), [(120, 5, "p")])


def test_kv_cache_of_the_recipes_engines():
    """vLLM's KV cache: gpu_memory_utilization of an H100's 79.2 GiB, less 3 GB and the
    weights, over K and V of every layer (bf16): 7B at 0.7, 57,344 bytes a token; 1.5B at
    0.85, 28,672."""
    from simfleet import QWEN_1_5B

    assert GpuCosts(QWEN_7B).kv_tokens(0.7) == pytest.approx((0.7 * 79.2 * 2**30 - 3e9 - 15.2e9) / 57344)
    assert GpuCosts(QWEN_1_5B).kv_tokens(0.85) == pytest.approx(2.309e6, rel=1e-3)
    # tensor parallel: the cache over both GPUs, the weights once
    assert GpuCosts(QWEN_7B).kv_tokens(0.7, 2) == pytest.approx((2 * (0.7 * 79.2 * 2**30 - 3e9) - 15.2e9) / 57344)


def _tiny(*sets):
    return load_recipe("tiny-cpu", ["ray.dashboard=false", *sets])


def _cpu_costs(**kw):
    return CpuCosts({"generate": 0.4, "train": 0.3, "export_weights": 0.02, "load_weights": 0.01},
                    {"score": 0.001, "ref_logprobs": 0.002}, {}, cores=math.inf, **kw)


def test_fitted_lengths_give_back_the_published_mean_and_truncation():
    # the verl GRPO step the 7B scenarios are fitted to: mean 424.5 tokens, 7.37% at the 1,024 cap
    lengths = Lengths.fitted(1024, 424.5, 0.0737, prompt_share=0.45)
    assert lengths.prompt_sigma ** 2 / (lengths.prompt_sigma ** 2 + lengths.sigma ** 2) == pytest.approx(0.45)
    drawn = lengths.stats(draws=160_000, seed=1)
    assert drawn["mean"] == pytest.approx(424.5, abs=3)  # the draws are whole tokens (rounded down)
    assert drawn["truncated"] == pytest.approx(0.0737, abs=0.003)
    with pytest.raises(ValueError, match="no log-normal cut at 1024 has mean 50 "):
        Lengths.fitted(1024, 50, 0.0737)  # 7.37% at the cap alone gives a mean of 75


def test_the_1_5b_lengths_are_deepscalers_at_8k_cut_at_the_recipes_cap():
    from simulate import LENGTHS_1_5B  # (benchmarks/ is on the path, above)

    assert LENGTHS_1_5B.cap == 4096
    at_8k = replace(LENGTHS_1_5B, cap=8192).stats(draws=160_000, seed=1)
    assert at_8k["mean"] == pytest.approx(3500, rel=0.01)  # DeepScaleR's 8K run: about 3,500 tokens, 4.2% clipped
    assert at_8k["truncated"] == pytest.approx(0.042, abs=0.003)
    at_4k = LENGTHS_1_5B.stats(draws=160_000, seed=1)
    assert at_4k["mean"] == pytest.approx(2977, rel=0.01)  # docs/simulator.md's figures for the recipe's cap
    assert at_4k["truncated"] == pytest.approx(0.31, abs=0.01)


def test_the_long_trace_lengths_have_the_distilled_models_mean_at_8k():
    """The 16K recipe starts from the model as distilled: DeepScaleR's 8K stage began at a mean
    of about 5,500 tokens; the fit's spreads kept, the median moved to that mean."""
    from simulate import LENGTHS_1_5B, LENGTHS_1_5B_DISTILLED

    assert LENGTHS_1_5B_DISTILLED.cap == 16384
    assert (LENGTHS_1_5B_DISTILLED.sigma, LENGTHS_1_5B_DISTILLED.prompt_sigma) == (LENGTHS_1_5B.sigma,
                                                                                  LENGTHS_1_5B.prompt_sigma)
    assert replace(LENGTHS_1_5B_DISTILLED, cap=8192).stats(draws=160_000, seed=1)["mean"] == pytest.approx(5500, rel=0.01)
    at_16k = LENGTHS_1_5B_DISTILLED.stats(draws=160_000, seed=1)  # docs/simulator.md's figures
    assert at_16k["mean"] == pytest.approx(6270, rel=0.01)
    assert at_16k["truncated"] == pytest.approx(0.026, abs=0.003)
    with pytest.raises(ValueError, match="no median gives a mean of 8200 cut at 8192"):
        LENGTHS_1_5B.with_mean(8200, at_cap=8192)


def test_validation_pools_repeated_runs_without_overlapping_them_and_takes_medians(tmp_path):
    """simulate.py validate --repeat: each run's clock starts at 0, so their timelines are laid
    one after the other before the costs are fitted (overlaid, the processor sharing would halve
    every call's solo seconds); the dispatch latency is the median of every run's gaps, each
    measured figure the median of the runs."""
    import json

    from simulate import measured_runs, median_of, pooled_spans

    def timeline(run, gen_s, gap_s):  # generate, then score after Ray's dispatch gap, then train; twice
        events = [{"ph": "M", "tid": 1, "args": {"name": "generator-0"}},
                  {"ph": "M", "tid": 2, "args": {"name": "scorer-0"}}, {"ph": "M", "tid": 3, "args": {"name": "learner-0"}}]
        t = 0.0
        for _ in range(2):
            events.append({"ph": "X", "tid": 1, "name": "generate", "ts": t * 1e6, "dur": gen_s * 1e6})
            t += gen_s + gap_s
            events.append({"ph": "X", "tid": 2, "name": "score", "ts": t * 1e6, "dur": 0.5e6, "args": {"samples": 8}})
            t += 0.5 + gap_s
            events.append({"ph": "X", "tid": 3, "name": "train", "ts": t * 1e6, "dur": 1e6})
            t += 1.0
        (tmp_path / run / "eta-0").mkdir(parents=True)
        (tmp_path / run / "eta-0" / "timeline.json").write_text(json.dumps({"traceEvents": events}))

    timeline("run-2", 1.0, 0.010)
    timeline("run-1", 3.0, 0.004)
    timeline("run-10", 2.0, 0.006)
    runs = measured_runs(tmp_path)
    assert [r.name for r in runs] == ["run-1", "run-2", "run-10"]
    spans, latency = pooled_spans(runs)
    assert latency == pytest.approx(0.006)
    assert all(a["t1"] <= b["t0"] for a, b in zip(spans, spans[1:]))  # one after the other: nothing overlaps
    costs = fit_cpu_costs(spans, 2.0, {"generate": 1.0, "score": 1.0, "train": 1.0})
    assert costs.per_call["generate"] == pytest.approx(2.0) and costs.per_call["train"] == pytest.approx(1.0) and costs.per_sample["score"] == pytest.approx(0.5 / 8)
    figures = [{"time_s": t, "samples_per_s": 100 / t, "busy": {"generator": b}} for t, b in ((40, .3), (50, .5), (45, .2))]
    m = median_of(figures)
    assert (m["time_s"], m["samples_per_s"], m["busy"]) == (45, 100 / 45, {"generator": .3}) and m["runs"] == figures
    with pytest.raises(SystemExit, match="no measured runs under"):
        measured_runs(tmp_path / "none")


def test_the_payload_counts_what_pickle_sends_through_the_driver():
    """Numbers in lists, arrays as one each; a group's shared prompt once an argument (Ray
    pickles each argument alone); a rollout's versions as its __getstate__ sends them."""
    import numpy as np

    from r1ray.actors.rollout import Rollout, TrainSample

    prompt = [1] * 300
    group = [Rollout(f"p/{k}", "p", prompt, [5] * 10, [-0.1] * 10, [2] * 10, "stop") for k in range(4)]
    mixed = Rollout("q/0", "q", [1] * 300, [5] * 10, [-0.1] * 10, [2] * 5 + [3] * 5, "stop")
    assert payload([*group, mixed]) == {"numbers": 300 + 4 * (10 + 10 + 2) + 300 + 3 * 10}
    samples = [TrainSample(r.prompt_ids, r.completion_ids, r.logprobs, 1.0, np.zeros(10, np.float32)) for r in group]
    assert payload(samples) == {"numbers": 300 + 4 * 20, "arrays": 4, "array numbers": 40}
    assert call_payload((samples[:2], samples[2:]), {"x": prompt}) == {"numbers": 3 * 300 + 4 * 20, "arrays": 4,
                                                                       "array numbers": 40}


def test_an_actor_call_is_checked_against_its_class_once_per_method_and_every_time():
    """A group's calls name their method as the class's function: another class's method of the
    same name, a lambda or a wrong argument list is refused each time, however often the right
    call was made before (the checks are cached per method and per shape)."""
    from r1ray.actors.generator import Generator
    from r1ray.actors.reference import Reference
    from r1ray.actors.scorer import RewardScorer

    group = SimGroup("reference", Reference, [], SimTransport(), 10.0)
    for _ in range(3):
        assert group._method(Reference.logprobs, ([],), {}) == "logprobs"
        assert group._method(Reference.ping, (), {}) == "ping"
        for wrong in (Generator.ping, RewardScorer.score, lambda samples: None):
            with pytest.raises(TypeError, match="is not a method of Reference; call methods as Reference.<method>"):
                group._method(wrong, ([],), {})
        with pytest.raises(TypeError, match=r"reference group: Reference.logprobs\(self, samples"):
            group._method(Reference.logprobs, ([], 1, 2), {})


def test_synchronous_step_time_is_the_sum_of_its_stages():
    """max_staleness 0 on unshared devices: a step is one generate call (16 groups), then score,
    reference, train, export and load in turn, plus Ray's dispatch before each work call."""
    r = _tiny("grpo.max_staleness=0", "grpo.steps=5")
    costs = _cpu_costs(latency_s=0.005)
    driver, records = run_driver(r, Fleet(r, costs, Lengths(48, 20)))
    samples = r.grpo.prompts_per_step * r.grpo.num_generations
    stages = 0.4 + 0.001 * samples + 0.002 * samples + 0.3 + 0.02 + 0.01
    dispatches = 5  # generate, score, reference, train, export (the load waits on the export, no latency after)
    for rec in records[1:]:
        assert rec["time/step_s"] == pytest.approx(stages + dispatches * 0.005, rel=1e-6)
        assert rec["samples"] == samples and rec["staleness/max"] == 0


def test_the_driver_on_the_clock_delays_each_call_by_its_turn():
    """charge_driver: priced at nothing, the run is the free driver's to the digit; at 50 ms a
    remote call, the synchronous steps (where every call is on the critical path until the
    next stage starts) take longer by at least the step's work calls' 50 ms each, at most by
    every call's of the step, and the clock got exactly the calls' price."""
    r = _tiny("grpo.max_staleness=0", "grpo.steps=5")

    def run(price):
        fleet = Fleet(r, _cpu_costs(latency_s=0.005), Lengths(48, 20))
        if price is not None:
            fleet.tr.charge_driver(price)
        return fleet.tr, run_driver(r, fleet)[1]

    _, free = run(None)
    tr0, zero = run(lambda cpu_s, calls: 0.0)
    assert [x["time/step_s"] for x in zero] == [x["time/step_s"] for x in free] and tr0.driver_s == 0
    tr, charged = run(lambda cpu_s, calls: 0.05 * calls["remote calls"])
    assert tr.driver_s == pytest.approx(0.05 * tr.calls["remote calls"])
    per_step = tr.calls["remote calls"] / len(charged)
    work_calls = 4 + r.learner.num_ranks  # generate, score, reference, export, a train call per rank
    for c, f in zip(charged[1:], free[1:]):
        assert 0.05 * work_calls - 1e-9 <= c["time/step_s"] - f["time/step_s"] <= 0.05 * per_step + 1e-9


def test_the_learner_gets_its_next_batch_before_the_step_is_written_down(tmp_path):
    """At η = 2 on the learner-bound 7B recipe the next batch is ready when a step ends: it goes
    to the learner right after the weights are published, before the step's samples.jsonl lines
    and record (its spans drained from every actor), which the learner need not wait for."""
    r = load_recipe("configs/qwen2.5-math-7b-grpo-h100.yaml",
                    ["grpo.max_staleness=2", "grpo.steps=6"], cpus=1e9, gpus=1e9)
    fleet = Fleet(r, GpuCosts(QWEN_7B), Lengths(1024, 300), seed=1)
    training_when_written = []

    class Samples(MetricsWriter):
        def write_many(self, records):
            training_when_written.append(fleet.driver.training)
            super().write_many(records)

    log = Samples(tmp_path, "samples.jsonl")
    _, records = run_driver(r, fleet, prompt_tokens=lambda rng: 200, samples_log=log)
    log.close()
    assert len(records) == 6 and training_when_written[1:-1] == [True] * 4  # (the last step has no next batch)
    per_step = r.grpo.prompts_per_step * r.grpo.num_generations
    steps = [x["step"] for x in read_jsonl(tmp_path / "samples.jsonl")]
    assert steps == [s for s in range(1, 7) for _ in range(per_step)]


def test_the_timeline_keeps_the_steps_logging_timeline_steps_lists(tmp_path):
    """logging.timeline_steps [2, 4]: timeline.json has the spans collected at the end of steps
    2 and 4 (synchronous: each step's generation, scoring, reference and training), the same
    ones as every span the driver drained; [] keeps none; a step out of range is refused."""
    def run(steps, name):
        r = _tiny("grpo.max_staleness=0", "grpo.steps=5", f"logging.timeline_steps={steps}")
        spans = []
        run_driver(r, Fleet(r, _cpu_costs(latency_s=0.005), Lengths(48, 20)), spans=spans, timeline=tmp_path / name)
        return r, spans, read_timeline(tmp_path / name)

    r, spans, kept = run([2, 4], "some.json")
    ranks = r.learner.num_ranks
    trains = sorted((sp for sp in spans if sp["kind"] == "train"), key=lambda sp: sp["t0"])
    assert len(trains) == 5 * ranks
    want = trains[ranks:2 * ranks] + trains[3 * ranks:4 * ranks]  # steps 2 and 4
    got = sorted((sp for sp in kept if sp["kind"] == "train"), key=lambda sp: sp["t0"])

    def shape(ss):  # (start after the first, length), as the timeline has them (from its first span)
        return [(round(sp["t0"] - ss[0]["t0"], 4), round(sp["t1"] - sp["t0"], 4)) for sp in ss]

    assert shape(got) == shape(want)
    assert {sp["kind"] for sp in kept} >= {"generate", "score", "ref_logprobs", "train"}
    assert sum(sp["kind"] == "generate" for sp in kept) == 2  # one synchronous generate call a step
    every = run("null", "all.json")[2]
    assert sum(sp["kind"] == "train" for sp in every) == 5 * ranks and len(every) > len(kept)
    assert run([], "none.json")[2] == []
    with pytest.raises(ConfigError, match=r"'logging.timeline_steps': got \[0, 6\] \(step 0\); accepted: GRPO steps "
                                          r"from 1 to grpo.steps \(5\)"):
        _tiny("grpo.steps=5", "logging.timeline_steps=[0, 6]")


@pytest.mark.parametrize("eta", [1, 2])
def test_the_driver_keeps_its_staleness_bound_and_overlaps_on_the_fleet(eta):
    r = _tiny(f"grpo.max_staleness={eta}", "grpo.steps=12")
    fleet = Fleet(r, _cpu_costs(), Lengths(48, 20))
    driver, records = run_driver(r, fleet)
    hist = driver.books.histogram
    assert max(hist) == eta and sum(hist.values()) == 12 * 128
    # generation (0.4 s) overlaps training: steady steps take the slowest stage, not the sum
    assert records[-1]["time/step_s"] < 0.4 + 0.128 + 0.256 + 0.3
    assert fleet.tr.calls["remote calls"] > 0


def test_groups_streamed_in_parts_are_whole_again_before_training():
    """completions_per_request=1 (vLLM): each completion is its own generate, score and
    reference call, and each group trains with all its completions, in sample order."""
    r = load_recipe("configs/qwen2.5-math-7b-grpo-h100.yaml",
                    ["grpo.completions_per_request=1", "grpo.steps=3", "grpo.prompts_per_step=8"], cpus=1e9, gpus=1e9)
    fleet = Fleet(r, GpuCosts(QWEN_7B), Lengths(1024, 300), seed=1)

    spans = []
    driver, records, lines = run_logged(r, fleet, prompt_tokens=lambda rng: 200, spans=spans)
    G = r.grpo.num_generations
    assert [rec["samples"] for rec in records] == [8 * G] * 3
    ids = [line["sample_id"] for line in lines]
    assert len(ids) == len(set(ids)) == 3 * 8 * G
    by_prompt = Counter(i.rsplit("/", 1)[0] for i in ids)
    assert set(by_prompt.values()) == {G}
    assert [i.rsplit("/", 1)[1] for i in ids[:G]] == [str(k) for k in range(G)]
    calls = Counter(sp["kind"] for sp in spans)  # every actor's, as the timeline has them
    assert calls["generate"] >= 3 * 8 * G and calls["score"] >= 3 * 8 * G and calls["ref_logprobs"] >= 3 * 8 * G
    # the run's utilisation, from the busy intervals the driver keeps instead of its spans, is all the spans'
    got, want = driver.telemetry.utilisation(driver.wall0, driver.wall1), utilisation(
        spans, driver.wall0, driver.wall1, driver.telemetry.groups())
    assert set(got) == {"generator", "scorer", "learner", "reference"}
    assert {g: pytest.approx(u["busy_s"], abs=2e-3) for g, u in want.items()} == {g: u["busy_s"] for g, u in got.items()}


def test_a_simulated_call_past_its_deadline_stops_the_run_as_a_real_one_does():
    """The driver's deadlines run on the simulated clock: a learner step 50x slower than
    the ones before it ends the run with the usual message."""
    r = _tiny("grpo.max_staleness=0", "grpo.steps=6", "ray.deadline_factor=3", "ray.deadline_min_s=1")
    costs = _cpu_costs()
    fleet = Fleet(r, costs, Lengths(48, 20))
    slow = iter([0.3] * 3 + [15.0] * 10)
    costs.train = lambda samples, tokens, ranks: next(slow)
    with pytest.raises(RemoteCallError, match="GRPO train on learner-rank-0, learner-rank-1 .* past its deadline"):
        run_driver(r, fleet)


def test_the_in_flight_table_keeps_its_indexes_through_removals_and_drops():
    """InFlight's indexes (pending refs, per-actor load, stage counts, the deadline bound)
    after work is removed (a lost actor's) or a ref dropped (a lost generator's sync part)."""
    from r1ray.cluster import transport
    from r1ray.cluster.groups import Watchdog
    from r1ray.controllers.common.inflight import InFlight, Work

    r = _tiny()
    tr = SimTransport()
    with transport.use(tr):
        flight = InFlight(Watchdog([]), r.ray, 4, lambda n: 10.0)
        a, b, c, s1, s2 = Ref(), Ref(), Ref(), Ref(), Ref()
        gen0 = flight.submit(Work("generate", [a], [object()], actor=0))
        gen1 = flight.submit(Work("generate", [b], [object()], actor=1))
        flight.submit(Work("generate", [c], [object()], actor=1))
        sync = flight.submit(Work("sync", [s1, s2], version=1, who=["x"]))
        assert flight.load("generate", 2) == [1, 2] and flight.stages["sync"] == 1
        assert flight.pick("generate", 2, [0, 1]) == 0
        flight.remove(gen1)
        sync.drop(s2)
        assert flight.load("generate", 2) == [1, 1] and set(flight._refs) == {a, c, s1}
        for ref, t in ((b, 0.1), (s2, 0.2), (a, 0.3), (s1, 0.4)):
            tr.later(t, lambda ref=ref: tr.resolve(ref, "v"))
        assert flight.next_done() is gen0  # b (removed) and s2 (dropped) are not waited for
        assert flight.next_done() is sync and sync.value == ["v"] and flight.stages["sync"] == 0
        assert [w.stage for w in flight.work] == ["generate"] and flight.load("generate", 2) == [0, 1]


def test_work_queued_on_an_actor_gets_its_deadline_after_the_latest_one_ahead():
    """A call queued behind others on one actor is due its budget after the latest deadline
    among them: as each leaves (the latest one included), as one is extended (a sync's, a
    batched engine's), after a postponement, and from its own start once the queue is empty."""
    import random

    from r1ray.cluster import transport
    from r1ray.cluster.groups import Watchdog
    from r1ray.controllers.common.inflight import InFlight, Work

    r = _tiny()
    tr = SimTransport()
    rng = random.Random(0)
    with transport.use(tr):
        flight = InFlight(Watchdog([]), r.ray, 4, lambda n: 10.0)
        for _ in range(300):
            queue = [w for w in flight.work if w.actor == 0]
            move = rng.random()
            if move < 0.45 or not queue:
                w = flight.submit(Work("score", [Ref()], [object()], actor=0))
                assert w.deadline == max([w.started, *(q.deadline for q in queue)]) + flight.budget(w)
            elif move < 0.75:
                flight.remove(rng.choice(queue))
            elif move < 0.9:
                w = rng.choice(queue)
                flight.extend(w, w.deadline + rng.choice([-5.0, 50.0]))
            else:
                flight.postpone(7.0)
            tr.t += 1.0


def test_ties_go_round_robin_within_each_stage():
    """Equally loaded actors take turns per stage, however the stages' picks interleave (one
    generator and two scorers: a counter shared with the generate picks sent every score to
    the same scorer)."""
    from r1ray.cluster.groups import Watchdog
    from r1ray.controllers.common.inflight import InFlight

    flight = InFlight(Watchdog([]), _tiny().ray, 4, lambda n: 1.0)
    picks = []
    for _ in range(4):
        flight.pick("generate", 1, [0])
        picks.append(flight.pick("score", 2, [0, 1]))
    assert sorted(picks) == [0, 0, 1, 1]


def test_pick_is_the_least_loaded_then_the_next_in_turn():
    """``InFlight.pick`` (scans in C when every actor may take the work) against its rule
    written out: least work of the stage in flight, ties to the first actor at or after the
    turn, cyclically; every actor or a subset (some starting or lost), groups that grew."""
    import random

    from r1ray.cluster.groups import Watchdog
    from r1ray.controllers.common.inflight import InFlight

    rng, rc = random.Random(0), _tiny().ray
    for _ in range(2000):
        flight = InFlight(Watchdog([]), rc, 4, lambda n: 1.0)
        actors = rng.randint(1, 9)
        flight._load["generate"] = [rng.randint(0, 2) for _ in range(actors + rng.randint(0, 2))]
        for _ in range(4):
            among = list(range(actors)) if rng.random() < 0.5 else sorted(rng.sample(range(actors), rng.randint(1, actors)))
            turn, loads = flight.turns["generate"] + 1, flight.load("generate", actors)
            rule = min(among, key=lambda i: (loads[i], (i - turn) % actors))
            assert flight.pick("generate", actors, among) == rule
            actors += rng.random() < 0.2  # (an elastic group grew: its new actor has no work yet)


def test_colocated_engines_sleep_before_each_step_and_never_share_the_device_with_it():
    """placement.mode colocate on the simulated fleet (the driver's own sequencing): every
    engine sleeps once before each train step, after its last sequence; no engine generates
    while its rank trains; each wakes with the next weights (``wake_s`` more than a sync)."""
    r = load_recipe("configs/qwen2.5-math-7b-grpo-h100.yaml",
                    ["placement.mode=colocate", "learner.num_ranks=4", "generator.num_actors=4", "grpo.max_staleness=0",
                     "grpo.steps=4", "grpo.prompts_per_step=16"], cpus=1e9, gpus=1e9)
    costs = GpuCosts(QWEN_7B)
    fleet = Fleet(r, costs, Lengths(1024, 300), seed=2)
    spans = []
    driver, records = run_driver(r, fleet, prompt_tokens=lambda rng: 200, spans=spans)
    assert len(records) == 4
    kinds = Counter((sp["actor"], sp["kind"]) for sp in spans)
    assert all(kinds[(f"generator-{i}", "sleep")] == 4 for i in range(4))
    for i in range(4):
        generating = [(sp["t0"], sp["t1"]) for sp in spans if (sp["actor"], sp["kind"]) == (f"generator-{i}", "generate")]
        training = [(sp["t0"], sp["t1"]) for sp in spans if (sp["actor"], sp["kind"]) == (f"learner-rank-{i}", "train")]
        assert len(training) == 4 and generating
        assert not [(g, t) for g in generating for t in training if g[0] < t[1] - 1e-5 and t[0] < g[1] - 1e-5]
    updates = [sp["t1"] - sp["t0"] for sp in spans if sp["kind"] == "weight_update"]
    assert updates and min(updates) >= costs.wake_s + costs.sync_seconds(4) - 1e-5  # (wall clock: 0.2 us grain)


def test_a_generator_drained_during_a_weight_sync_leaves_after_it_and_breaks_nothing():
    """``r1ray scale`` down while learner rank 0 sends a version to both vLLM generators: the
    draining one receives it and leaves once the sync is done (stopped mid-transfer it broke
    the sync for the other, which was then replaced as one that may hold part of the
    weights); the next sync forms the transfer group without it. No generator is lost or
    replaced, and every sample is trained on once."""
    r = load_recipe("configs/qwen2.5-math-7b-grpo-h100.yaml",
                    ["generator.num_actors=2", "generator.min_actors=1", "grpo.steps=6", "grpo.prompts_per_step=8"],
                    cpus=1e9, gpus=1e9)
    fleet = Fleet(r, GpuCosts(QWEN_7B), Lengths(1024, 300), seed=3)
    seen = {}

    def on_send(version):
        if version == 3:
            fleet.driver.elastic.resize(1)  # as the driver does when it reads `r1ray scale 1`
            seen["members"], seen["state"] = list(fleet.system.transfer_members), list(fleet.system.generators.state)

    fleet.on_send = on_send
    spans = []
    driver, records, ids = _sampled(fleet, r, 6, spans=spans)  # (every sample trained on once)
    assert dict(driver.elastic.counts) == {"generators/removed": 1}  # nothing lost, replaced or restarted
    assert seen == {"members": [0, 1], "state": ["ready", "ready"]}  # draining, still in the sync
    gens = fleet.system.generators
    assert gens.state == ["ready", "gone"] and gens.actors[1].version == 3
    assert not [t for t in fleet.transfers.values() if t["broken"] or t["lost"]]
    assert fleet.system.transfer_members == [0]
    forms = [sp for sp in spans if sp["kind"] == "init_weight_transfer"]
    assert len(forms) == r.learner.num_ranks  # formed again once (without generator-1), on every rank
    # what it did since the last step's spans were collected was collected as it left, not lost with it
    assert gens.actors[1].spans == [] and any(sp["actor"] == "generator-1" and sp["kind"] == "weight_update" and
                                              sp["args"]["version"] == 3 for sp in spans)


def test_a_sync_that_waits_for_long_sequences_is_not_taken_for_a_stuck_one():
    """``generator.pause_mode: wait`` with long traces: a sync waits for the sequences its
    engines run (here about 2 minutes of a 6,000-token median), more than the deadline a
    sync's pace gives it (60 s at least, 5x the slowest sync seen). The driver used to end
    the run there ('past its deadline'); the sync is now bounded by the generate calls ahead
    of it, then its own budget, and the run finishes."""
    r = load_recipe("configs/qwen2.5-math-7b-grpo-h100.yaml",
                    ["generator.pause_mode=wait", "grpo.max_staleness=1", "grpo.steps=5", "grpo.prompts_per_step=8",
                     "sampling.max_new_tokens=8192", "generator.max_model_len=8704"], cpus=1e9, gpus=1e9)
    fleet = Fleet(r, GpuCosts(QWEN_7B), Lengths(8192, 6000, sigma=0.3, prompt_sigma=0.2), seed=1)
    driver, records, ids = _sampled(fleet, r, 5)
    waits = [x["time/weight_sync_s"] for x in records]
    assert max(waits) > 60  # (what the old deadline allowed)


def test_a_sync_waiting_for_the_engines_is_apart_from_every_learner_ranks_busy_time():
    """``pause_mode: wait``: every rank waits for the engines to pause (their running sequences
    to end) before any weight moves, as ZeRO-3's gathers make the ranks of a real run wait with
    rank 0 (``LearnerRank.send_weights``): each rank's ``await_generators`` span runs from the
    sync's start to the last engine's pause, and its ``send_weights`` goes on from there to the
    last engine's new weights; the learner's busy time leaves the waits out."""
    r = load_recipe("configs/qwen2.5-math-7b-grpo-h100.yaml",
                    ["generator.pause_mode=wait", "grpo.max_staleness=1", "grpo.steps=4", "grpo.prompts_per_step=8",
                     "sampling.max_new_tokens=8192", "generator.max_model_len=8704"], cpus=1e9, gpus=1e9)
    fleet = Fleet(r, GpuCosts(QWEN_7B), Lengths(8192, 6000, sigma=0.3, prompt_sigma=0.2), seed=1)
    spans = []
    driver, records = run_driver(r, fleet, prompt_tokens=lambda rng: 200, spans=spans)
    updates = {}
    for sp in spans:
        if sp["kind"] == "weight_update":
            updates.setdefault(sp["args"]["version"], []).append(sp)
    waited = 0.0
    for k in range(r.learner.num_ranks):
        mine = [sp for sp in spans if sp["actor"] == f"learner-rank-{k}"]
        waits = [sp for sp in mine if sp["kind"] == "await_generators"]
        assert len(waits) >= 2  # (a sync with no sequence running waits for none)
        for w in waits:
            (after,) = [sp for sp in mine if sp["kind"] == "send_weights" and sp["t0"] == w["t1"]]
            engines = updates[after["args"]["version"]]
            assert w["t1"] == pytest.approx(max(u["t0"] for u in engines), abs=1e-6)
            assert after["t1"] == pytest.approx(max(u["t1"] for u in engines), abs=1e-6)
            waited += w["t1"] - w["t0"]
    assert waited / r.learner.num_ranks > 20  # seconds of long sequences ending, no busy time
    u = utilisation(spans, driver.wall0, driver.wall1,
                    [("learner", "learner-rank", ("train", "send_weights"), r.learner.num_ranks)])
    busy = sum(sp["t1"] - sp["t0"] for sp in spans if sp["actor"].startswith("learner-rank")
               and sp["kind"] in ("train", "send_weights")) / r.learner.num_ranks
    assert u["learner"]["busy_s"] == pytest.approx(busy, abs=1e-3)  # (rounded to ms)


def test_busy_fractions_count_calls_that_span_steps():
    """A prediction's busy fractions are each group's busy seconds over the steady steps, from
    every span (merged per actor) against a hand computation, and so is each step's own
    ``util/generator/busy_s``: with long tails (7B with a 6,000-token median) generate calls
    last several steps, and a step's keys saw only the calls that ended in it (0.24 busy
    against 1.00) before the actors' spans still open were drained too."""
    from simulate import steady_busy

    r = load_recipe("configs/qwen2.5-math-7b-grpo-h100.yaml",
                    ["grpo.max_staleness=2", "grpo.steps=8", "grpo.prompts_per_step=8", "sampling.max_new_tokens=8192",
                     "generator.max_model_len=8704"], cpus=1e9, gpus=1e9)
    fleet = Fleet(r, GpuCosts(QWEN_7B), Lengths(8192, 6000, sigma=0.3, prompt_sigma=0.2), seed=1)
    spans = []
    driver, records = run_driver(r, fleet, prompt_tokens=lambda rng: 200, spans=spans)
    first, end = 4, 6
    ends = list(itertools.accumulate((x["time/step_s"] for x in records), initial=0.0))
    n, at = r.generator.num_actors, [driver.wall0 + t for t in ends]
    exact = _busy_s(spans, at[first], at[end], n) / (at[end] - at[first])
    assert steady_busy(driver, records, first, end)["generator"] == pytest.approx(exact, abs=1e-3)
    assert exact > 0.9
    assert [x["util/generator/busy_s"] for x in records] == pytest.approx(
        [_busy_s(spans, at[i], at[i + 1], n) for i in range(len(records))], abs=2e-3)


def _busy_s(spans, a, b, n):
    """Busy seconds per generator inside [a, b] (generating or taking weights), the spans
    merged per actor."""
    busy = 0.0
    for i in range(n):
        merged = []
        for t0, t1 in sorted((sp["t0"], sp["t1"]) for sp in spans
                             if sp["actor"] == f"generator-{i}" and sp["kind"] in ("generate", "weight_update")):
            if merged and t0 <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], t1)
            else:
                merged.append([t0, t1])
        busy += sum(max(0.0, min(t1, b) - max(t0, a)) for t0, t1 in merged)
    return busy / n


def _sampled(fleet, recipe, steps, prompts_per_step=8, spans=None):
    """A run of the 7B recipe on the simulated fleet: (driver, records, sample ids); ``spans``
    gets every actor's spans."""
    driver, records, lines = run_logged(recipe, fleet, prompt_tokens=lambda rng: 200, spans=spans)
    assert len(records) == steps
    ids = [line["sample_id"] for line in lines]
    assert len(ids) == len(set(ids)) == steps * prompts_per_step * recipe.grpo.num_generations
    return driver, records, ids


def test_a_generator_lost_while_generating_is_replaced_and_joins_through_the_next_sync():
    """On the simulated fleet, as `tests/e2e/test_elastic.py` does on Ray: generator-0 dies in
    the middle of a generate call; its groups are generated again elsewhere, a replacement
    starts (``start_s``), the transfer group is formed without it and again with it once it
    answers, and it takes work after it holds the newest weights. Nothing is lost or trained
    on twice; the staleness bound holds."""
    r = load_recipe("configs/qwen2.5-math-7b-grpo-h100.yaml",
                    ["generator.num_actors=2", "grpo.steps=8", "grpo.prompts_per_step=8"], cpus=1e9, gpus=1e9)
    costs = GpuCosts(QWEN_7B, start_s=20.0)
    fleet = Fleet(r, costs, Lengths(1024, 300), seed=4)
    killed = {}

    def kill():
        gens = fleet.system.generators
        killed["calls"] = len(gens.actors[0].calls)
        gens.actors[0].kill()

    fleet.tr.later(5.0, kill)
    spans = []
    driver, records, ids = _sampled(fleet, r, 8, spans=spans)
    gens = fleet.system.generators
    assert killed["calls"] >= 1  # it died with work in flight
    assert dict(driver.elastic.counts) == {"generator/lost": 1, "generator/restarted": 1}
    assert gens.incarnation == [1, 0] and gens.state == ["ready", "ready"]
    assert sum(rec.get("groups/requeued", 0) for rec in records) >= 1
    forms = sorted({round(sp["t0"], 3) for sp in spans if sp["kind"] == "init_weight_transfer"})
    assert len(forms) == 2  # without it, then with its replacement
    joined = min(sp["t0"] for sp in spans if sp["actor"] == "generator-0" and sp["kind"] == "weight_update"
                 and sp["t0"] > WALL0 + 5.0)
    assert joined >= WALL0 + 5.0 + 20.0  # (its start)
    assert any(sp["kind"] == "generate" and sp["actor"] == "generator-0" and sp["t0"] >= joined for sp in spans)
    assert max(driver.books.histogram) <= r.grpo.max_staleness


def test_a_generator_added_at_the_start_joins_through_a_sync_and_takes_work():
    """generator.max_actors above num_actors: the driver adds one at once (the cluster has
    room); it answers after ``start_s``, joins through the next sync and generates."""
    r = load_recipe("configs/qwen2.5-math-7b-grpo-h100.yaml",
                    ["generator.num_actors=1", "generator.max_actors=2", "grpo.steps=6", "grpo.prompts_per_step=8"],
                    cpus=1e9, gpus=1e9)
    fleet = Fleet(r, GpuCosts(QWEN_7B, start_s=10.0), Lengths(1024, 300), seed=5)
    spans = []
    driver, records, ids = _sampled(fleet, r, 6, spans=spans)
    gens = fleet.system.generators
    assert dict(driver.elastic.counts) == {"generators/added": 1} and gens.state == ["ready", "ready"]
    first = min(sp["t0"] for sp in spans if sp["actor"] == "generator-1" and sp["kind"] == "generate")
    synced = min(sp["t1"] for sp in spans if sp["actor"] == "generator-1" and sp["kind"] == "weight_update")
    assert WALL0 + 10.0 <= synced <= first


@pytest.mark.parametrize("batched", [False, True])
def test_a_finished_call_gives_its_engines_other_calls_their_budget_again_when_it_batches(batched):
    """Deadlines (``InFlight``): a call's budget is deadline_factor x the slowest seconds per
    sample seen x its samples. A vLLM engine runs its calls at once, so there each finished call
    gives the engine's other calls that budget again from then; one-at-a-time stages keep
    their deadlines, and other actors' calls are not touched."""
    from r1ray.cluster import transport
    from r1ray.cluster.groups import Watchdog
    from r1ray.controllers.common.inflight import InFlight, Work

    r = _tiny("ray.deadline_factor=2", "ray.deadline_min_s=1")
    tr = SimTransport()
    with transport.use(tr):
        flight = InFlight(Watchdog([]), r.ray, 4, lambda n: 10.0)
        if batched:
            flight.batched.add("generate")
        flight.rates["generate"] = 1.0  # s a sample: a one-group call (4 samples) gets 2 x 1 x 4 = 8 s
        a, b, c = Ref(), Ref(), Ref()
        first = flight.submit(Work("generate", [a], [object()], actor=0))
        second = flight.submit(Work("generate", [b], [object()], actor=0))
        other = flight.submit(Work("generate", [c], [object()], actor=1))
        assert (first.deadline, second.deadline, other.deadline) == (8.0, 16.0, 8.0)  # (queued behind the first)
        tr.later(6.0, lambda: tr.resolve(a, "v"))
        assert flight.next_done() is first and tr.t == 6.0
        # 1.5 s a sample now seen (6 s for 4 samples): a new budget of 2 x 1.5 x 4 = 12 s from t = 6
        assert second.deadline == (18.0 if batched else 16.0) and other.deadline == 8.0


def test_a_backlog_waits_in_the_driver_for_generators_with_room():
    """Every generator replaced at once (one died during a weight sync) on the simulated fleet:
    the first to join takes at most ``generator.max_requests`` calls, the rest wait in the
    driver for the others (before: every group went to the first one up, whose first calls
    then ran past their deadlines and stopped the run)."""
    r = load_recipe("configs/qwen2.5-math-7b-grpo-h100.yaml",
                    ["generator.num_actors=4", "generator.max_requests=6", "grpo.steps=6", "grpo.prompts_per_step=32",
                     "grpo.max_staleness=1"], cpus=1e9, gpus=1e9)
    fleet = Fleet(r, GpuCosts(QWEN_7B, start_s=20.0), Lengths(1024, 300), seed=6)
    killed = []

    def on_send(version):
        if version == 2 and not killed:
            killed.append(fleet.tr.t)
            fleet.system.generators.actors[0].kill()

    fleet.on_send = on_send
    generated = []
    driver, records, ids = _sampled(fleet, r, 6, prompts_per_step=32, spans=generated)
    assert driver.elastic.counts["generator/restarted"] == 4 and driver.elastic.counts["generator/replaced"] == 3
    spans = [sp for sp in generated if sp["kind"] == "generate"]
    for name in {sp["actor"] for sp in spans}:
        edges = sorted([(sp["t0"], 1) for sp in spans if sp["actor"] == name]
                       + [(sp["t1"], -1) for sp in spans if sp["actor"] == name])
        at_once = max(itertools.accumulate(step for _, step in edges))
        assert at_once <= 6, name
