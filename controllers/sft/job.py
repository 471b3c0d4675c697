"""``r1ray sft``: supervised fine-tuning on reasoning traces as a stage of its own.

The DeepSpeed learner group alone (ZeRO-2/3; bf16 on GPU, fp32 on CPU) trains on the recipe's
conversations (``data.messages_column``): chat template, loss on assistant tokens, optional
packing, ``sft.max_seq_length`` truncation (counted), a warm-up then constant / linear /
cosine learning rate, held-out loss every ``sft.eval_every`` steps. Every
``checkpoint.every_steps`` steps it writes an HF checkpoint (``checkpoints/step-N/hf``,
loadable by transformers and vLLM) beside the DeepSpeed state and the data position, keeping
the newest ``checkpoint.keep_last``; ``r1ray sft --resume RUN_DIR`` continues from the newest
one with the same data order. The result is ``<run_dir>/checkpoint-sft``, which a GRPO stage
takes as its ``model.path``.

Layout of the run directory: config.yaml, sft_metrics.jsonl (+ TensorBoard), summary.json,
checkpoints/step-N/{DeepSpeed state, hf/, driver.json}, checkpoint-sft/.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path

from ...actors.learner import LearnerRank
from ..common.checkpoint import Checkpoints, tag_for
from ..common.data import PreparedData, PromptRenderer, load_dataset_dict, prepare_data
from ..common.job import (
    actors_running,
    check_output_dir,
    end_trackers,
    open_run,
    prepare_model,
    start_trackers,
    trackers_ready,
    where,
)
from ..common.progress import progress
from ..common.runlog import MetricsWriter, read_json, truncate_jsonl
from ..common.system import SFT, System
from ..config import Recipe
from ..config.schema import ConfigError
from .data import Truncation, held_out_examples
from .loop import run_sft

log = logging.getLogger("r1ray")


def sft_only(recipe: Recipe) -> Recipe:
    """The recipe as the data checks see an SFT stage: no GRPO prompts, no generation."""
    return dataclasses.replace(recipe, grpo=dataclasses.replace(recipe.grpo, steps=0),
                               eval=dataclasses.replace(recipe.eval, num_prompts=0, every_steps=0, tasks=[]),
                               sft=dataclasses.replace(recipe.sft, steps=max(1, recipe.sft.steps), stop_at_pass_rate=None))


def sft_steps(recipe: Recipe, data: PreparedData) -> int:
    """``sft.steps``, or ``sft.epochs`` passes over the training conversations."""
    if recipe.sft.epochs is None:
        return recipe.sft.steps
    return max(1, math.ceil(recipe.sft.epochs * len(data.train) / recipe.sft.batch_size))


def sft_job(recipe: Recipe, resume: Path | None = None) -> dict:
    """The whole ``r1ray sft`` job; returns the summary (also written to summary.json)."""
    from transformers import AutoTokenizer


    t_start = time.perf_counter()
    if not recipe.sft.steps and recipe.sft.epochs is None:
        raise ConfigError("config keys 'sft.steps' / 'sft.epochs': got 0 / null; accepted: steps > 0, or epochs > 0 "
                          "(passes over the training conversations)")
    if resume is None:
        check_output_dir(recipe)
    tracker_names = trackers_ready(recipe)
    model_path, tiny_dir = prepare_model(recipe)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    checked = sft_only(recipe)
    data = prepare_data(checked, tokenizer, tiny_dir)
    renderer = PromptRenderer(tokenizer, recipe.data, recipe.rollout.tools)
    splits = load_dataset_dict(recipe.data, tiny_dir) if recipe.sft.eval_every else {}
    held_out = held_out_examples(recipe, splits.get(recipe.data.test_split) if splits else None, renderer)
    cfg = dataclasses.replace(recipe.sft, steps=sft_steps(recipe, data), stop_at_pass_rate=None)
    checkpoints = Checkpoints(resume or Path("."), recipe.checkpoint.every_steps, recipe.checkpoint.keep_last)
    state = checkpoints.latest() if resume is not None else None
    before = read_json(resume / "summary.json") if resume is not None else None
    if resume is not None and state is None:
        log.warning("%s has no complete SFT checkpoint (checkpoint.every_steps=%d): starting again from step 0",
                    resume, recipe.checkpoint.every_steps)
    if state is not None and state["step"] >= cfg.steps:
        raise ConfigError(f"config key 'sft.steps': the run in {str(resume)!r} has already trained {state['step']} of "
                          f"{cfg.steps} steps; accepted: more steps (--set sft.steps=N) to train on")
    run_dir = open_run(recipe, SFT, resume)
    checkpoints = Checkpoints(run_dir, recipe.checkpoint.every_steps, recipe.checkpoint.keep_last)
    done = state["step"] if state else 0
    if done:
        truncate_jsonl(run_dir / "sft_metrics.jsonl", done)
    summary: dict = {"run_dir": str(run_dir), "model": model_path, "stage": "sft", "status": "running",
                     "data": data.summary(), "steps": cfg.steps, **({"resumed_from_step": done} if done else {})}
    log.info("run directory: %s (SFT, %d steps%s)", where(run_dir), cfg.steps, f", from step {done}" if done else "")
    system = System(recipe, model_path, SFT)
    trackers = start_trackers(recipe, run_dir, tracker_names)
    metrics = MetricsWriter(run_dir, "sft_metrics.jsonl", trackers=trackers, axis="sft")
    truncation = Truncation(**state["truncation"]) if state else Truncation()
    records: list[dict] = []

    def after_step(step: int, taken: int) -> None:
        if not checkpoints.due(step) or step == cfg.steps:
            return
        tag = tag_for(step)
        saved = system.learners.get(checkpoints.save(step, system.learners), "save_checkpoint")
        system.learners.run_all(LearnerRank.save_hf, str(checkpoints.dir / tag / "hf"))
        checkpoints.commit({"step": step, "policy_version": 0, "sampler_taken": taken,
                            "truncation": dataclasses.asdict(truncation)}, saved, system.learners)

    def wrap_up() -> bool:
        checkpoints.settle(system.learners)  # on object storage: uploads still in progress
        summary.update(sft_report(records, truncation, done + metrics.count), wall_s=time.perf_counter() - t_start)
        metrics.close()
        end_trackers(trackers, run_dir, summary)
        return metrics.count > 0

    with actors_running(system, run_dir, summary, before, wrap_up):
        resume_at = (state["step"], state["sampler_taken"]) if state is not None else None
        with progress(cfg.steps, "SFT", "step", initial=done) as bar:
            records = run_sft(system, cfg, data, renderer, metrics, recipe.seed, bar, held_out=held_out,
                              truncation=truncation, resume_at=resume_at, after_step=after_step,
                              load_state=(str(checkpoints.dir), state["tag"]) if state else None)
        final = run_dir / "checkpoint-sft"
        system.learners.run_all(LearnerRank.save_hf, str(final), system.model_path)  # LoRA: + final/adapter
        summary.update(status="completed", checkpoint=str(final))
    return summary


def sft_report(records: list[dict], truncation: Truncation, steps_done: int) -> dict:
    """What summary.json says about the SFT steps of this invocation."""
    out: dict = {"steps_done": steps_done, "truncated": {"examples": truncation.examples,
                                                          "tokens_lost": truncation.tokens_lost,
                                                          "dropped_rows": len(truncation.dropped)}}
    if records:
        seconds = sum(r["time/step_s"] for r in records)
        out.update(final_loss=records[-1]["loss"],
                   tokens_per_s=sum(r["tokens_in"] for r in records) / seconds if seconds else 0.0,
                   padding_waste=sum(r["padding_waste"] for r in records) / len(records))
        evals = [r["eval_loss"] for r in records if "eval_loss" in r]
        if evals:
            out["final_eval_loss"] = evals[-1]
    return out
