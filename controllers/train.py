"""The main job: tiny world (if asked) -> Ray -> actors -> SFT warm-up -> eval -> GRPO -> eval -> checkpoint."""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from tqdm.auto import tqdm

from .config import TINY, Recipe, check_resources, dump, joins_cluster
from .data import PromptRenderer, load_splits
from .evaluate import pass_at_1
from .grpo import GrpoDriver
from .metrics import MetricsWriter
from .schema import ConfigError
from .sft import run_sft
from .system import System

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


def run_dir_for(recipe: Recipe) -> Path:
    """A fresh run directory: an existing non-empty one is never overwritten (suffix -1, -2, ...)."""
    base = Path(recipe.output_dir).expanduser()
    candidate, i = base, 0
    while candidate.exists() and any(candidate.iterdir()):
        i += 1
        candidate = base.with_name(f"{base.name}-{i}")
    candidate.mkdir(parents=True, exist_ok=True)
    return candidate


def probe_prompts(recipe: Recipe, test_ds, renderer: PromptRenderer, eval_used: int) -> list[dict]:
    """Prompts for the SFT early stop: the tail of the test split, which the final evaluation
    (its first ``eval_used`` rows) does not use."""
    if not (recipe.sft.steps and recipe.sft.stop_at_pass_rate):
        return []
    n = min(recipe.sft.probe_prompts, len(test_ds) - eval_used)
    if n <= 0:
        raise ConfigError(f"config key 'sft.stop_at_pass_rate': got {recipe.sft.stop_at_pass_rate}, but no held-out "
                          f"prompts are left for the probe (the test split has {len(test_ds)} rows and "
                          f"eval.num_prompts={recipe.eval.num_prompts} uses them); accepted: fewer eval prompts, or null")
    return [renderer.prompt(test_ds[i], f"test-{i}") for i in range(len(test_ds) - n, len(test_ds))]


def make_probe(system: System, recipe: Recipe, prompts: list[dict]):
    """pass@1 of the learner's current weights sampled as GRPO will sample them (one
    completion per prompt at ``sampling``), judged by ``eval.reward``."""
    if not prompts:
        return None

    def probe() -> float:
        system.sync_weights()
        return pass_at_1(system, prompts, recipe.sampling, recipe.eval.reward, greedy=False)["pass@1"]

    return probe


def train(recipe: Recipe) -> dict:
    """The whole job. Everything the data or the cluster can refuse (a ConfigError) is checked
    before the run directory exists, so a refused run leaves nothing behind."""
    from transformers import AutoTokenizer

    from ..cluster import runtime

    t_start = time.perf_counter()
    model_path, tiny_dir = prepare_model(recipe)
    train_ds, test_ds = load_splits(recipe.data, tiny_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    renderer = PromptRenderer(tokenizer, recipe.data)
    eval_prompts = [renderer.prompt(test_ds[i], f"test-{i}") for i in range(min(recipe.eval.num_prompts, len(test_ds)))]
    probes = probe_prompts(recipe, test_ds, renderer, len(eval_prompts))
    eval_sampling = recipe.sampling if recipe.eval.max_new_tokens is None else \
        type(recipe.sampling)(recipe.sampling.temperature, recipe.sampling.top_p, recipe.eval.max_new_tokens)

    on_gpu = (recipe.learner.gpus_per_rank or 0) > 0
    resources = runtime.start(recipe.ray.address, recipe.ray.namespace, recipe.ray.num_cpus, recipe.ray.num_gpus,
                              recipe.ray.dashboard, recipe.ray.object_store_mb, on_gpu)
    try:
        if joins_cluster(recipe):  # the cluster's real size, checked before any actor starts
            check_resources(recipe, resources.get("CPU", 0), resources.get("GPU", 0))
    except ConfigError:
        runtime.stop()
        raise
    run_dir = run_dir_for(recipe)
    dump(recipe, run_dir / "config.yaml")
    log.info("run directory: %s", run_dir)
    system = System(recipe, model_path)
    metrics = MetricsWriter(run_dir)
    summary: dict = {"run_dir": str(run_dir), "model": model_path}
    try:
        system.start()
        summary["startup_s"] = system.startup_s
        if recipe.sft.steps:
            sft_metrics = MetricsWriter(run_dir, "sft_metrics.jsonl", tensorboard=False)
            with tqdm(total=recipe.sft.steps, desc="SFT warm-up", unit="step", dynamic_ncols=True) as bar:
                t0 = time.perf_counter()
                sft = run_sft(system, recipe.sft, train_ds, renderer, sft_metrics, recipe.seed, bar,
                              probe=make_probe(system, recipe, probes))
            sft_metrics.close()
            summary["sft"] = {"steps": len(sft), "final_loss": sft[-1]["loss"], "time_s": time.perf_counter() - t0,
                              "probes": {r["step"]: r["probe_pass@1"] for r in sft if "probe_pass@1" in r}}
            if recipe.sft.save_checkpoint:
                summary["sft"]["checkpoint"] = str(run_dir / "checkpoint-sft")
                system.learners.run_all("save_hf", summary["sft"]["checkpoint"])
            # Generators and the reference start GRPO from the SFT policy.
            system.sync_weights(include_reference=True)
        if eval_prompts:
            summary["eval_before_detail"] = pass_at_1(system, eval_prompts, eval_sampling, recipe.eval.reward)
            summary["eval_before"] = summary["eval_before_detail"]["pass@1"]
            log.info("held-out pass@1 before GRPO: %.3f", summary["eval_before"])
        system.learners.run_all("start_phase", recipe.learner.optim.lr, recipe.learner.optim.warmup_steps)
        completions_log = MetricsWriter(run_dir, "completions.jsonl", tensorboard=False)
        samples_log = MetricsWriter(run_dir, "samples.jsonl", tensorboard=False)
        driver = GrpoDriver(system, recipe, train_ds, renderer, metrics, completions_log=completions_log,
                            samples_log=samples_log)
        with tqdm(total=recipe.grpo.steps, desc=f"GRPO (max_staleness={recipe.grpo.max_staleness})", unit="step",
                  dynamic_ncols=True) as bar:
            driver.run(progress=bar)
        completions_log.close()
        samples_log.close()
        summary["grpo"] = driver.summary()
        driver.telemetry.write_timeline(run_dir / "timeline.json")
        if eval_prompts:
            summary["eval_after_detail"] = pass_at_1(system, eval_prompts, eval_sampling, recipe.eval.reward)
            summary["eval_after"] = summary["eval_after_detail"]["pass@1"]
            log.info("held-out pass@1 after GRPO: %.3f", summary["eval_after"])
        ckpt = run_dir / "checkpoint-final"
        system.learners.run_all("save_hf", str(ckpt))
        summary["checkpoint"] = str(ckpt)
    finally:
        summary["wall_s"] = time.perf_counter() - t_start
        metrics.close()
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        system.shutdown()
        runtime.stop()
    return summary
