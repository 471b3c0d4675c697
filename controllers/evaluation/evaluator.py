"""Evaluation: held-out pass@1 during training, and benchmarks the way reasoning papers report them.

``pass_at_1``: one completion per held-out prompt (greedy by default), judged by one reward
function; the quick before/after number of ``r1ray train``. It runs on the ``Evaluator`` too.

``Evaluator``: n samples per problem of each task (``eval_tasks``) streamed through the
generator group, judged on the scorer actors by math-verify as Open-R1 judges
(``rewards/answers.py``), reported as pass@1 (the mean over the n samples), the unbiased
pass@k estimator and maj@k. ``r1ray eval`` and the evaluations every ``eval.every_steps``
learner steps both run it.
"""
from __future__ import annotations

import json
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ...actors.generator import Generator, SamplingConfig
from ...actors.scorer import RewardScorer
from ..common import interrupt
from ..common.elastic import Elastic, Hooks
from ..common.inflight import InFlight, Work
from ..common.system import System
from ..config import EvalSamplingConfig
from .tasks import Task


def pass_at_1(system: System, prompts: list[dict], sampling: SamplingConfig, reward: str = "accuracy",
              greedy: bool = True, dropped_rewards: Callable[[], list[str]] = list) -> dict:
    """Fraction of prompts whose completion (greedy, or one sample with ``sampling``) scores 1
    (a None score counts as a miss). Streamed by the ``Evaluator``: a generator or scorer lost
    meanwhile is replaced and its prompts are sent again."""
    t0 = time.perf_counter()
    task = Task("held-out", "math", {}, 1, prompts, judge_name=reward)
    how = EvalSamplingConfig(0.0 if greedy else sampling.temperature, sampling.top_p, sampling.max_new_tokens)
    done = Evaluator(system, [task], how, dropped_rewards=dropped_rewards).collect()[task.name]
    rollouts = [r for _, mine, _ in done for r in mine]
    scores = [score for _, _, verdicts in done for score, _ in verdicts]
    passed = sum(1 for s in scores if s is not None and s >= 1.0)
    return {"pass@1": passed / max(1, len(prompts)), "n": len(prompts), "passed": passed,
            "completion_len/mean": sum(len(r.completion_ids) for r in rollouts) / max(1, len(rollouts)),
            "time_s": time.perf_counter() - t0,
            "examples": [{"prompt_id": r.prompt_id, "text": r.text, "score": s} for r, s in list(zip(rollouts, scores))[:5]]}


# -- the metrics -------------------------------------------------------------------------------
def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimator of pass@k from n samples of which c are right (Chen et al. 2021,
    "Evaluating Large Language Models Trained on Code"): 1 - C(n-c, k) / C(n, k), computed as a
    product so that n = 64 does not overflow."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k: need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def maj_at_k(answers: list[str | None], correct: list[bool], k: int) -> float:
    """Majority vote over the first k samples: is the most frequent extracted answer right?
    Samples without an answer do not vote. A tie between answers counts as the share of the
    tied answers that are right (the expected score of breaking the tie at random), so the
    result does not depend on the order of the samples."""
    votes = Counter(a for a in answers[:k] if a is not None)
    if not votes:
        return 0.0
    top = max(votes.values())
    tied = [a for a, v in votes.items() if v == top]
    right = {a for a, ok in zip(answers[:k], correct[:k]) if ok and a is not None}
    return sum(a in right for a in tied) / len(tied)


def ks_for(n: int, wanted: list[int] | None) -> list[int]:
    """The k of pass@k / maj@k: the configured ones up to n, else 1, 2, 4, ... up to n, and n."""
    if wanted:
        return sorted({k for k in wanted if k <= n})
    ks, k = [], 1
    while k < n:
        ks.append(k)
        k *= 2
    return ks + [n]


def task_report(task: Task, problems: list[dict], ks: list[int]) -> dict:
    """The task's metrics from its per-problem records (problems whose gold answer could not be
    parsed are left out and counted)."""
    scored = [p for p in problems if p["gold_parsed"]]
    report: dict = {"task": task.name, "problems": len(problems), "gold_unparsed": len(problems) - len(scored),
                    "num_samples": task.num_samples}
    for k in ks:
        report[f"pass@{k}"] = _mean([pass_at_k(len(p["correct"]), sum(p["correct"]), k) for p in scored])
    for k in ks:
        if k > 1:
            report[f"maj@{k}"] = _mean([maj_at_k(p["answers"], p["correct"], k) for p in scored])
    samples = [(a, t, f) for p in problems for a, t, f in zip(p["answers"], p["completion_tokens"], p["finish_reasons"])]
    report["answered"] = _mean([a is not None for a, _, _ in samples])  # an answer could be extracted
    report["truncated"] = _mean([f == "length" for _, _, f in samples])  # hit the token budget
    report["completion_tokens/mean"] = _mean([t for _, t, _ in samples])
    report["completion_tokens/max"] = max((t for _, t, _ in samples), default=0)
    return report


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else 0.0


# -- running it on the actors ------------------------------------------------------------------
class Evaluator:
    """Streams every task's problems through the generators (a few problems per call: one per
    vLLM request, batched continuously), judges each call's completions on a scorer as soon as
    they arrive, and aggregates per task. Plain driver logic: the actors do the work."""

    def __init__(self, system: System, tasks: list[Task], sampling: EvalSamplingConfig, ks: list[int] | None = None,
                 dropped_rewards: Callable[[], list[str]] = list):
        """``sampling``: temperature 0 is greedy; ``ks``: the k of pass@k / maj@k (None: 1, 2,
        4, ... up to n); ``dropped_rewards``: the reward functions the run dropped, which a
        scorer started meanwhile drops too."""
        self.system, self.tasks, self.sampling, self.ks = system, tasks, sampling, ks
        self.dropped_rewards = dropped_rewards
        self.max_model_len = system.r.generator.max_model_len
        self.counts: Counter = Counter()  # calls sent again after a generator or scorer was lost
        self.sampling_record = {"temperature": sampling.temperature, "top_p": sampling.top_p,
                                "max_new_tokens": sampling.max_new_tokens, "max_model_len": self.max_model_len,
                                "greedy": sampling.temperature == 0, "seed": system.r.seed}

    def _calls(self) -> list[tuple[Task, list[dict]]]:
        """(task, problems) per generate call: one problem per call on vLLM; on transformers as
        many as fill ``hf_batch_size`` sequences, spread over every generator."""
        calls = []
        gens = max(1, len(self.system.generators.ready()))
        for task in self.tasks:
            if self.system.batches_requests:
                per = 1
            else:
                per = max(1, min(self.system.r.generator.hf_batch_size // task.num_samples,
                                 math.ceil(len(task.prompts) / gens)))
            calls += [(task, task.prompts[i:i + per]) for i in range(0, len(task.prompts), per)]
        return calls

    def _sampling(self, prompts: list[dict]) -> SamplingConfig:
        s = self.sampling
        room = self.max_model_len - max(len(p["prompt_ids"]) for p in prompts)
        return SamplingConfig(s.temperature if s.temperature > 0 else 1.0, s.top_p,
                              min(room, s.max_new_tokens) if s.max_new_tokens else room)

    def run(self, progress=None) -> dict[str, dict]:
        """Every task evaluated; returns {task name: {"report": ..., "problems": [...]}}.
        ``progress``: a tqdm bar over samples (problems x n), or None."""
        t0 = time.perf_counter()
        judged = self.collect(progress)
        out = {}
        for task in self.tasks:
            problems = [problem_record(task, p, mine, verdicts) for p, mine, verdicts in judged[task.name]]
            report = task_report(task, problems, ks_for(task.num_samples, self.ks))
            report.update(sampling=self.sampling_record, source=task.source,
                          policy_versions=sorted(self.versions) if self.versions else None, actors=self.actors)
            out[task.name] = {"report": report, "problems": problems}
        for entry in out.values():
            entry["report"]["time_s"] = time.perf_counter() - t0  # the tasks run interleaved: one clock
        return out

    def collect(self, progress=None) -> dict[str, list[tuple[dict, list, list]]]:
        """Every task's problems generated and judged: {task name: [(prompt, its rollouts, their
        (score, answer) verdicts)] in the task's order}.

        The calls stream through ``InFlight`` as GRPO's work does (deadlines, liveness), and a
        generator or scorer lost meanwhile is replaced as in GRPO (``Elastic``): its calls are
        sent again, nothing is counted twice. Inside a GRPO run the actors' own loss handler is
        set aside for the evaluation and put back after it."""
        system, dog = self.system, self.system.watchdog
        inflight = InFlight(dog, system.r.ray, 1, self._judge_budget, what="evaluation")
        if system.batches_requests:
            inflight.batched.add("generate")
        elastic = Elastic(system, inflight, system.r, 1, Hooks(self._generate, self._judge, self.dropped_rewards,
                                                             self.counts.update))
        self.inflight, self.elastic = inflight, elastic
        self.pending = [EvalCall(k, task, prompts) for k, (task, prompts) in enumerate(self._calls())]
        per_generator = system.generator_calls if system.batches_requests else 2
        total = sum(len(t.prompts) for t in self.tasks)
        judged: dict[str, list[tuple[int, int, tuple]]] = {t.name: [] for t in self.tasks}
        self.versions: set[int] = set()
        saved = dog.on_lost, dog.doing
        dog.on_lost, inflight.on_lost, dog.doing = elastic.actor_lost, elastic.work_lost, inflight.doing
        try:
            while self.pending or elastic.waiting() or any(w.stage != "join" for w in inflight.work):
                interrupt.check()
                elastic.heartbeat(system.r.ray.heartbeat_s)
                elastic.resync(False, system.version)  # a replaced vllm generator inside GRPO needs the weights
                elastic.flush_requeued()
                load = inflight.load("generate", len(system.generators))
                for i in elastic.usable():
                    while self.pending and load[i] < per_generator:
                        self._generate([self.pending.pop(0)], actor=i)
                        load[i] += 1
                work = inflight.next_done()
                if work.stage == "join":
                    elastic.on_join(work)
                elif work.stage == "sync":
                    elastic.synced(work)
                elif work.stage == "generate":
                    [call] = work.groups
                    call.rollouts = work.value
                    elastic.retire_drained()
                    if system.scorers.ready():
                        self._judge([call])
                    else:  # every scorer is being replaced
                        elastic.rescore.append(call)
                else:
                    [call] = work.groups
                    n = call.task.num_samples
                    for k, p in enumerate(call.prompts):
                        mine, verdicts = call.rollouts[k * n:(k + 1) * n], work.value[k * n:(k + 1) * n]
                        self.versions.update(v for r in mine for v in r.model_versions)
                        judged[call.task.name].append((call.seq, k, (p, mine, verdicts)))
                    if progress is not None:
                        progress.set_postfix(problems=f"{sum(map(len, judged.values()))}/{total}", refresh=False)
                        progress.update(len(call.prompts) * n)
        finally:
            for w in [w for w in inflight.work if w.stage == "join"]:  # still starting: GRPO's loop takes them
                inflight.remove(w)
            dog.on_lost, dog.doing = saved
        self.actors = {**elastic.counts_summary(), **self.counts}
        return {name: [done for _, _, done in sorted(calls, key=lambda c: c[:2])] for name, calls in judged.items()}

    def _generate(self, calls: list["EvalCall"], actor: int | None = None) -> None:
        """Each call to a generator (``actor``, or the least loaded usable one)."""
        gens, greedy = self.system.generators, self.sampling.temperature == 0
        for call in calls:
            i = actor if actor is not None else self.inflight.pick("generate", len(gens), self.elastic.usable())
            ref = gens.call(i, Generator.generate, call.prompts, call.task.num_samples, self._sampling(call.prompts),
                            greedy)
            self.inflight.submit(Work("generate", [ref], [call], actor=i, samples=call.samples))

    def _judge(self, calls: list["EvalCall"]) -> None:
        """Each generated call's completions to a ready scorer, judged by its task's judge."""
        scorers = self.system.scorers
        for call in calls:
            j = self.inflight.pick("score", len(scorers), scorers.ready())
            ref = scorers.call(j, RewardScorer.judge, call.rollouts, call.task.judge)
            self.inflight.submit(Work("score", [ref], [call], actor=j, samples=call.samples))

    def _judge_budget(self, samples: int) -> float:
        """The longest a scorer can take to judge ``samples``: each may time out."""
        sc = self.system.r.scorer
        return sc.timeout_s * math.ceil(samples / sc.workers_per_actor)


@dataclass(eq=False)
class EvalCall:
    """One generate call of an evaluation: a few problems of one task, then their completions."""

    seq: int  # its place in the evaluation (a call sent again keeps it)
    task: Task
    prompts: list[dict]
    rollouts: list = field(default_factory=list)

    @property
    def samples(self) -> int:
        return len(self.prompts) * self.task.num_samples


def problem_record(task: Task, prompt: dict, rollouts: list, verdicts: list) -> dict:
    """One problem's line of ``<task>.details.jsonl``."""
    cols = prompt["columns"]
    return {"task": task.name, "row": cols["row"], "problem_id": prompt["prompt_id"], "problem": cols["problem"],
            "gold": cols["answer"], "prompt": cols["prompt"], "prompt_tokens": len(prompt["prompt_ids"]),
            "gold_parsed": all(s is not None for s, _ in verdicts),
            "completions": [r.text for r in rollouts], "answers": [a for _, a in verdicts],
            "correct": [s is not None and s >= 1.0 for s, _ in verdicts],
            "completion_tokens": [len(r.completion_ids) for r in rollouts],
            "finish_reasons": [r.finish_reason for r in rollouts]}


def metrics_of(results: dict[str, dict]) -> dict:
    """The flat ``eval/<task>/<metric>`` numbers a training step's record carries."""
    flat = {}
    for name, entry in results.items():
        for key, value in entry["report"].items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and \
                    key not in ("time_s", "problems", "gold_unparsed", "num_samples"):
                flat[f"eval/{name}/{key}"] = value
    return flat


def write_results(results: dict[str, dict], out_dir: Path, checkpoint: str) -> dict:
    """``<task>.json`` (the report), ``<task>.details.jsonl`` (one line per problem) and
    ``results.json`` (every report) in ``out_dir``; returns the combined record."""
    from ..common.runlog import write_json_atomic

    out_dir.mkdir(parents=True, exist_ok=True)
    combined = {"checkpoint": checkpoint, "tasks": {}}
    for name, entry in results.items():
        report = {"checkpoint": checkpoint, **entry["report"]}
        write_json_atomic(out_dir / f"{name}.json", report)
        with open(out_dir / f"{name}.details.jsonl", "w") as f:
            for p in entry["problems"]:
                f.write(json.dumps(p) + "\n")
        combined["tasks"][name] = report
    write_json_atomic(out_dir / "results.json", combined)
    return combined


def table(combined: dict) -> str:
    """The combined results as a text table: one row per task, the problems evaluated and those
    left out (a gold answer that could not be parsed), pass@1 and the widest pass@k / maj@k."""
    rows = [("task", "problems", "left out", "n", "pass@1", "pass@k", "maj@k", "answered", "truncated", "tokens")]
    for name, r in combined["tasks"].items():
        n = r["num_samples"]
        k = max((int(key[5:]) for key in r if key.startswith("pass@")), default=1)
        left_out = r.get("gold_unparsed", 0)  # gold answers that could not be parsed: not in pass@k
        rows.append((name, str(r["problems"] - left_out), f"{left_out} (gold unparsed)" if left_out else "0", str(n),
                     f"{r['pass@1']:.3f}",
                     f"{r[f'pass@{k}']:.3f} (k={k})" if k > 1 else "-",
                     f"{r[f'maj@{k}']:.3f} (k={k})" if f"maj@{k}" in r else "-",
                     f"{r['answered']:.2f}", f"{r['truncated']:.2f}", f"{r['completion_tokens/mean']:.0f}"))
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])
