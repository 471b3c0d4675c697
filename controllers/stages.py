"""``r1ray run``: a multi-stage recipe (distill -> sft -> grpo -> eval) as one resumable job.

The recipe's ``stages`` list names the stages in order; each is the recipe with the stage's
``set`` keys changed, run in ``<output_dir>/<stage name>``. Each stage's output is the next
one's input: a distill stage's ``dataset/`` becomes the next stage's ``data.path``, an sft
stage's ``checkpoint-sft`` or a grpo stage's ``checkpoint-final`` becomes the next stage's
``model.path`` (a stage that sets that key itself keeps it), and an eval stage evaluates the
stage before it. A grpo stage runs no SFT warm-up of its own (sft.steps 0):
that is the sft stage's job.

Every stage's recipe is built and validated before the first stage starts. Running the
recipe again skips every stage whose output is complete and continues an interrupted one from
its newest checkpoint (sft, grpo) or runs it again (eval). ``stages.json`` in the output
directory says where each stage stands.
"""
from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from ..actors import storage as store
from .common.runlog import read_json, write_json_atomic
from .config import STAGE_TYPES, Recipe, recipe_dict
from .config.schema import ConfigError, set_key
from .config.storage import check_storage_path, resolve_run_path

log = logging.getLogger("r1ray")


@dataclass
class Stage:
    name: str
    type: str
    recipe: Recipe
    dir: Path

    def output(self) -> Path | None:
        """The stage's result when it is complete, else None."""
        if self.type == "distill":
            summary = read_json(self.dir / "summary.json") or {}
            return self.dir / "dataset" if summary.get("status") == "completed" else None
        if self.type == "eval":
            return self.dir if (self.dir / "results.json").is_file() else None
        summary = read_json(self.dir / "summary.json") or {}
        ckpt = self.dir / ("checkpoint-sft" if self.type == "sft" else "checkpoint-final")
        return ckpt if summary.get("status") == "completed" and (ckpt / "config.json").is_file() else None

    def started(self) -> bool:
        return (self.dir / "config.yaml").is_file()


def plan(path: str, overrides: list[str] = (), output_dir: str | None = None, cpus: float | None = None,
         gpus: float | None = None) -> list[Stage]:
    """Every stage's recipe, built and validated now (a bad key in the last stage fails before
    the first one starts); resources against ``cpus`` / ``gpus`` when given, else this machine
    unless the recipe joins a cluster."""
    base = recipe_dict(path, overrides, output_dir)
    stages = base.pop("stages", None)
    if not stages or not isinstance(stages, list):
        raise ConfigError(f"config key 'stages': recipe {path} has none; accepted: a list of stages, e.g. "
                          "[{type: sft}, {type: grpo}, {type: eval}] (r1ray train runs a recipe without stages)")
    storage = base.get("storage")
    storage = storage.get("path") if isinstance(storage, dict) else None
    check_storage_path(storage)
    out = Path(resolve_run_path(str(base.get("output_dir", "runs/default")), storage))
    planned: list[Stage] = []
    names: set[str] = set()
    previous: Stage | None = None
    for i, raw in enumerate(stages):
        key = f"stages[{i}]"
        if not isinstance(raw, dict) or set(raw) - {"type", "name", "set"}:
            raise ConfigError(f"config key '{key}': got {raw!r}; accepted: a mapping with keys type, name, set")
        kind, name, sets = raw.get("type"), raw.get("name") or raw.get("type"), raw.get("set") or {}
        if kind not in STAGE_TYPES:
            raise ConfigError(f"config key '{key}.type': got {kind!r}; accepted: one of {', '.join(STAGE_TYPES)}")
        if name in names:
            raise ConfigError(f"config key '{key}.name': {name!r} is used twice; accepted: a name per stage")
        if not isinstance(sets, dict):
            raise ConfigError(f"config key '{key}.set': got {sets!r}; accepted: a mapping of dotted keys to values")
        if kind == "distill" and previous is not None:
            raise ConfigError(f"config key '{key}': a distill stage makes the data the stages after it train on; "
                              "accepted: distill as the first stage")
        if kind == "eval" and (previous is None or previous.type == "distill"):
            raise ConfigError(f"config key '{key}': an eval stage evaluates the model of the stage before it; "
                              "accepted: an sft or grpo stage before it")
        names.add(name)
        data = copy.deepcopy(base)
        for k, v in sets.items():
            set_key(data, str(k), v, f"config key '{key}.set.{k}'")
        data["output_dir"] = str(out / name)
        if previous is not None and previous.type == "distill":
            if "data.path" not in sets:  # the traces are the next stage's data; the model stays the recipe's
                data.setdefault("data", {})["path"] = str(previous.dir / "dataset")
        elif previous is not None and previous.type != "eval" and "model.path" not in sets:
            data.setdefault("model", {})["path"] = str(previous.dir / ("checkpoint-sft" if previous.type == "sft"
                                                                      else "checkpoint-final"))
        if kind == "grpo":
            data.setdefault("sft", {})["steps"] = 0
        try:
            recipe = _validated(data, kind, cpus, gpus)
        except ConfigError as e:
            raise ConfigError(f"stage {name!r} ({key}): {e}") from None
        stage = Stage(name, kind, recipe, out / name)
        planned.append(stage)
        if kind != "eval":
            previous = stage
    return planned


def _validated(data: dict, kind: str, cpus: float | None, gpus: float | None) -> Recipe:
    from .config import joins_cluster, validate
    from .config.schema import build

    recipe = build(Recipe, data)
    given = cpus is not None or gpus is not None
    validate(recipe, cpus, gpus, resources=given or not joins_cluster(recipe), stage=kind)
    if kind == "eval" and not recipe.eval.tasks:
        raise ConfigError("config key 'eval.tasks': an eval stage needs tasks; accepted: e.g. [{task: heldout}]")
    if kind == "sft" and not recipe.sft.steps and recipe.sft.epochs is None:
        raise ConfigError("config keys 'sft.steps' / 'sft.epochs': an sft stage needs one of them > 0")
    return recipe


def run(stages: list[Stage], output_dir: Path) -> dict:
    try:
        return _run(stages, output_dir)
    finally:
        store.push(output_dir / "stages.json")  # on object storage: the record uploaded (each stage uploads its own)


def _run(stages: list[Stage], output_dir: Path) -> dict:
    """Run the stages in order, skipping complete ones; returns the stages' record."""
    record_path = output_dir / "stages.json"
    record = read_json(record_path) or {"stages": {}}
    output_dir.mkdir(parents=True, exist_ok=True)
    for stage in stages:
        done = stage.output()
        entry = record["stages"].setdefault(stage.name, {"type": stage.type, "dir": str(stage.dir)})
        if done is not None:
            log.info("stage %s (%s): complete (%s), skipped", stage.name, stage.type, done)
            entry.update(status="completed", output=str(done))
            write_json_atomic(record_path, record)
            continue
        entry.update(status="running", started=time.time())
        write_json_atomic(record_path, record)
        log.info("stage %s (%s): %s in %s", stage.name, stage.type, "continuing" if stage.started() else "starting",
                 stage.dir)
        try:
            _run_stage(stage, stages)
        except BaseException as e:
            entry.update(status="interrupted" if isinstance(e, KeyboardInterrupt) else "failed",
                         error=f"{type(e).__name__}: {e}")
            write_json_atomic(record_path, record)
            raise
        entry.update(status="completed", output=str(stage.output()), finished=time.time())
        entry.pop("error", None)
        write_json_atomic(record_path, record)
    return record


def _run_stage(stage: Stage, stages: list[Stage]) -> None:
    if stage.type == "distill":
        from .distill.job import distill_job

        summary = distill_job(stage.recipe)  # a second run continues the journal
        if summary["status"] != "completed":
            raise RuntimeError(f"stage {stage.name} (distill): {summary['rows_failed']} rows failed (listed in "
                               f"{stage.dir / 'summary.json'}); run the recipe again to retry them")
    elif stage.type == "sft":
        from .sft.job import sft_job

        sft_job(stage.recipe, stage.dir if stage.started() else None)
    elif stage.type == "grpo":
        from .grpo.job import grpo_job

        grpo_job(stage.recipe, stage.dir if stage.started() else None, fresh_if_unresumable=True)
    else:
        from .evaluation.job import eval_job

        before = [s for s in stages[:stages.index(stage)] if s.type != "eval"][-1]
        eval_job(stage.recipe, str(before.dir), str(stage.dir))
