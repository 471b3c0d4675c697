"""The main job: tiny world (if asked) -> Ray -> actors -> SFT warm-up -> eval -> GRPO -> eval -> checkpoint."""
from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from tqdm.auto import tqdm

from . import interrupt
from .checkpoint import Checkpoints, truncate_jsonl
from .config import TINY, Recipe, check_resources, dump, joins_cluster
from .data import PreparedData, PromptRenderer, prepare_data
from .eval_tasks import load_tasks
from .evaluate import Evaluator, metrics_of, pass_at_1, write_results
from .grpo import GrpoDriver
from .metrics import MetricsWriter, read_jsonl, write_json_atomic
from .schema import ConfigError
from .sft import run_sft
from .sft_run import held_out_examples
from .system import GRPO, System

log = logging.getLogger("r1ray")


def prepare_model(recipe: Recipe) -> tuple[str, Path | None]:
    """Resolve model.path; build the tiny world when the recipe asks for it and it is missing."""
    if recipe.model.path != TINY and recipe.data.path != TINY:
        return recipe.model.path, None
    from .tiny import build_tiny_world

    tiny_dir = Path(os.path.expanduser(recipe.model.tiny_dir))
    t0 = time.perf_counter()
    build_tiny_world(tiny_dir)
    log.info("tiny world ready in %s (%.1fs)", tiny_dir, time.perf_counter() - t0)
    model_path = str(tiny_dir / "model") if recipe.model.path == TINY else recipe.model.path
    return model_path, tiny_dir


def _output_error(path: Path, why: str) -> ConfigError:
    return ConfigError(f"config key 'output_dir' (or --output-dir): {str(path)!r} {why}; accepted: a directory "
                       "that can be created and written, or an existing one")


def check_output_dir(recipe: Recipe) -> None:
    """Refuse an output directory that cannot be written, before anything starts or is created."""
    base = Path(recipe.output_dir).expanduser()
    if base.exists() and not base.is_dir():
        raise _output_error(base, "is a file, not a directory")
    ancestor = base
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise _output_error(base, f"is below {str(ancestor)!r}, which is a file")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise _output_error(base, f"cannot be written: {str(ancestor)!r} is read-only for this user")


def run_dir_for(recipe: Recipe) -> Path:
    """A fresh run directory: an existing non-empty one is never overwritten (suffix -1, -2, ...)."""
    base = Path(recipe.output_dir).expanduser()
    check_output_dir(recipe)
    candidate, i = base, 0
    while candidate.exists() and any(candidate.iterdir()):
        i += 1
        candidate = base.with_name(f"{base.name}-{i}")
    try:
        candidate.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _output_error(candidate, f"cannot be created ({e.strerror})") from None
    return candidate


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


def held_out(summary: dict, key: str, detail: dict) -> None:
    """Record a held-out evaluation (``eval_before`` / ``eval_after``) in the summary."""
    summary["stage"] = key
    summary[f"{key}_detail"], summary[key] = detail, detail["pass@1"]
    log.info("held-out pass@1 %s GRPO: %.3f", key.removeprefix("eval_"), detail["pass@1"])


def benchmarks(system: System, recipe: Recipe, tasks: list, run_dir: Path):
    """The evaluation every ``eval.every_steps`` steps: reports in ``<run_dir>/eval/step-<N>/``,
    and ``eval/<task>/...`` numbers for the step's record."""
    evaluator = Evaluator(system, tasks, recipe.eval, recipe.generator.max_model_len, recipe.ray.call_timeout_s)

    def evaluate(step: int) -> dict:
        results = evaluator.run()
        write_results(results, run_dir / "eval" / f"step-{step}", f"{run_dir} at GRPO step {step}")
        found = metrics_of(results)
        log.info("step %d evaluation: %s", step, ", ".join(f"{k.split('/')[1]} pass@1 {v:.3f}"
                                                           for k, v in found.items() if k.endswith("/pass@1")))
        return found

    return evaluate


def check_placement(recipe: Recipe, roles: tuple[str, ...]) -> None:
    """Every bundle of the placement plan fits on some alive node (a generator's
    tensor_parallel_size GPUs on one node), and all of them together fit the cluster."""
    from ..cluster.placement import alive_nodes, unplaceable
    from .system import placement_plan

    why = unplaceable(placement_plan(recipe, roles), alive_nodes())
    if why:
        key = "generator.tensor_parallel_size" if why.startswith("generator") else "the actors' cpus_per_* / gpus_per_*"
        raise ConfigError(f"config key '{key}': the placement cannot be met on this cluster: {why}")


def connect(recipe: Recipe, roles: tuple[str, ...] = GRPO) -> None:
    """Start or join Ray; on a joined cluster check its resources and take a free namespace.
    Raises ConfigError / ClusterUnreachable / ShipError with Ray stopped again. ``roles``: the
    actor groups the job starts (``system.GRPO``, ``EVALUATE``, ``SFT``), whose placement is checked."""
    from ..cluster import runtime

    on_gpu = (recipe.learner.gpus_per_rank or 0) > 0
    resources = runtime.start(recipe.ray.address, recipe.ray.namespace, recipe.ray.num_cpus, recipe.ray.num_gpus,
                              recipe.ray.dashboard, recipe.ray.object_store_mb, on_gpu, recipe.ray.connect_timeout_s,
                              recipe.ray.ship_code)
    try:
        if joins_cluster(recipe) and "learner" in roles:  # the cluster's real size, before any actor starts
            check_resources(recipe, resources.get("CPU", 0), resources.get("GPU", 0), learners_only="rollout" not in roles)
        check_placement(recipe, roles)
        namespace = runtime.free_namespace(recipe.ray.namespace)
    except BaseException:
        runtime.stop()
        raise
    if namespace != recipe.ray.namespace:
        log.warning("Ray namespace %r is in use by another run on this cluster: this run uses %r",
                    recipe.ray.namespace, namespace)
        recipe.ray.namespace = namespace


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


def train(recipe: Recipe, resume: Path | None = None, fresh_if_unresumable: bool = False) -> dict:
    """The whole job. Everything a user can get wrong (config, data, output directory, cluster
    address, resources) is refused before the run directory exists, so it leaves nothing behind.
    Afterwards summary.json always says how the run ended: completed, interrupted or failed.

    ``resume``: a run directory to continue (``r1ray train --resume``), from its newest complete
    checkpoint, with the same data order; the records after that checkpoint are written again.
    ``fresh_if_unresumable`` (``--resume auto``): a run that cannot be continued (stopped in its
    SFT warm-up) is started again in a new run directory instead of refused."""
    from transformers import AutoTokenizer

    from ..cluster import runtime

    t_start = time.perf_counter()
    if resume is None:
        check_output_dir(recipe)
    model_path, tiny_dir = prepare_model(recipe)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    data = prepare_data(recipe, tokenizer, tiny_dir)
    renderer = PromptRenderer(tokenizer, recipe.data)
    eval_prompts = [renderer.prompt(data.test[i], data.test_id(i))
                    for i in range(min(recipe.eval.num_prompts, len(data.test)))]
    probes = probe_prompts(recipe, data, renderer, len(eval_prompts))
    sft_held_out = held_out_examples(recipe, data.test, renderer) if recipe.sft.steps else []
    # Benchmarks every eval.every_steps: checked now (a task overlapping the training data is refused).
    tasks = load_tasks(recipe, tokenizer, tiny_dir, check_overlap=True) if recipe.eval.every_steps else []
    eval_sampling = recipe.sampling if recipe.eval.max_new_tokens is None else \
        type(recipe.sampling)(recipe.sampling.temperature, recipe.sampling.top_p, recipe.eval.max_new_tokens)
    previous = None
    if resume is not None:
        try:
            previous = resume_point(resume, recipe, model_path)
        except ConfigError as e:
            if not fresh_if_unresumable or "SFT warm-up" not in str(e):
                raise
            log.warning("%s; starting the run again (--resume auto)", e)
            resume = None
    connect(recipe)
    stop_on_sigterm()
    try:
        run_dir = resume if resume is not None else run_dir_for(recipe)
    except ConfigError:
        runtime.stop()
        raise
    dump(recipe, run_dir / "config.yaml")
    log.info("run directory: %s", run_dir)
    summary: dict = {"run_dir": str(run_dir), "model": model_path, "status": "running", "stage": "startup",
                     "data": data.summary()}
    done_before = {"sft_steps_done": 0, "grpo_steps_done": 0}
    if previous is not None:  # what the run wrote after the checkpoint is done again
        for name in ("metrics.jsonl", "samples.jsonl", "completions.jsonl"):
            truncate_jsonl(run_dir / name, previous["step"])
        kept = {k: v for k, v in previous["summary"].items() if k not in ("error", "signal", "grpo", "eval_after")}
        summary = {**kept, **summary, "resumed_from_step": previous["step"]}
        done_before = {"sft_steps_done": previous["summary"].get("sft_steps_done", 0),
                       "grpo_steps_done": previous["step"]}
        log.info("resuming %s at GRPO step %d", run_dir, previous["step"])
    system = System(recipe, previous["model_path"] if previous else model_path)
    metrics = MetricsWriter(run_dir, purge_step=previous["step"] + 1 if previous else None)
    sft_metrics = MetricsWriter(run_dir, "sft_metrics.jsonl", tensorboard=False)
    checkpoints = Checkpoints(run_dir, recipe.checkpoint.every_steps, recipe.checkpoint.keep_last)
    try:
        system.start()
        summary["startup_s"] = system.startup_s
        if recipe.sft.steps and previous is None:
            summary["stage"] = "sft"
            with tqdm(total=recipe.sft.steps, desc="SFT warm-up", unit="step", dynamic_ncols=True) as bar:
                t0 = time.perf_counter()
                sft = run_sft(system, recipe.sft, data, renderer, sft_metrics, recipe.seed, bar,
                              probe=make_probe(system, recipe, probes), held_out=sft_held_out)
            summary["sft"] = {"steps": len(sft), "final_loss": sft[-1]["loss"], "time_s": time.perf_counter() - t0,
                              "probes": {r["step"]: r["probe_pass@1"] for r in sft if "probe_pass@1" in r}}
            if recipe.sft.save_checkpoint or recipe.checkpoint.every_steps:  # a resumed run starts from it
                summary["sft"]["checkpoint"] = str(run_dir / "checkpoint-sft")
                system.learners.run_all("save_hf", summary["sft"]["checkpoint"])
            # Generators and the reference start GRPO from the SFT policy.
            system.sync_weights(include_reference=True)
        if eval_prompts and "eval_before" not in summary:
            held_out(summary, "eval_before", pass_at_1(system, eval_prompts, eval_sampling, recipe.eval.reward))
        summary["stage"] = "grpo"
        system.learners.run_all("start_phase", recipe.learner.optim.lr, recipe.learner.optim.warmup_steps)
        resume_state = None
        if previous is not None and previous["state"] is not None:
            state = previous["state"]
            system.learners.run_all("load_checkpoint", str(checkpoints.dir), state["tag"])
            system.version = state["policy_version"] - 1  # the generators get the checkpoint's weights as its version
            system.sync_weights()
            resume_state = {**state, "records": read_jsonl(run_dir / "metrics.jsonl")}
        completions_log = MetricsWriter(run_dir, "completions.jsonl", tensorboard=False)
        samples_log = MetricsWriter(run_dir, "samples.jsonl", tensorboard=False)
        driver = GrpoDriver(system, recipe, data, renderer, metrics, completions_log=completions_log,
                            samples_log=samples_log, checkpoints=checkpoints, resume=resume_state,
                            evaluate=benchmarks(system, recipe, tasks, run_dir) if tasks else None)
        with tqdm(total=recipe.grpo.steps, desc=f"GRPO (max_staleness={recipe.grpo.max_staleness})", unit="step",
                  dynamic_ncols=True) as bar:
            driver.run(progress=bar)
        completions_log.close()
        samples_log.close()
        summary["grpo"] = driver.summary()
        driver.telemetry.write_timeline(run_dir / "timeline.json")
        if eval_prompts:
            held_out(summary, "eval_after", pass_at_1(system, eval_prompts, eval_sampling, recipe.eval.reward))
        summary["stage"] = "checkpoint"
        ckpt = run_dir / "checkpoint-final"
        system.learners.run_all("save_hf", str(ckpt))
        summary["checkpoint"] = str(ckpt)
        summary["status"] = "completed"
    except BaseException as e:
        ended(summary, e, run_dir)
        raise
    finally:
        with signals_ignored():  # a second Ctrl-C must not cut the clean-up short
            summary.update(wall_s=time.perf_counter() - t_start,
                           sft_steps_done=done_before["sft_steps_done"] + sft_metrics.count,
                           grpo_steps_done=done_before["grpo_steps_done"] + metrics.count)
            metrics.close()
            sft_metrics.close()
            if summary["status"] == "interrupted" and recipe.checkpoint.on_interrupt and summary["stage"] in ("sft", "grpo"):
                save_interrupted(system, run_dir, summary)
            summary = resume_outcome(previous["summary"] if previous else None, summary,
                                     progressed=metrics.count > 0 or sft_metrics.count > 0)
            close_run(system, run_dir, summary)
    return summary


def resume_outcome(previous: dict | None, summary: dict, progressed: bool) -> dict:
    """What summary.json keeps after a resume: a resumed run that failed or was stopped before
    its first new step leaves the outcome the run had recorded (completed, interrupted, failed)
    as it was, and notes the attempt under ``last_resume``."""
    if not previous or progressed or summary.get("status") == "completed":
        return summary
    return {**previous, "last_resume": {k: summary[k] for k in ("status", "error", "signal") if k in summary}}


def ended(summary: dict, e: BaseException, run_dir: Path) -> None:
    """Record in ``summary`` how a run stopped early: interrupted (Ctrl-C, or SIGTERM from ray job
    stop / Kubernetes, turned into a KeyboardInterrupt) or failed (and the CLI says how to resume)."""
    if isinstance(e, KeyboardInterrupt):
        summary.update(status="interrupted", signal=str(e) or "SIGINT")
    else:
        summary.update(status="failed", error=f"{type(e).__name__}: {e}")
        e.run_dir = str(run_dir)


def close_run(system: System, run_dir: Path, summary: dict) -> None:
    """The end of every run: summary.json written (a failure to write it is logged), the actors
    and Ray stopped."""
    from ..cluster import runtime

    try:
        write_json_atomic(run_dir / "summary.json", summary)
    except OSError as e:
        log.error("could not write %s: %s", run_dir / "summary.json", e)
    system.shutdown()
    runtime.stop()


def save_interrupted(system: System, run_dir: Path, summary: dict) -> None:
    """``checkpoint.on_interrupt``: the learner's weights as they are (after the step in
    progress), in HF format; a failure is logged, the stop goes on."""
    path = run_dir / "checkpoint-interrupted"
    log.info("interrupted: saving the learner's weights to %s (checkpoint.on_interrupt)", path)
    try:
        system.learners.run_all("save_hf", str(path), timeout_s=300)
        summary["checkpoint_interrupted"] = str(path)
    except Exception as e:  # noqa: BLE001 - the run stops anyway; say why there is no checkpoint
        log.error("could not save %s: %s", path, e)


def stop_on_sigterm() -> None:
    """SIGTERM (``ray job stop``, Kubernetes) stops the run like Ctrl-C (``interrupt.install``)."""
    interrupt.install()


@contextmanager
def signals_ignored():
    """SIGINT and SIGTERM ignored inside (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
