"""Evaluation: held-out pass@1 during training, and benchmarks the way reasoning papers report them.

``pass_at_1``: one completion per held-out prompt (greedy by default), judged by one reward
function; the quick before/after number of ``r1ray train``.

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
from pathlib import Path

import ray

from ...actors.generator import Generator, SamplingConfig
from ...actors.scorer import RewardScorer
from ...cluster.groups import RemoteCallError
from ..common import interrupt
from ..common.system import System
from .tasks import Task


def pass_at_1(system: System, prompts: list[dict], sampling, reward: str = "accuracy", greedy: bool = True) -> dict:
    """Fraction of prompts whose completion (greedy, or one sample with ``sampling``) scores 1
    (a None score counts as a miss)."""
    t0 = time.perf_counter()
    rollouts = system.generators.map(Generator.generate, prompts, 1, sampling, greedy)
    scores = system.scorers.map(RewardScorer.score_one, rollouts, reward)
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

    def __init__(self, system: System, tasks: list[Task], eval_cfg, max_model_len: int, call_timeout_s: float):
        self.system, self.tasks, self.cfg = system, tasks, eval_cfg
        self.max_model_len, self.timeout = max_model_len, call_timeout_s
        self.sampling_record = {"temperature": eval_cfg.sampling.temperature, "top_p": eval_cfg.sampling.top_p,
                                "max_new_tokens": eval_cfg.sampling.max_new_tokens,
                                "max_model_len": max_model_len, "greedy": eval_cfg.sampling.temperature == 0,
                                "seed": system.r.seed}

    def _calls(self) -> list[tuple[Task, list[dict]]]:
        """(task, problems) per generate call: one problem per call on vLLM; on transformers as
        many as fill ``hf_batch_size`` sequences, spread over every generator."""
        calls = []
        gens = max(1, len(self.system.generators.ready()))
        for task in self.tasks:
            if self.system.streams_weights:
                per = 1
            else:
                per = max(1, min(self.system.r.generator.hf_batch_size // task.num_samples,
                                 math.ceil(len(task.prompts) / gens)))
            calls += [(task, task.prompts[i:i + per]) for i in range(0, len(task.prompts), per)]
        return calls

    def _sampling(self, prompts: list[dict]) -> SamplingConfig:
        s = self.cfg.sampling
        room = self.max_model_len - max(len(p["prompt_ids"]) for p in prompts)
        return SamplingConfig(s.temperature if s.temperature > 0 else 1.0, s.top_p,
                              min(room, s.max_new_tokens) if s.max_new_tokens else room)

    def run(self, progress=None) -> dict[str, dict]:
        """Every task evaluated; returns {task name: {"report": ..., "problems": [...]}}.
        ``progress``: a tqdm bar over samples (problems x n), or None."""
        t0 = time.perf_counter()
        gens, scorers = self.system.generators, self.system.scorers
        pending = self._calls()
        total = sum(len(t.prompts) for t in self.tasks)
        per_generator = self.system.generator_calls if self.system.streams_weights else 2
        greedy = self.cfg.sampling.temperature == 0
        running: dict = {}  # ref -> (stage, task, prompts, rollouts)
        slots: Counter = Counter()  # generator index -> calls in flight
        results: dict[str, list[dict]] = {t.name: [] for t in self.tasks}
        versions: set[int] = set()
        last_progress = time.monotonic()
        next_scorer = 0
        while pending or running:
            interrupt.check()
            for i in gens.ready():
                while pending and slots[i] < per_generator:
                    task, prompts = pending.pop(0)
                    ref = gens.call(i, Generator.generate, prompts, task.num_samples, self._sampling(prompts), greedy)
                    running[ref] = ("generate", task, prompts, i)
                    slots[i] += 1
            done, _ = ray.wait(list(running), num_returns=1, timeout=min(10.0, self.timeout))
            if not done:
                if self.system.watchdog is not None:
                    self.system.watchdog.check("evaluation")
                if time.monotonic() - last_progress > self.timeout:
                    raise RemoteCallError(f"evaluation: nothing finished in {self.timeout:.0f} s (ray.call_timeout_s) "
                                          f"with {len(running)} calls in flight")
                continue
            last_progress = time.monotonic()
            ref = done[0]
            stage, task, prompts, who = running.pop(ref)
            if stage == "generate":
                slots[who] -= 1
                rollouts = gens.get(ref, "generate (evaluation)")
                ready = scorers.ready()
                j = ready[next_scorer % len(ready)]
                next_scorer += 1
                running[scorers.call(j, RewardScorer.judge, rollouts, task.judge)] = ("judge", task, prompts, rollouts)
                continue
            rollouts = who
            judged = scorers.get(ref, "judge (evaluation)")
            n = task.num_samples
            for k, p in enumerate(prompts):
                mine, verdicts = rollouts[k * n:(k + 1) * n], judged[k * n:(k + 1) * n]
                versions.update(v for r in mine for v in r.versions)
                results[task.name].append(problem_record(task, p, mine, verdicts))
            if progress is not None:
                progress.update(len(prompts) * n)
                progress.set_postfix(problems=f"{sum(map(len, results.values()))}/{total}", refresh=False)
        out = {}
        for task in self.tasks:
            problems = sorted(results[task.name], key=lambda p: p["row"])
            report = task_report(task, problems, ks_for(task.num_samples, self.cfg.k))
            report.update(sampling=self.sampling_record, source=task.source,
                          policy_versions=sorted(versions) if versions else None)
            out[task.name] = {"report": report, "problems": problems}
        for entry in out.values():
            entry["report"]["time_s"] = time.perf_counter() - t0  # the tasks run interleaved: one clock
        return out


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
