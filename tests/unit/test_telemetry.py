"""Utilisation accounting and the Chrome-trace timeline, on hand-made spans."""
import json
import random
import time

import pytest

from r1ray.actors.spans import SpanLog
from r1ray.controllers.grpo.telemetry import (
    BusyIntervals,
    TimelineWriter,
    busy_seconds,
    step_timing,
    still_open,
    utilisation,
    write_timeline,
)

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


def test_the_runs_busy_intervals_give_the_utilisation_of_all_its_spans():
    # SpanCollector keeps each actor's busy time as merged intervals, not the spans: spans drained
    # late (reaching back over earlier drains), overlapping on one actor (a vLLM engine's calls),
    # of kinds another group counts (a reference's ref_logprobs) or none (sleep), or empty
    rng = random.Random(1)
    groups = [("generator", "generator", ("generate", "load_weights"), 3),
              ("learner", "learner-rank", ("train", "ref_logprobs"), 2), ("reference", "reference", ("ref_logprobs",), 1)]
    actors = {"generator-0": ("generate", "load_weights", "sleep"), "generator-1": ("generate",), "generator-2": ("generate",),
              "learner-rank-0": ("train", "ref_logprobs"), "learner-rank-1": ("train",), "reference-0": ("ref_logprobs",)}
    busy, spans = BusyIntervals(), []
    for end in [4.0 * k for k in range(1, 60)]:
        drained = []
        for _ in range(rng.randint(0, 15)):
            actor = rng.choice(sorted(actors))
            t1 = rng.uniform(max(0.0, end - 25.0), end)
            t0 = t1 - (0.0 if rng.random() < 0.05 else rng.expovariate(1 / 5.0))
            drained.append({"actor": actor, "kind": rng.choice(actors[actor]), "t0": t0, "t1": t1})
        busy.add(drained, groups)
        spans += drained
        for start, stop in [(0.0, end), (end / 3, end / 2), (-10.0, end + 10.0)]:
            want, got = utilisation(spans, start, stop, groups), busy.utilisation(start, stop, groups)
            for g in want:
                assert got[g]["busy_s"] == pytest.approx(want[g]["busy_s"], abs=2e-3), (end, start, g)
    assert busy.intervals() < len(spans) / 5


def test_a_timeline_written_as_it_is_drained_has_every_span_and_keeps_the_one_before(tmp_path):
    path = tmp_path / "timeline.json"
    path.write_text("an earlier attempt's")
    writer = TimelineWriter(path)
    writer.write(SPANS[:2])
    writer.write([])
    writer.write(SPANS[2:])
    assert not path.exists()  # (written under another name until closed)
    writer.close()
    writer.close()
    assert (tmp_path / "timeline.1.json").read_text() == "an earlier attempt's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["timeline.1.json", "timeline.json"]
    assert _boxes(path) == sorted((sp["actor"], sp["kind"], (sp["t0"] - 100.0) * 1e6, (sp["t1"] - sp["t0"]) * 1e6)
                                  for sp in SPANS)
    write_timeline(SPANS, tmp_path / "again.json")  # at once, as in parts
    assert _boxes(tmp_path / "again.json") == _boxes(path)


def test_a_killed_drivers_timeline_is_kept_up_to_its_last_whole_event(tmp_path):
    # a driver killed (SIGKILL, a node lost) leaves its hidden part file, maybe cut in a write:
    # the next attempt closes it after its last whole event and keeps it, in the attempts' order
    path = tmp_path / "timeline.json"
    write_timeline(SPANS[:1], path)  # a first attempt that finished
    killed = TimelineWriter(path)
    killed.write(SPANS[:3])
    killed.write(SPANS[3:])
    killed.f.close()
    text = killed.part.read_text()
    killed.part.write_text(text[:-25])  # the last event cut short
    again = TimelineWriter(path)
    again.write(SPANS)
    again.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["timeline.1.json", "timeline.2.json", "timeline.json"]
    assert len(_boxes(tmp_path / "timeline.1.json")) == 1 and len(_boxes(path)) == 4
    assert _boxes(tmp_path / "timeline.2.json") == _boxes(path)[:3]  # all but the cut one (learner-rank-1's)
    killed.part.write_text(text[:20])  # cut before its first event
    TimelineWriter(path).close()
    assert _boxes(tmp_path / "timeline.4.json") == []


def _boxes(path):
    events = json.loads(path.read_text())["traceEvents"]
    names = {e["tid"]: e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "thread_name"}
    return sorted((names[e["tid"]], e["name"], e["ts"], e["dur"]) for e in events if e["ph"] == "X")


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


def test_span_log_drains_a_span_still_open_as_far_as_it_has_run_then_whole_once():
    # a generate call of long traces spans several learner steps: each step's drain gets it as
    # far as it has run (so the step counts it), the drain after it ended gets it whole, once
    log = SpanLog()
    with log.span("generate", sequences=8):
        update = log.begin("weight_update")
        (a, b) = sorted(log.drain(), key=lambda sp: sp["kind"])
        assert a["kind"] == "generate" and a["open"] and a["args"] == {"sequences": 8} and a["t1"] >= a["t0"]
        assert b["kind"] == "weight_update" and b["open"] and b["t1"] == a["t1"]
        time.sleep(0.01)
        seconds = log.end(update, version=3)
        (c, d) = sorted(log.drain(), key=lambda sp: sp["kind"])
    assert (c["kind"], c["open"], c["t0"]) == ("generate", True, a["t0"]) and c["t1"] > a["t1"]
    assert "open" not in d and d["t0"] == b["t0"] and d["args"] == {"version": 3}
    assert d["t1"] - d["t0"] == pytest.approx(seconds) and seconds >= 0.01
    (e,) = log.drain()
    assert "open" not in e and e["t0"] == a["t0"] and e["t1"] >= c["t1"] and e["args"] == {"sequences": 8}
    assert log.drain() == []


def test_a_wait_on_others_inside_a_span_is_its_own_span_and_no_busy_time():
    # learner rank 0's send_weights holds the generators' pause (pause_mode wait: until their
    # running sequences end); the wait is logged apart, and the learner's busy time leaves it out
    log = SpanLog()
    key = log.begin("send_weights", version=4)
    time.sleep(0.01)
    w0 = time.time()
    time.sleep(0.03)
    w1 = time.time()
    time.sleep(0.01)
    seconds = log.end(key, gap=(w0, w1), gap_kind="await_generators")
    a, gap, b = log.drain()
    assert (a["kind"], gap["kind"], b["kind"]) == ("send_weights", "await_generators", "send_weights")
    assert a["t1"] == gap["t0"] == w0 and gap["t1"] == b["t0"] == w1 and a["args"] == b["args"] == {"version": 4}
    assert b["t1"] - a["t0"] == pytest.approx(seconds)
    for sp in (a, gap, b):
        sp["actor"] = "learner-rank-0"
    u = utilisation([a, gap, b], a["t0"], b["t1"], [("learner", "learner-rank", ("train", "send_weights"), 1)])
    assert u["learner"]["busy_s"] == pytest.approx(seconds - (w1 - w0), abs=1e-3)
    # a gap outside the span (a stale one) is ignored: the span stays whole
    log.end(log.begin("send_weights", version=5), gap=(w0, w1), gap_kind="await_generators")
    (whole,) = log.drain()
    assert whole["kind"] == "send_weights" and whole["t0"] > w1
    # under ZeRO-3 another rank waits through rank 0's gap from when its own span began (rank
    # 0's clock: the gap may begin earlier): the gap is cut to the span
    key = log.begin("send_weights", version=6)
    time.sleep(0.02)
    w2 = time.time()
    time.sleep(0.01)
    log.end(key, gap=(w2 - 5.0, w2), gap_kind="await_generators")
    gap, b = log.drain()
    assert (gap["kind"], b["kind"]) == ("await_generators", "send_weights") and b["args"] == {"version": 6}
    assert gap["t1"] == b["t0"] == w2 and w2 - 5.0 < gap["t0"] < w2 - 0.015
