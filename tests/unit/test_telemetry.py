"""Utilisation accounting and the Chrome-trace timeline, on hand-made spans."""
import json
import random

import pytest

from r1ray.actors.spans import SpanLog
from r1ray.controllers.grpo.telemetry import busy_seconds, step_timing, still_open, utilisation, write_timeline

SPANS = [
    {"actor": "generator-0", "kind": "generate", "t0": 100.0, "t1": 103.0, "args": {}},
    {"actor": "generator-0", "kind": "load_weights", "t0": 103.0, "t1": 103.5, "args": {"version": 2}},
    {"actor": "learner-rank-0", "kind": "train", "t0": 101.0, "t1": 105.0, "args": {}},
    {"actor": "learner-rank-1", "kind": "train", "t0": 101.0, "t1": 103.0, "args": {}},
]


def test_busy_seconds_clips_to_the_window():
    assert busy_seconds(SPANS, 102.0, 104.0) == pytest.approx({"generate": 1.0, "load_weights": 0.5, "train": 3.0})


def test_utilisation_averages_over_the_actors_of_a_group():
    u = utilisation(SPANS, 100.0, 110.0, [("generator", "generator", ("generate", "load_weights"), 1),
                                          ("learner", "learner-rank", ("train",), 2)])
    assert u["generator"] == {"actors": 1, "busy_s": 3.5, "idle_s": 6.5, "idle_ratio": 0.65}
    assert u["learner"]["busy_s"] == 3.0 and u["learner"]["idle_ratio"] == pytest.approx(0.7)


def test_a_kind_two_groups_log_counts_for_each_groups_own_actors():
    # the reference actors and LoRA's learner ranks both log ref_logprobs: the reference's spans
    # once made the learner look busy (by the reference's busy time over the learner's ranks)
    spans = [*SPANS, {"actor": "reference-0", "kind": "ref_logprobs", "t0": 100.0, "t1": 108.0, "args": {}},
             {"actor": "learner-rank-1", "kind": "ref_logprobs", "t0": 104.0, "t1": 105.0, "args": {}}]
    groups = [("learner", "learner-rank", ("train", "export_weights", "send_weights", "ref_logprobs"), 2),
              ("reference", "reference", ("ref_logprobs",), 1)]
    u = utilisation(spans, 100.0, 110.0, groups)
    assert u["learner"]["busy_s"] == 3.5 and u["reference"]["busy_s"] == 8.0  # (4 + 2 + 1) / 2 ranks; 8 / 1
    timing = step_timing(spans, 100.0, 110.0, groups)
    assert timing["util/learner/busy_s"] == 3.5 and timing["time/reference_s"] == 9.0  # (the stage: both kinds' spans)


def test_a_step_window_scans_only_the_spans_still_open_and_times_it_as_every_span():
    # SpanCollector.window: spans arrive when drained (a long call's after windows have passed);
    # each window is timed from the spans still open at its start, as from all of the run's
    rng, groups = random.Random(0), [("generator", "generator", ("generate",), 4), ("learner", "learner-rank", ("train",), 2)]
    spans, recent, start = [], [], 0.0
    for end in [5.0 * k for k in range(1, 40)]:
        drained = []
        for _ in range(rng.randint(0, 12)):
            t1 = rng.uniform(max(0.0, end - 30.0), end)  # ended by now, some several windows ago
            actor = rng.choice(["generator-0", "generator-1", "generator-2", "learner-rank-0", "learner-rank-1"])
            drained.append({"actor": actor, "kind": "train" if "learner" in actor else "generate",
                            "t0": t1 - rng.expovariate(1 / 6.0), "t1": t1})
        spans += drained
        recent += drained
        assert step_timing(recent, start, end, groups) == step_timing(spans, start, end, groups)
        recent, start = still_open(recent, end), end
    assert len(recent) < len(spans) / 10


def test_timeline_is_chrome_trace_json(tmp_path):
    path = tmp_path / "timeline.json"
    write_timeline(SPANS, path)
    trace = json.loads(path.read_text())
    boxes = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert len(boxes) == 4 and boxes[0]["ts"] == 0.0 and boxes[0]["dur"] == 3e6
    names = {e["tid"]: e["args"]["name"] for e in trace["traceEvents"] if e["ph"] == "M" and e["name"] == "thread_name"}
    assert sorted(names.values()) == ["generator-0", "learner-rank-0", "learner-rank-1"]
    assert {b["tid"] for b in boxes} == set(names)
    assert next(b for b in boxes if b["name"] == "load_weights")["args"] == {"version": 2}


def test_span_log_records_even_when_the_work_raises():
    log = SpanLog()
    with pytest.raises(RuntimeError):
        with log.span("train", samples=3):
            raise RuntimeError("boom")
    (sp,) = log.drain()
    assert sp["kind"] == "train" and sp["t1"] >= sp["t0"] and sp["args"] == {"samples": 3}
    assert log.drain() == []
