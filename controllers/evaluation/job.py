"""``r1ray eval``: a checkpoint's benchmark numbers on the generator and scorer actors.

The checkpoint is a hub name, a local HF folder, or a run directory (its checkpoint-final,
else checkpoint-interrupted, else checkpoint-sft). Everything the user can get wrong (the
checkpoint, the tasks, their data and columns, prompts too long for the generator, tasks that
overlap a run's training data) is refused before Ray starts.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import yaml

from ...actors import storage as store
from ..common import interrupt
from ..common.data import _looks_local
from ..common.progress import progress
from ..common.system import EVALUATE, System
from ..config import TINY, EvalTaskConfig, Recipe
from ..config.schema import ConfigError, build
from ..config.storage import resolve_run_path
from .evaluator import Evaluator, metrics_of, write_results
from .tasks import load_tasks

log = logging.getLogger("r1ray")
RUN_CHECKPOINTS = ("checkpoint-final", "checkpoint-interrupted", "checkpoint-sft")


def resolve_checkpoint(spec: str, storage: str | None = None) -> tuple[str, Path | None]:
    """(what transformers / vLLM load, the run directory when ``spec`` is one). A relative path
    that is not a folder here is looked for under ``storage.path`` (see config/storage.py)."""
    p = Path(spec).expanduser()
    if store.is_uri(spec) or (not p.is_absolute() and not p.is_dir()):
        found = Path(resolve_run_path(spec, storage, key="--checkpoint", write=False))  # under storage.path
        if store.is_uri(spec) or found.is_dir():
            p = found
    if p.is_dir():
        if (p / "config.json").is_file():
            return str(p), None
        if (p / "config.yaml").is_file():
            for name in RUN_CHECKPOINTS:
                if (p / name / "config.json").is_file():
                    return str(p / name), p
            raise ConfigError(f"--checkpoint {spec!r}: the run directory has no HF checkpoint ({', '.join(RUN_CHECKPOINTS)}: "
                              "the GRPO step checkpoints are DeepSpeed states; `r1ray train --resume` finishes the run "
                              "and writes checkpoint-final); accepted: a run directory with one of them")
        raise ConfigError(f"--checkpoint {spec!r}: the folder is neither an HF model (no config.json) nor an r1ray run "
                          "directory (no config.yaml); accepted: a hub model name, an HF model folder or a run directory")
    if _looks_local(spec):
        raise ConfigError(f"--checkpoint {spec!r}: {p} does not exist; accepted: a hub model name, an HF model folder "
                          "or a run directory")
    return spec, None


def select_tasks(recipe: Recipe, names: list[str], limit: int | None) -> None:
    """``--tasks a,b``: the recipe's tasks of those names, else the built-in tasks; ``--limit``:
    the first N problems of each."""
    from ..config import EVAL_TASKS, validate_eval

    if names:
        mine = {t.name or t.task: t for t in recipe.eval.tasks}
        chosen = []
        for name in names:
            if name in mine:
                chosen.append(mine[name])
            elif name in EVAL_TASKS and name != "generic":
                chosen.append(EvalTaskConfig(task=name))
            else:
                raise ConfigError(f"--tasks: got {name!r}; accepted: the recipe's tasks ({', '.join(mine) or 'none'}) "
                                  f"or built-in ones ({', '.join(t for t in EVAL_TASKS if t != 'generic')})")
        recipe.eval.tasks = chosen
    if limit is not None:
        if limit < 1:
            raise ConfigError(f"--limit: got {limit}; accepted: an integer >= 1")
        for t in recipe.eval.tasks:
            t.max_problems = min(limit, t.max_problems or limit)
    if not recipe.eval.tasks:
        raise ConfigError("config key 'eval.tasks': no tasks to evaluate; accepted: eval.tasks in the recipe, or "
                          "--tasks math_500,aime24,aime25,gpqa_diamond,heldout")
    validate_eval(recipe.eval, recipe.generator.max_model_len, recipe.data.test_split)


def output_dir(spec: str | None, checkpoint: str, run_dir: Path | None, storage: str | None) -> Path:
    """``--output-dir``, else ``<run_dir>/eval/<checkpoint>`` or ``runs/eval/<model name>`` (relative
    ones under ``storage.path``); an existing non-empty folder is never overwritten (suffix -1, -2, ...)."""
    name = Path(checkpoint.rstrip("/")).name
    spec = spec or (str(run_dir / "eval" / name) if run_dir else f"runs/eval/{name}")
    base = Path(resolve_run_path(spec, storage, key="--output-dir"))
    candidate, i = base, 0
    while candidate.exists() and (not candidate.is_dir() or any(candidate.iterdir())):
        i += 1
        candidate = base.with_name(f"{base.name}-{i}")
    try:
        candidate.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--output-dir: {str(candidate)!r} cannot be created ({e.strerror}); accepted: a directory "
                          "that can be created and written") from None
    return candidate


def run_recipe(run_dir: Path) -> Recipe:
    """The recipe a run directory was trained with (for its training data)."""
    return build(Recipe, yaml.safe_load((run_dir / "config.yaml").read_text()))


SAMPLE_ROWS = 100  # problems per task in the trackers' table


def sample_table(problems: list[dict], limit: int = SAMPLE_ROWS) -> list[dict]:
    """The first ``limit`` problems of a task as table rows: the prompt, the gold answer, the
    first completion with its answer and verdict, and how many of the samples were right."""
    def text(prompt) -> str:  # a chat prompt as its turns, one per line
        return prompt if isinstance(prompt, str) else "\n".join(f"{m['role']}: {m['content']}" for m in prompt)

    return [{"prompt": text(p["prompt"]), "gold": p["gold"], "completion": p["completions"][0] if p["completions"] else "",
             "answer": p["answers"][0] if p["answers"] else None, "correct": bool(p["correct"] and p["correct"][0]),
             "correct_samples": f"{sum(p['correct'])}/{len(p['correct'])}"} for p in problems[:limit]]


def report_to_trackers(trackers, results: dict[str, dict], wall_s: float) -> dict:
    """Each task's first problems as a table; returns the numbers for the tracker run's summary
    (``eval/<task>/pass@1``, ..., as training steps name them)."""
    for name, entry in results.items():
        trackers.table(f"eval/{name}/samples", sample_table(entry["problems"]), step=0)
    return {**metrics_of(results), "wall_s": wall_s}


def eval_job(recipe: Recipe, checkpoint: str | None, out: str | None) -> dict:
    """The whole ``r1ray eval`` job; returns the combined results (also in results.json)."""
    from transformers import AutoTokenizer

    from ...cluster import runtime
    from ..common.job import connect, end_trackers, prepare_model, start_trackers, trackers_ready

    t0 = time.perf_counter()
    tracker_names = trackers_ready(recipe)
    model_path, tiny_dir = prepare_model(recipe)
    run_dir = None
    if checkpoint is not None:
        model_path, run_dir = resolve_checkpoint(checkpoint, recipe.storage.path)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    trained_on = run_recipe(run_dir) if run_dir is not None else None
    if trained_on is not None and TINY in (trained_on.model.path, trained_on.data.path):
        tiny_dir = tiny_dir or Path(trained_on.model.tiny_dir).expanduser()
    # A run's own held-out split is the heldout task's data; its training split is the overlap check's.
    if trained_on is not None:
        recipe.data = trained_on.data
    tasks = load_tasks(recipe, tokenizer, tiny_dir, check_overlap=trained_on is not None)
    out_dir = output_dir(out, model_path, run_dir, recipe.storage.path)
    log.info("evaluating %s on %s -> %s", model_path, ", ".join(t.name for t in tasks), out_dir)
    connect(recipe, EVALUATE)
    interrupt.install()
    system = System(recipe, model_path, EVALUATE)
    # The tracker run: eval-<run>-<checkpoint> (or eval-<model>), grouped with the training run
    group = (trained_on.logging.run_name or run_dir.name) if run_dir else None
    label = f"{group}-{Path(model_path).name}" if group else Path(model_path.rstrip("/")).name
    trackers, numbers = None, {}
    try:
        trackers = start_trackers(recipe, out_dir, tracker_names, "eval", f"eval-{label}", group,
                                  {"checkpoint": model_path})
        system.start()
        total = sum(len(t.prompts) * t.num_samples for t in tasks)
        with progress(total, f"eval ({sum(len(t.prompts) for t in tasks)} problems)", "sample") as bar:
            results = Evaluator(system, tasks, recipe.eval.sampling, recipe.eval.k).run(progress=bar)
        combined = write_results(results, out_dir, model_path)
        numbers = report_to_trackers(trackers, results, time.perf_counter() - t0)
        end_trackers(trackers, out_dir, numbers)  # failed calls: numbers["tracker_errors"]
        trackers = None
        store.push(out_dir)  # on object storage: the reports (and the trackers' files) uploaded
    finally:
        system.shutdown()
        runtime.stop()
        if trackers is not None:  # stopped or failed: the tracker runs ended all the same
            end_trackers(trackers, out_dir, numbers)
    combined.update(output_dir=str(out_dir), wall_s=time.perf_counter() - t0)
    if "tracker_errors" in numbers:
        combined["tracker_errors"] = numbers["tracker_errors"]
    return combined
