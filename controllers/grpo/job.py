"""The main job: tiny world (if asked) -> Ray -> actors -> SFT warm-up -> eval -> GRPO -> eval -> checkpoint."""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ...actors.learner import LearnerRank
from ..common.checkpoint import Checkpoints
from ..common.data import PreparedData, PromptRenderer, prepare_data
from ..common.job import (
    actors_running,
    check_output_dir,
    end_trackers,
    open_run,
    prepare_model,
    save_interrupted,
    start_trackers,
    trackers_ready,
    where,
)
from ..common.progress import progress
from ..common.runlog import MetricsWriter, read_jsonl, truncate_jsonl
from ..common.system import GRPO, System
from ..config import Recipe, check_teacher_tokenizer
from ..config.schema import ConfigError
from ..evaluation.evaluator import Evaluator, metrics_of, pass_at_1, write_results
from ..evaluation.tasks import load_tasks
from ..sft.data import held_out_examples
from ..sft.loop import run_sft
from .driver import GrpoDriver

log = logging.getLogger("r1ray")


def probe_prompts(recipe: Recipe, data: PreparedData, renderer: PromptRenderer, eval_used: int) -> list[dict]:
    """Prompts for the SFT early stop: the tail of the test split, which the final evaluation
    (its first ``eval_used`` rows) does not use (``prepare_data`` made sure some are left)."""
    if not (recipe.sft.steps and recipe.sft.stop_at_pass_rate):
        return []
    test_ds = data.test
    n = min(recipe.sft.probe_prompts, len(test_ds) - eval_used)
    return [renderer.prompt(test_ds[i], data.test_id(i)) for i in range(len(test_ds) - n, len(test_ds))]


def make_probe(system: System, recipe: Recipe, prompts: list[dict]):
    """pass@1 of the learner's current weights sampled as GRPO will sample them (one
    completion per prompt at ``sampling``), judged by ``eval.reward``."""
    if not prompts:
        return None

    def probe() -> float:
        system.sync_weights()
        return pass_at_1(system, prompts, recipe.sampling, recipe.eval.reward, greedy=False)["pass@1"]

    return probe


def record_eval(summary: dict, key: str, detail: dict) -> None:
    """Record a held-out evaluation (``eval_before`` / ``eval_after``) in the summary."""
    summary["stage"] = key
    summary[f"{key}_detail"], summary[key] = detail, detail["pass@1"]
    log.info("held-out pass@1 %s GRPO: %.3f", key.removeprefix("eval_"), detail["pass@1"])


def benchmarks(system: System, recipe: Recipe, tasks: list, run_dir: Path):
    """The evaluation every ``eval.every_steps`` steps: reports in ``<run_dir>/eval/step-<N>/``,
    and ``eval/<task>/...`` numbers for the step's record."""
    def benchmark_step(step: int, dropped_rewards: Callable[[], list[str]]) -> dict:
        log.info("step %d evaluation starts: %s", step,
                 ", ".join(f"{t.name} {len(t.prompts)} problems x {t.num_samples} samples" for t in tasks))
        results = Evaluator(system, tasks, recipe.eval.sampling, recipe.eval.k, dropped_rewards).run()
        write_results(results, run_dir / "eval" / f"step-{step}", f"{run_dir} at GRPO step {step}")
        found = metrics_of(results)
        log.info("step %d evaluation: %s", step, ", ".join(f"{k.split('/')[1]} pass@1 {v:.3f}"
                                                           for k, v in found.items() if k.endswith("/pass@1")))
        return found

    return benchmark_step


def resume_point(run_dir: Path, recipe: Recipe, model_path: str) -> dict:
    """Where ``--resume run_dir`` continues: the newest complete GRPO checkpoint, else the end of
    the SFT warm-up (its checkpoint-sft), else the start of GRPO. Refused, naming the run
    directory, when there is nothing to continue."""
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    state = Checkpoints(run_dir, recipe.checkpoint.every_steps, recipe.checkpoint.keep_last).latest()
    sft_dir = run_dir / "checkpoint-sft"
    sft_done = (sft_dir / "config.json").exists()
    if recipe.sft.steps and not sft_done:
        raise ConfigError(f"--resume {str(run_dir)!r}: the run stopped before its SFT warm-up finished "
                          f"(no {sft_dir.name}/){' but has GRPO checkpoints' if state else ''}; accepted: a run "
                          "directory whose SFT warm-up is done, or start a new run")
    if state is not None and state["step"] >= recipe.grpo.steps:
        raise ConfigError(f"config key 'grpo.steps': got {recipe.grpo.steps} but the run in {str(run_dir)!r} has "
                          f"already trained {state['step']} steps; accepted: more steps (--set grpo.steps=N) to train on")
    if state is None:
        log.warning("%s has no complete GRPO checkpoint (checkpoint.every_steps=%d): GRPO starts again from step 0%s",
                    run_dir, recipe.checkpoint.every_steps, ", from the SFT checkpoint" if sft_done else "")
    return {"state": state, "summary": summary, "model_path": str(sft_dir) if sft_done else model_path,
            "step": state["step"] if state else 0}


@dataclass
class Inputs:
    """What the job prepares before anything starts (a bad one is refused then)."""

    data: PreparedData
    renderer: PromptRenderer
    eval_prompts: list[dict]  # held-out pass@1 before and after GRPO (the test split's first rows)
    probes: list[dict]  # the SFT warm-up's early-stop probe (the test split's tail)
    sft_held_out: list  # conversations for the warm-up's held-out loss
    tasks: list  # benchmarks every eval.every_steps (checked for overlap with the training data)
    eval_sampling: object


def prepare_inputs(recipe: Recipe, model_path: str, tiny_dir: Path | None) -> Inputs:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    check_teacher_tokenizer(recipe, tokenizer)
    data = prepare_data(recipe, tokenizer, tiny_dir)
    renderer = PromptRenderer(tokenizer, recipe.data, recipe.rollout.tools, recipe.rollout.environment)
    eval_prompts = [renderer.prompt(data.test[i], data.test_id(i))
                    for i in range(min(recipe.eval.num_prompts, len(data.test)))]
    s = recipe.sampling
    return Inputs(data, renderer, eval_prompts, probe_prompts(recipe, data, renderer, len(eval_prompts)),
                  held_out_examples(recipe, data.test, renderer) if recipe.sft.steps else [],
                  load_tasks(recipe, tokenizer, tiny_dir, check_overlap=True) if recipe.eval.every_steps else [],
                  s if recipe.eval.max_new_tokens is None else type(s)(s.temperature, s.top_p, recipe.eval.max_new_tokens))


def continued(run_dir: Path, summary: dict, previous: dict | None) -> tuple[dict, dict]:
    """A resumed run's summary (what it had, less how it ended) and its step counts so far; what
    it wrote after the checkpoint is cut away, to be written again."""
    if previous is None:
        return summary, {"sft_steps_done": 0, "grpo_steps_done": 0}
    for name in ("metrics.jsonl", "samples.jsonl", "completions.jsonl"):
        truncate_jsonl(run_dir / name, previous["step"])
    kept = {k: v for k, v in previous["summary"].items() if k not in ("error", "signal", "grpo", "eval_after")}
    log.info("resuming %s at GRPO step %d", run_dir, previous["step"])
    return ({**kept, **summary, "resumed_from_step": previous["step"]},
            {"sft_steps_done": previous["summary"].get("sft_steps_done", 0), "grpo_steps_done": previous["step"]})


def sft_warm_up(system: System, recipe: Recipe, inputs: Inputs, sft_metrics, run_dir: Path, summary: dict) -> None:
    """The SFT warm-up on the learners (stopped early by the probe when asked), its checkpoint,
    and the generators and the reference brought to the SFT policy. LoRA: the adapters are
    folded into the base (``rebase_adapters``), so the adapters-off reference is the SFT policy
    and GRPO's adapters start from zero on it; checkpoint-sft, always written then, is that base
    (what ``checkpoint-final/adapter`` applies to, and where a resumed run starts)."""
    summary["stage"] = "sft"
    with progress(recipe.sft.steps, "SFT warm-up", "step") as bar:
        t0 = time.perf_counter()
        sft = run_sft(system, recipe.sft, inputs.data, inputs.renderer, sft_metrics, recipe.seed, bar,
                      probe=make_probe(system, recipe, inputs.probes), held_out=inputs.sft_held_out)
    summary["sft"] = {"steps": len(sft), "final_loss": sft[-1]["loss"], "time_s": time.perf_counter() - t0,
                      "probes": {r["step"]: r["probe_pass@1"] for r in sft if "probe_pass@1" in r}}
    lora = recipe.learner.lora is not None
    if recipe.sft.save_checkpoint or recipe.checkpoint.every_steps or lora:  # a resumed run starts from it
        summary["sft"]["checkpoint"] = str(run_dir / "checkpoint-sft")
        system.learners.run_all(LearnerRank.save_hf, summary["sft"]["checkpoint"])
    if lora:
        system.learners.run_all(LearnerRank.rebase_adapters)
    system.sync_weights(include_reference=True)


def restore(system: System, checkpoints: Checkpoints, previous: dict | None, run_dir: Path) -> dict | None:
    """A resumed run's learners (weights, optimizer, schedule, RNG) and generators at its
    checkpoint; returns the driver's state from it (None: GRPO starts at step 0)."""
    if previous is None or previous["state"] is None:
        return None
    state = previous["state"]
    system.learners.run_all(LearnerRank.load_checkpoint, str(checkpoints.dir), state["tag"])
    system.version = state["policy_version"] - 1  # the generators get the checkpoint's weights as its version
    system.sync_weights()
    return {**state, "records": read_jsonl(run_dir / "metrics.jsonl")}


def grpo_job(recipe: Recipe, resume: Path | None = None, fresh_if_unresumable: bool = False) -> dict:
    """The whole ``r1ray train`` job: an SFT warm-up, held-out pass@1, GRPO, pass@1 again, the
    final checkpoint. Everything a user can get wrong (config, data, output directory, cluster
    address, resources) is refused before the run directory exists, so it leaves nothing behind.
    Afterwards summary.json always says how the run ended: completed, interrupted or failed.

    ``resume``: a run directory to continue (``r1ray train --resume``), from its newest complete
    checkpoint, with the same data order; the records after that checkpoint are written again.
    ``fresh_if_unresumable`` (``--resume auto``): a run that cannot be continued (stopped in its
    SFT warm-up) is started again in a new run directory instead of refused."""
    t_start = time.perf_counter()
    if resume is None:
        check_output_dir(recipe)
    tracker_names = trackers_ready(recipe)
    model_path, tiny_dir = prepare_model(recipe)
    inputs = prepare_inputs(recipe, model_path, tiny_dir)
    previous = None
    if resume is not None:
        try:
            previous = resume_point(resume, recipe, model_path)
        except ConfigError as e:
            if not fresh_if_unresumable or "SFT warm-up" not in str(e):
                raise
            log.warning("%s; starting the run again (--resume auto)", e)
            resume = None
    run_dir = open_run(recipe, GRPO, resume)
    log.info("run directory: %s", where(run_dir))
    summary, done_before = continued(run_dir, {"run_dir": str(run_dir), "model": model_path, "status": "running",
                                               "stage": "startup", "data": inputs.data.summary()}, previous)
    system = System(recipe, previous["model_path"] if previous else model_path, log_dir=run_dir / "servers")
    trackers = start_trackers(recipe, run_dir, tracker_names)
    metrics = MetricsWriter(run_dir, trackers=trackers)
    sft_metrics = MetricsWriter(run_dir, "sft_metrics.jsonl", trackers=trackers, axis="sft")
    checkpoints = Checkpoints(run_dir, recipe.checkpoint.every_steps, recipe.checkpoint.keep_last)

    def wrap_up() -> bool:
        checkpoints.settle(system.learners)  # on object storage: uploads still in progress
        summary.update(wall_s=time.perf_counter() - t_start,
                       sft_steps_done=done_before["sft_steps_done"] + sft_metrics.count,
                       grpo_steps_done=done_before["grpo_steps_done"] + metrics.count)
        metrics.close()
        sft_metrics.close()
        if summary["status"] == "interrupted" and recipe.checkpoint.on_interrupt and summary["stage"] in ("sft", "grpo"):
            save_interrupted(system, run_dir, summary)
        end_trackers(trackers, run_dir, summary)
        return metrics.count > 0 or sft_metrics.count > 0

    with actors_running(system, run_dir, summary, previous["summary"] if previous else None, wrap_up):
        if recipe.sft.steps and previous is None:
            sft_warm_up(system, recipe, inputs, sft_metrics, run_dir, summary)
        if inputs.eval_prompts and "eval_before" not in summary:
            record_eval(summary, "eval_before", pass_at_1(system, inputs.eval_prompts, inputs.eval_sampling,
                                                          recipe.eval.reward))
        summary["stage"] = "grpo"
        system.learners.run_all(LearnerRank.start_phase, recipe.learner.optim.lr, recipe.learner.optim.warmup_steps)
        resume_state = restore(system, checkpoints, previous, run_dir)
        completions_log = MetricsWriter(run_dir, "completions.jsonl", trackers=trackers, table="completions")
        samples_log = MetricsWriter(run_dir, "samples.jsonl")
        driver = GrpoDriver(system, recipe, inputs.data, inputs.renderer, metrics, completions_log=completions_log,
                            samples_log=samples_log, checkpoints=checkpoints, resume=resume_state,
                            benchmark_step=benchmarks(system, recipe, inputs.tasks, run_dir) if inputs.tasks else None,
                            timeline=run_dir / "timeline.json")
        try:
            with progress(recipe.grpo.steps, f"GRPO (max_staleness={recipe.grpo.max_staleness})", "step",
                          initial=resume_state["step"] if resume_state else 0) as bar:
                driver.run(progress=bar)
        finally:  # (a run stopped or failed keeps the timeline of what was drained)
            driver.telemetry.close()
        completions_log.close()
        samples_log.close()
        summary["grpo"] = driver.summary()
        if inputs.eval_prompts:
            record_eval(summary, "eval_after", pass_at_1(system, inputs.eval_prompts, inputs.eval_sampling,
                                                         recipe.eval.reward, dropped_rewards=driver.rewards.dropped))
        summary["stage"] = "checkpoint"
        ckpt = run_dir / "checkpoint-final"
        # LoRA: also the adapters alone, on the model GRPO started from (the warm-up's checkpoint-sft)
        system.learners.run_all(LearnerRank.save_hf, str(ckpt), summary.get("sft", {}).get("checkpoint") or system.model_path)
        summary["checkpoint"] = str(ckpt)
        summary["status"] = "completed"
    return summary
