"""Reward scorer: applies the configured reward functions to rollouts, in isolated workers.

Every function runs through ``rewards.VerifierPool``: one completion at a time, in a worker
process, under a hard wall-clock limit, so a pathological completion costs at most
``timeout_s`` and never hangs the run. A ``judge`` (an LLM behind an endpoint: I/O, not CPU)
runs in this process instead, many requests at once, under its own limits and deadline
(``rewards/judge.py``), in a thread beside the verifier workers.

A function that misbehaves is contained: a value that is not a score (NaN, inf, "0.5", True)
and a call that raises both score None and are counted; the pool logs the first of each kind
once. ``RewardHealth`` turns "failed on every completion, step after step" into a clear
``BrokenRewardError`` or a function to drop (``RewardScorer.drop``).
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from .. import rewards
from .rollout import Rollout
from .spans import SpanLog


@dataclass
class RewardSpec:
    name: str  # a registered name (accuracy, format, ...) or an import path "pkg.mod:fn"
    weight: float = 1.0
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class ScorerConfig:
    num_actors: int = 1
    workers_per_actor: int = 2  # verifier processes per scorer actor
    timeout_s: float = 10.0  # hard wall-clock limit per completion and function
    cpus_per_actor: float = 0.25
    # Address-space cap of each verifier process, in MB: "auto" shares half the node's memory
    # among num_actors x workers_per_actor verifiers (1-16 GiB each); null: no cap. A function
    # over it scores None and is counted as an error; the run goes on.
    memory_mb: int | Literal["auto"] | None = "auto"
    # A reward that times out on this many completions in a row within one scoring call is not
    # run on the rest of that call (counted as timeouts); 0: run every completion.
    max_timeouts_in_a_row: int = 8
    # A function that fails (raises, returns a non-score, times out) on every completion for this
    # many learner steps in a row is broken; 0: never call it broken.
    max_failed_steps: int = 3
    on_broken: Literal["fail", "drop"] = "fail"  # stop the run, or drop the function and train on the others


# Per-function counts in score()'s stats, beside f"{name}/calls"; their sum is the failures.
FAILURES = ("errors", "invalid", "timeouts")


@dataclass
class Scores:
    """What ``RewardScorer.score`` sends back for a list of rollouts, in their order."""

    per_function: list[dict[str, float | None]]  # each rollout's score per function
    rewards: list[float]  # each rollout's weighted sum
    stats: dict  # the call's counts (see ``RewardScorer.score``)

    def apply(self, rollouts: list[Rollout]) -> list[Rollout]:
        """Write the scores and rewards onto ``rollouts`` (the ones that were scored); returns them."""
        for r, scores, reward in zip(rollouts, self.per_function, self.rewards, strict=True):
            r.scores.update(scores)
            r.reward = reward
        return rollouts


def check_specs(specs: list[RewardSpec]) -> list:
    """Resolve every function once so a typo fails before any actor starts; the functions, in
    the order of ``specs``."""
    fns = []
    for i, s in enumerate(specs):
        try:
            fns.append(rewards.get(s.name, **s.params))
        except (ValueError, TypeError, ImportError, AttributeError) as e:
            raise ValueError(f"rewards[{i}] (name={s.name!r}, params={s.params}): {e}") from None
    return fns


class RewardScorer:
    """``keys``: the API keys of the judges' endpoints by the environment variable that names
    them (``api_key_env``), read by the driver; a judge whose key is not there reads this
    process's environment."""

    def __init__(self, specs: list[RewardSpec], cfg: ScorerConfig, keys: dict | None = None):
        self.specs, self.cfg = list(specs), cfg
        self.judges = {}  # name -> an open rewards.judge.Judge: the limits are split among the scorer actors
        for s, fn in zip(self.specs, check_specs(specs)):
            if getattr(fn, "concurrent", False):
                key = (keys or {}).get(fn.api_key_env) if fn.api_key_env else None
                key = key.get_secret_value() if hasattr(key, "get_secret_value") else key
                self.judges[s.name] = fn.open(key, share=cfg.num_actors)
        self._threads = ThreadPoolExecutor(max(1, len(self.judges)), thread_name_prefix="r1ray-judge-call")
        self.dropped: set[str] = set()
        self.memory_mb = (rewards.auto_memory_mb(cfg.num_actors * cfg.workers_per_actor) if cfg.memory_mb == "auto"
                          else cfg.memory_mb)
        self.pool = rewards.VerifierPool(num_workers=cfg.workers_per_actor, timeout_s=cfg.timeout_s,
                                         memory_mb=self.memory_mb, max_timeouts_in_a_row=cfg.max_timeouts_in_a_row)
        self.spans = SpanLog()

    def __repr__(self) -> str:
        return f"RewardScorer({', '.join(s.name for s in self.specs)})"

    @staticmethod
    def _inputs(rollouts: list[Rollout]) -> tuple[list, dict[str, list]]:
        """TRL's keyword arguments: conversational completions, prompts, completion_ids, dataset columns."""
        completions = [r.messages or [{"role": "assistant", "content": r.text}] for r in rollouts]
        columns: dict[str, list] = {key: [r.columns.get(key) for r in rollouts]
                                    for key in (rollouts[0].columns if rollouts else {}) if key != "prompt"}
        columns["prompts"] = [r.columns.get("prompt") for r in rollouts]
        # (lists, as TRL passes them: a reward function may concatenate or compare them)
        columns["completion_ids"] = [ids.tolist() if isinstance(ids, np.ndarray) else list(ids)
                                     for ids in (r.completion_ids for r in rollouts)]
        if rollouts and rollouts[0].messages is not None:  # episodes: what happened in each, per trajectory
            columns["num_turns"] = [r.turns for r in rollouts]
            columns["tool_calls"] = [r.tool_calls for r in rollouts]
            columns["tool_errors"] = [r.tool_errors for r in rollouts]
        return completions, columns

    def drop(self, name: str) -> None:
        """Stop scoring with reward `name`: later score() calls skip it (what on_broken="drop" does).

        Dropping a name again does nothing, so the driver can call it on every scorer.
        """
        if name in self.dropped:
            return
        if not any(s.name == name for s in self.specs):
            raise ValueError(f"RewardScorer.drop: no reward {name!r}; "
                             f"configured: {', '.join(repr(s.name) for s in self.specs) or 'none'}")
        self.specs = [s for s in self.specs if s.name != name]
        self.dropped.add(name)

    def score(self, rollouts: list[Rollout]) -> "Scores":
        """Each rollout's score per function (None: not applicable, or the function failed on
        it) and its reward (the weighted sum; a None score adds nothing), and the call's stats;
        the rollouts are not changed (``Scores.apply`` writes them), so only these numbers
        travel back to the driver.

        The stats, for each function still scoring, ints: ``{name}/calls`` (completions
        attempted), ``{name}/errors`` (the call raised or crashed its worker: scored None),
        ``{name}/invalid`` (returned NaN, inf, a str, a bool, ...: scored None),
        ``{name}/timeouts`` (scored 0.0); and ``time_s`` (float seconds). Only when the
        function failed in this call, one str: ``{name}/first_error``, an example such as
        "sample 'p3/1': raised KeyError: 'solution' (at my_rewards.py:12 in fn)". The str is not
        a count: sum the numbers and keep the first str (``add_stats``).
        """
        with self.spans.span("score", samples=len(rollouts)):
            return self._score(rollouts)

    def _score(self, rollouts: list[Rollout]) -> "Scores":
        t0 = time.perf_counter()
        completions, columns = self._inputs(rollouts)
        stats: dict[str, float | str] = {}
        per_function: list[dict[str, float | None]] = [{} for _ in rollouts]
        rewards = [0.0] * len(rollouts)
        ids = [r.sample_id for r in rollouts]
        judged = {s.name: self._threads.submit(self.judges[s.name].score, completions, columns, ids)
                  for s in self.specs if s.name in self.judges}
        for spec in self.specs:
            if spec.name in judged:
                continue
            # The pool turns every error and non-score into None: no NaN, inf or str gets here.
            self._add(spec, self.pool.score(spec.name, spec.params, completions, columns, ids), per_function, rewards,
                      stats)
        for spec in self.specs:
            if spec.name in judged:
                res = judged[spec.name].result()
                self._add(spec, res, per_function, rewards, stats)
                stats.update({f"{spec.name}/{k}": v for k, v in res.counts.items()})
        stats["time_s"] = time.perf_counter() - t0
        return Scores(per_function, rewards, stats)

    @staticmethod
    def _add(spec: RewardSpec, res, per_function: list, rewards: list, stats: dict) -> None:
        """One function's result (a ScoreResult or a JudgeResult) into the call's scores and stats."""
        n = len(res.scores)
        for k, score in enumerate(res.scores):
            per_function[k][spec.name] = score
            if score is not None:
                rewards[k] += spec.weight * score
        stats[f"{spec.name}/calls"] = n
        stats[f"{spec.name}/errors"] = len(res.errors)
        stats[f"{spec.name}/invalid"] = len(res.invalid)
        stats[f"{spec.name}/timeouts"] = len(res.timeouts)
        if res.first_error:
            stats[f"{spec.name}/first_error"] = res.first_error

    def score_one(self, rollouts: list[Rollout], name: str, params: dict | None = None) -> list[float | None]:
        """Scores of one function (e.g. accuracy for evaluation), configured or not."""
        completions, columns = self._inputs(rollouts)
        ids = [r.sample_id for r in rollouts]
        if name in self.judges and not params:
            return self.judges[name].score(completions, columns, ids).scores
        return self.pool.score(name, params or {}, completions, columns, ids).scores

    def judge(self, rollouts: list[Rollout], name: str) -> list[tuple[float | None, str | None]]:
        """(score, extracted answer) per rollout from a ``with_answers`` function (the benchmark
        judges ``math_answer`` / ``choice_answer``; any other reward function gives no answer), in
        the verifier workers under the time limit; a timeout or error gives (0.0 or None, None)."""
        with self.spans.span("judge", samples=len(rollouts)):
            completions, columns = self._inputs(rollouts)
            res = self.pool.score(name, {}, completions, columns, [r.sample_id for r in rollouts])
            return list(zip(res.scores, res.answers or [None] * len(res.scores)))

    def close(self) -> None:
        self.pool.close()
        for judge in self.judges.values():
            judge.close()
        self._threads.shutdown(wait=False)

    def drain_spans(self) -> list[dict]:
        return self.spans.drain()

    def ping(self) -> str:
        return "ok"


def add_stats(window: dict, stats: dict) -> dict:
    """Add one score() call's stats to a step window (in place, returned): numbers are summed,
    a str (``{name}/first_error``) keeps the first one seen."""
    for key, value in stats.items():
        if isinstance(value, str):
            window.setdefault(key, value)
        else:
            window[key] = window.get(key, 0) + value
    return window


class BrokenRewardError(RuntimeError):
    """A reward function failed on every completion for ``max_failed_steps`` steps in a row."""

    def __init__(self, message: str, reward: str = "", steps: int = 0, example: str = ""):
        super().__init__(message)
        self.reward, self.steps, self.example = reward, steps, example


class RewardHealth:
    """Tells a broken reward function from one that fails now and then.

    The driver calls ``end_step(window)`` once per learner step, with the stats of every
    score() call of that step added up (``add_stats``), keys as score() returns them. A step in
    which a function failed (errors + invalid + timeouts) on all of its calls, and had calls,
    adds one to its count of failed steps; a step with one good score resets it; a step with no
    calls changes nothing. At ``max_failed_steps`` (0: never) the function is broken:
    on_broken="fail" raises ``BrokenRewardError``; on_broken="drop" returns its name, for the
    driver to ``drop`` on every scorer, and watches it no more. Dropping the last function
    raises instead: there would be nothing left to train on.
    """

    def __init__(self, names: list[str], max_failed_steps: int = 3, on_broken: Literal["fail", "drop"] = "fail"):
        if isinstance(max_failed_steps, bool) or not isinstance(max_failed_steps, int) or max_failed_steps < 0:
            raise ValueError(f"RewardHealth: max_failed_steps must be an integer >= 0 (0: never stop), "
                             f"got {max_failed_steps!r}")
        if on_broken not in ("fail", "drop"):
            raise ValueError(f"RewardHealth: on_broken must be 'fail' or 'drop', got {on_broken!r}")
        self.max_failed_steps, self.on_broken = max_failed_steps, on_broken
        self.active = list(dict.fromkeys(names))  # watched: configured and not dropped
        self.failed_steps = {name: 0 for name in self.active}  # consecutive steps failed on every call
        self._example = {name: "" for name in self.active}

    def end_step(self, window_stats: dict) -> list[str]:
        """The functions to drop after this step (on_broken="drop"); raises BrokenRewardError
        for a broken one under on_broken="fail"."""
        broken = [name for name in self.active if self._failed_again(name, window_stats)]
        if not broken:
            return []
        if self.on_broken == "fail":
            raise self._error(broken[0], window_stats, "Fix it, or set scorer.on_broken: drop to train on without "
                              "it, or scorer.max_failed_steps: 0 to never stop.")
        if len(broken) == len(self.active):
            raise self._error(broken[0], window_stats, "on_broken is 'drop', but every other reward function is "
                              "dropped or broken too: nothing would be left to train on.")
        self.active = [name for name in self.active if name not in broken]
        return broken

    def _failed_again(self, name: str, window: dict) -> bool:
        """Update `name`'s count of failed steps; whether it is now broken."""
        if f"{name}/calls" not in window and f"reward/{name}/calls" in window:
            raise ValueError(f"RewardHealth.end_step: keys must be as RewardScorer.score returns them "
                             f"({name + '/calls'!r}), got {'reward/' + name + '/calls'!r}")
        calls = window.get(f"{name}/calls", 0)
        if not calls:
            return False
        if sum(window.get(f"{name}/{kind}", 0) for kind in FAILURES) < calls:
            self.failed_steps[name], self._example[name] = 0, ""
            return False
        self.failed_steps[name] += 1
        self._example[name] = window.get(f"{name}/first_error") or self._example[name]
        return 0 < self.max_failed_steps <= self.failed_steps[name]

    def _error(self, name: str, window: dict, advice: str) -> BrokenRewardError:
        steps, example = self.failed_steps[name], self._example[name] or "none recorded"
        counts = ", ".join(f"{window.get(f'{name}/{kind}', 0)} {kind}" for kind in FAILURES)
        return BrokenRewardError(
            f"reward {name!r} failed on every completion for {steps} consecutive learner steps "
            f"(last step: {window.get(f'{name}/calls', 0)} calls, {counts}); example: {example}. {advice}",
            reward=name, steps=steps, example=example)
