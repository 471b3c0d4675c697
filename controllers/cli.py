"""``r1ray``: the command line. Every config error is reported before Ray starts."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="r1ray", description="GRPO for reasoning models as a Ray actor system.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="run a recipe: SFT warm-up, held-out eval, GRPO, eval, checkpoint")
    t.add_argument("recipe", nargs="?", default=None,
                   help="YAML path or a shipped recipe name (e.g. configs/tiny-cpu.yaml, tiny-cpu); with --resume, "
                   "default: the run directory's config.yaml")
    t.add_argument("--resume", default=None, metavar="RUN_DIR",
                   help="continue this run directory from its newest complete checkpoint, with the same data order; "
                   "'auto': continue --output-dir when it holds a run, else start one there (a retried job)")
    t.add_argument("--output-dir", default=None, help="run directory (default: the recipe's output_dir)")
    t.add_argument("--address", default=None, help="join the Ray cluster at this address (default: ray.address, "
                   "RAY_ADDRESS, a `ray start` cluster on this machine, or start a local Ray)")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key, e.g. --set grpo.steps=50 (repeatable)")
    c = sub.add_parser("check", help="validate a recipe and print the resolved config; starts nothing")
    c.add_argument("recipe")
    c.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    c.add_argument("--cpus", type=float, default=None, help="validate for a cluster with this many CPUs")
    c.add_argument("--gpus", type=float, default=None, help="validate for a cluster with this many GPUs")
    c.add_argument("--eval", action="store_true", help="check it as an evaluation recipe (r1ray eval: generators "
                   "and scorers only)")
    c.add_argument("--distill", action="store_true", help="check it as a distillation recipe (r1ray distill: the "
                   "teacher endpoint or servers)")
    c.add_argument("--skip-data", action="store_true",
                   help="check the recipe only, not its model's tokenizer and data (which may need the hub)")
    f = sub.add_parser("sft", help="supervised fine-tuning on conversations (reasoning traces) on the DeepSpeed "
                       "learner group: chat template, loss on assistant turns, packing, HF checkpoints")
    f.add_argument("recipe", nargs="?", default=None, help="YAML path or shipped recipe name; with --resume, default: "
                   "the run directory's config.yaml")
    f.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue this SFT run directory from its newest "
                   "checkpoint with the same data order; 'auto': continue --output-dir when it holds a run")
    f.add_argument("--output-dir", default=None, help="run directory (default: the recipe's output_dir)")
    f.add_argument("--address", default=None, help="join the Ray cluster at this address")
    f.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key, e.g. --set sft.packing=true (repeatable)")
    d = sub.add_parser("distill", help="reasoning traces from a teacher behind an OpenAI-compatible endpoint (a hosted "
                       "API, or vLLM servers started here) with distilabel on Ray, filtered by math-verify, written as a "
                       "dataset r1ray sft trains on; running it again continues it")
    d.add_argument("recipe", help="YAML path or shipped recipe name with a distill section")
    d.add_argument("--output-dir", default=None, help="the dataset's directory (default: the recipe's output_dir); an "
                   "existing one made with the same settings is continued")
    d.add_argument("--address", default=None, help="join the Ray cluster at this address")
    d.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key, e.g. --set distill.max_rows=100 (repeatable)")
    r = sub.add_parser("run", help="a multi-stage recipe (stages: sft -> grpo -> eval) as one resumable job: "
                       "complete stages are skipped, an interrupted one continues")
    r.add_argument("recipe", help="YAML path or shipped recipe name with a stages list (e.g. tiny-staged)")
    r.add_argument("--output-dir", default=None, help="where the stages' run directories go (default: output_dir)")
    r.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of every stage, e.g. --set seed=1 (repeatable)")
    e = sub.add_parser("eval", help="benchmark a checkpoint on the generator actors: MATH-500, AIME 2024/2025, "
                       "GPQA-Diamond, the recipe's held-out split or any dataset (pass@1 over n samples, pass@k, maj@k)")
    e.add_argument("recipe", nargs="?", default=None,
                   help="YAML path or shipped recipe name (generators, scorers, eval.tasks); default: the run "
                   "directory's config.yaml when --checkpoint is one")
    e.add_argument("--checkpoint", default=None, help="a hub model name, an HF model folder or a run directory "
                   "(its checkpoint-final); default: the recipe's model.path")
    e.add_argument("--tasks", default=None, help="comma-separated: the recipe's eval.tasks by name, or built-in "
                   "math_500, aime24, aime25, gpqa_diamond, heldout (default: the recipe's eval.tasks)")
    e.add_argument("--limit", type=int, default=None, help="only the first N problems of each task (a quick look)")
    e.add_argument("--output-dir", default=None, help="where the reports go (default: <run_dir>/eval/<checkpoint>, or "
                   "runs/eval/<model>); an existing one is never overwritten")
    e.add_argument("--address", default=None, help="join the Ray cluster at this address")
    e.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key, e.g. --set eval.sampling.max_new_tokens=4096 (repeatable)")
    sc = sub.add_parser("scale", help="resize a running run's generator group (within generator.min_actors/max_actors)")
    sc.add_argument("--generators", type=int, default=None, help="the number of generators to aim at; "
                    "without it, print the group's state")
    sc.add_argument("--namespace", default="r1ray", help="the run's Ray namespace (config.yaml: ray.namespace)")
    sc.add_argument("--address", default=None, help="the cluster (default: RAY_ADDRESS or a `ray start` cluster here)")
    s = sub.add_parser("ship", help="build a wheel of this clone and write the runtime env that installs it on "
                       "every node, for `ray job submit --runtime-env`")
    s.add_argument("--out", default="runtime_env.yaml", help="the runtime-env YAML to write ('-': print it)")
    s.add_argument("--wheel-dir", default=None, help="where the wheel goes (default: R1RAY_WHEEL_DIR or "
                   "~/.cache/r1ray/wheels; an unchanged clone reuses its wheel)")
    w = sub.add_parser("tiny", help="build the tiny offline world (model, tokenizer, dataset)")
    w.add_argument("--dir", default="~/.cache/r1ray/tiny-world")
    w.add_argument("--force", action="store_true")
    w.add_argument("--task", choices=["add", "tools"], default="add",
                   help="add: the default world; tools: 2-digit products and a calculator (model.tiny_task)")
    return p


def check_data(recipe) -> dict:
    """What ``r1ray train`` checks of the data before Ray starts, without starting anything."""
    from transformers import AutoTokenizer

    from .common.data import prepare_data
    from .common.job import prepare_model
    from .config import check_teacher_tokenizer

    model_path, tiny_dir = prepare_model(recipe)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    check_teacher_tokenizer(recipe, tokenizer)  # a teacher with another tokenizer: refused here too
    return prepare_data(recipe, tokenizer, tiny_dir).summary()


def judge_lines(recipe) -> list[str]:
    """One line per ``judge`` reward: where it asks, and its limits (the endpoint's totals)."""
    from .. import rewards

    lines, served = [], dict(recipe.judge_servers)
    for i, s in enumerate(recipe.rewards):
        if s.name != "judge":
            continue
        j = rewards.get(s.name, **s.params)
        where = (f"{served[i].replicas} vLLM server(s) of {served[i].model or recipe.model.path} started with the run"
                 if i in served else ", ".join(j.urls))
        rps = "no rate limit" if j.requests_per_second is None else f"{j.requests_per_second:g} requests/s"
        lines.append(f"judge rewards[{i}]: {where}; {rps} and {j.max_concurrency} in flight per URL, split among "
                     f"{recipe.scorer.num_actors} scorer(s); deadline {j.deadline_s:g} s per scoring call; key: "
                     f"{'$' + j.api_key_env if j.api_key_env else 'none'}")
    return lines


def learner_memory(recipe) -> tuple[str, str | None]:
    """Each learner rank's estimated peak memory (``config/memory.py``) as a line, and why the
    recipe cannot fit when it cannot. Needs the model's config: a local folder, the tiny world
    (built if missing), or the hub."""
    from transformers import AutoConfig

    from .common.job import prepare_model
    from .config.memory import ModelShape, check_memory

    try:
        shape = ModelShape.of(AutoConfig.from_pretrained(prepare_model(recipe)[0]))
    except Exception as e:  # noqa: BLE001 - no hub here, or not a decoder this estimate knows
        return f"not estimated ({type(e).__name__}: {str(e).splitlines()[0][:200]})", None
    stages = ("sft", "grpo") if recipe.sft.steps else ("grpo",)
    report, problem = check_memory(recipe, shape, stages)
    parts = ", ".join(f"{k} {report[k]:.2f}" for k in ("weights", "gradients", "optimizer", "activations", "lm_head"))
    return (f"about {report['total']:.2f} GiB ({parts}; {report['tokens_per_micro_batch']} tokens per micro-batch, "
            f"{report['params_b'] * 1000:.1f}M parameters)"), problem


def resumed_recipe(args):
    """``--resume RUN_DIR``: the run's own config.yaml (or the recipe given, which must keep the
    keys that decide the data order), with ``--set`` overrides (e.g. more grpo.steps)."""
    from pathlib import Path

    import yaml

    from .common.checkpoint import check_resumable
    from .config import load_recipe, recipe_dict
    from .config.schema import ConfigError
    from .config.storage import resolve_run_path

    storage = recipe_dict(args.recipe, args.overrides).get("storage")
    run_dir = Path(resolve_run_path(args.resume, storage.get("path") if isinstance(storage, dict) else None,
                                    key="--resume"))
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        raise ConfigError(f"--resume {str(run_dir)!r}: no config.yaml there; accepted: a run directory written by "
                          "r1ray train")
    if args.output_dir is not None:
        raise ConfigError(f"--output-dir {args.output_dir!r} with --resume: a resumed run writes into its own run "
                          "directory; accepted: one of the two")
    recipe = load_recipe(args.recipe or str(saved), args.overrides)
    check_resumable(yaml.safe_load(saved.read_text()), recipe.to_dict(), run_dir)
    return recipe, run_dir


def auto_resume(args):
    """``--resume auto``: the recipe's run directory (``--output-dir``) is resumed when it holds a
    run, else the run starts there; for a job that its scheduler may retry (a RayJob's
    backoffLimit, a preempted head) with the same command line."""
    from pathlib import Path

    from .config import load_recipe
    from .config.schema import ConfigError

    if args.recipe is None:
        raise ConfigError("--resume auto needs the recipe (and --output-dir) it starts from when there is nothing to resume")
    recipe = load_recipe(args.recipe, args.overrides, args.output_dir)
    run_dir = Path(recipe.output_dir).expanduser()
    if not (run_dir / "config.yaml").is_file():
        return recipe, None, False
    args.resume, args.output_dir = str(run_dir), None
    recipe, run_dir = resumed_recipe(args)
    return recipe, run_dir, True


def scale(args) -> int:
    """``r1ray scale``: set the wanted generator count on the run's control actor; the driver
    reads it within ray.heartbeat_s and adds or drains generators."""
    import ray

    from ..cluster.control import NAME
    from ..cluster.groups import describe

    if args.generators is not None and args.generators < 1:
        print(f"r1ray: --generators: got {args.generators}; accepted: an integer >= 1", file=sys.stderr)
        return 2
    ray.init(address=args.address or "auto", namespace=args.namespace, logging_level="ERROR")
    try:
        control = ray.get_actor(NAME, namespace=args.namespace)
    except ValueError:
        print(f"r1ray: no running r1ray run in Ray namespace {args.namespace!r} (no actor {NAME!r}); accepted: the "
              "namespace of a running run (its config.yaml, ray.namespace)", file=sys.stderr)
        return 2
    try:
        if args.generators is not None:
            ray.get(control.set_generators.remote(args.generators), timeout=30)
        print(json.dumps(ray.get(control.status.remote(), timeout=30)))
    except Exception as e:  # noqa: BLE001 - say what went wrong, no traceback
        print(f"r1ray: the run's control actor failed: {describe(e)}", file=sys.stderr)
        return 1
    finally:
        ray.shutdown()
    return 0


def eval_command(args) -> int:
    """``r1ray eval``: refuse what is wrong before Ray starts, run, print the table."""
    from pathlib import Path

    from ..cluster.groups import RemoteCallError
    from ..cluster.runtime import ClusterUnreachable
    from ..cluster.ship import ShipError
    from .config import load_recipe
    from .config.schema import ConfigError
    from .evaluation.evaluator import table
    from .evaluation.job import eval_job, select_tasks

    try:
        if args.address:
            args.overrides.append(f"ray.address={json.dumps(args.address)}")
        recipe_path = args.recipe
        if recipe_path is None:
            saved = Path(args.checkpoint or "").expanduser() / "config.yaml"
            if not (args.checkpoint and saved.is_file()):
                raise ConfigError("r1ray eval needs a recipe (a YAML path or a shipped recipe name), or --checkpoint "
                                  "naming a run directory (whose config.yaml is the recipe)")
            recipe_path = str(saved)
        recipe = load_recipe(recipe_path, args.overrides, stage="eval")
        select_tasks(recipe, [t.strip() for t in (args.tasks or "").split(",") if t.strip()], args.limit)
        combined = eval_job(recipe, args.checkpoint, args.output_dir)
    except (ConfigError, ClusterUnreachable, ShipError) as e:
        print(f"r1ray: {'invalid config: ' if isinstance(e, ConfigError) else ''}{e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("r1ray: evaluation stopped; nothing was written", file=sys.stderr)
        return 130
    except RemoteCallError as e:
        print(f"r1ray: evaluation failed: {e}", file=sys.stderr)
        return 1
    print(table(combined))
    print(f"reports: {combined['output_dir']} (results.json, <task>.json, <task>.details.jsonl)")
    return 0


def run_stages(args) -> int:
    """``r1ray run``: every stage planned and validated, then run in order."""
    from pathlib import Path

    from ..actors.scorer import BrokenRewardError
    from ..cluster.groups import RemoteCallError
    from ..cluster.runtime import ClusterUnreachable
    from ..cluster.ship import ShipError
    from .config.schema import ConfigError
    from .grpo.staleness import StalenessError
    from .stages import plan, run

    try:
        stages = plan(args.recipe, args.overrides, args.output_dir)
    except ConfigError as e:
        print(f"r1ray: invalid config: {e}", file=sys.stderr)
        return 2
    out = Path(stages[0].dir).parent
    print("stages: " + " -> ".join(f"{s.name} ({s.type})" for s in stages) + f"; in {out}")
    if any(s.recipe.learner.gpus_per_rank == 0 for s in stages):
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        record = run(stages, out)
    except (ConfigError, ClusterUnreachable, ShipError) as e:
        print(f"r1ray: {'invalid config: ' if isinstance(e, ConfigError) else ''}{e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"r1ray: stopped by {str(e) or 'SIGINT'}; run the same command again to continue", file=sys.stderr)
        return 130
    except (RemoteCallError, BrokenRewardError, StalenessError) as e:
        print(f"r1ray: stage failed: {e}\nr1ray: run the same command again to continue from the last checkpoint",
              file=sys.stderr)
        return 1
    from .common.runlog import read_json
    from .evaluation.evaluator import table

    for stage in stages:
        entry = record["stages"][stage.name]
        print(f"{stage.name}: {entry['status']} -> {entry.get('output')}")
        results = read_json(stage.dir / "results.json") if stage.type == "eval" else None
        if results:
            print(table(results))
    return 0


def distill(args) -> int:
    from ..actors.server import ServerError
    from ..cluster.groups import RemoteCallError
    from ..cluster.placement import PlacementError
    from ..cluster.runtime import ClusterUnreachable
    from .config import load_recipe
    from .config.schema import ConfigError
    from .distill.job import EndpointError, distill_job

    try:
        if args.address:
            args.overrides.append(f"ray.address={json.dumps(args.address)}")
        recipe = load_recipe(args.recipe, args.overrides, args.output_dir, stage="distill")
        summary = distill_job(recipe)
    except ConfigError as e:
        print(f"r1ray: invalid config: {e}", file=sys.stderr)
        return 2
    except (EndpointError, ClusterUnreachable) as e:
        print(f"r1ray: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        name = str(e) or "SIGINT"
        print(f"r1ray: stopped by {name}; the rows done are kept: run the same command again to continue",
              file=sys.stderr)
        return 143 if name == "SIGTERM" else 130
    except ServerError as e:
        print(f"r1ray: the teacher server failed: {e}", file=sys.stderr)
        return 1
    except (RemoteCallError, PlacementError, RuntimeError) as e:  # the pipeline's own failures (its log: .distilabel/)
        print(f"r1ray: distillation failed: {e}; the rows done are kept in the output directory's journal.jsonl: run "
              "the same command again to continue", file=sys.stderr)
        return 1
    out = summary["output_dir"]
    run = summary.get("this_run") or {}
    print(f"output: {out}  (dataset: {out}/dataset, all generations: {summary['outputs']['flat']})")
    print(f"rows: {summary['rows_done']}/{summary['rows']} done, {summary['rows_failed']} failed; generations: "
          f"{summary['generations']}, kept {summary['kept']}, dropped {summary['dropped']} ({summary['filter']})")
    if run:
        print(f"this run: {run['rows_done']} rows, {run['requests_per_s']:.2f} requests/s, "
              f"{run['tokens_per_s']:.0f} tokens/s")
    if summary["status"] != "completed":
        for f in summary["failed"][:5]:
            print(f"r1ray: row {f['row']} failed: {f['error']}", file=sys.stderr)
        print(f"r1ray: {summary['rows_failed']} rows failed (all listed in {out}/summary.json); run the same command "
              "again to retry them", file=sys.stderr)
        return 1
    return 0


def ship(out: str, wheel_dir: str | None) -> int:
    """``r1ray ship``: the wheel, and a runtime-env file that carries it to a cluster's nodes."""
    from ..cluster.ship import ShipError, build_wheel, runtime_env, write_runtime_env

    try:
        wheel = build_wheel(out_dir=wheel_dir)
    except ShipError as e:
        print(f"r1ray: {e}", file=sys.stderr)
        return 2
    if out == "-":
        import yaml

        print(yaml.safe_dump(runtime_env(wheel), sort_keys=False), end="")
        return 0
    note = (f"Written by `r1ray ship`: {wheel.name}, this clone's code, in Ray's py_modules.\n"
            "Every node pip-installs it; it declares no dependencies (the nodes' environment provides them). Use as\n"
            f"  ray job submit --runtime-env {out} -- python -m r1ray train tiny-cpu")
    try:
        write_runtime_env(runtime_env(wheel), out, note)
    except OSError as e:
        print(f"r1ray: cannot write the runtime env to {out!r}: {e.strerror or e}", file=sys.stderr)
        return 2
    print(f"wheel: {wheel}\nruntime env: {out}\nsubmit with: ray job submit --runtime-env {out} -- "
          "python -m r1ray train <recipe> [--set key=value ...]")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from .common.progress import on_terminal, quiet_library_bars
    from .config.schema import ConfigError

    if not on_terminal():  # a file, a Ray job's log, CI: plain progress lines, no bar fragments
        quiet_library_bars()

    if args.command == "tiny":
        from .common.tiny import TinySpec, build_tiny_world

        out = build_tiny_world(os.path.expanduser(args.dir), TinySpec.for_task(args.task), force=args.force)
        print(f"tiny world: {out}/model (model + tokenizer), {out}/data (train/test)")
        return 0
    if args.command == "scale":
        return scale(args)
    if args.command == "eval":
        return eval_command(args)
    if args.command == "run":
        return run_stages(args)
    if args.command == "ship":
        return ship(args.out, args.wheel_dir)
    if args.command == "distill":
        return distill(args)
    from .config import load_recipe

    try:
        if getattr(args, "address", None):
            args.overrides.append(f"ray.address={json.dumps(args.address)}")  # quoted: YAML must not read 1:30 as a number
        resume, fresh_if_unresumable = getattr(args, "resume", None), False
        if resume == "auto":
            recipe, resume, fresh_if_unresumable = auto_resume(args)
        elif resume is not None:
            recipe, resume = resumed_recipe(args)
        elif args.recipe is None:
            raise ConfigError(f"r1ray {args.command} needs a recipe (a YAML path or a shipped recipe name), or --resume "
                              "RUN_DIR")
        else:
            recipe = load_recipe(args.recipe, args.overrides, getattr(args, "output_dir", None),
                                 getattr(args, "cpus", None), getattr(args, "gpus", None),
                                 stage="eval" if getattr(args, "eval", False) else "distill" if getattr(args, "distill", False)
                                 else "sft" if args.command == "sft" else "grpo")
        if recipe.stages and args.command in ("train", "sft"):
            raise ConfigError(f"config key 'stages': the recipe has {len(recipe.stages)} stages; accepted: `r1ray run "
                              "<recipe>` for a staged recipe (r1ray train / sft run one stage)")
    except ConfigError as e:
        print(f"r1ray: invalid config: {e}", file=sys.stderr)
        return 2
    if args.command == "check":
        import yaml

        print(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
        if not (args.eval or args.distill):
            memory, problem = learner_memory(recipe)
            print(f"learner memory per rank: {memory}")
            if problem:
                print(f"r1ray: invalid config: {problem}", file=sys.stderr)
                return 2
        from .common.job import trackers_ready

        for line in judge_lines(recipe):
            print(line)
        try:
            print(f"trackers: {', '.join(trackers_ready(recipe)) or 'none'}")
        except ConfigError as e:
            print(f"r1ray: invalid config: {e}", file=sys.stderr)
            return 2
        if not args.skip_data and args.distill:
            from .distill.job import load_prompts, teacher

            try:
                source, prompt_col, answer_col = load_prompts(recipe, teacher(recipe)[2])
            except ConfigError as e:
                print(f"r1ray: invalid config: {e}", file=sys.stderr)
                return 2
            print(f"data: {len(source)} prompts (column {prompt_col!r}), reference answers: {answer_col!r}")
        elif not args.skip_data:
            try:
                report = check_data(recipe)
            except ConfigError as e:
                print(f"r1ray: invalid config: {e}", file=sys.stderr)
                return 2
            print(f"data: {report}")
        return 0
    if not any(x > 0 for x in (recipe.learner.gpus_per_rank,)):
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from pathlib import Path

    from ..actors import storage as store
    from ..actors.scorer import BrokenRewardError
    from ..cluster.groups import RemoteCallError
    from ..cluster.runtime import ClusterUnreachable
    from ..cluster.ship import ShipError
    from .common.job import where
    from .grpo.job import grpo_job
    from .grpo.staleness import StalenessError

    try:
        if args.command == "sft":
            from .sft.job import sft_job

            summary = sft_job(recipe, resume)
            print(f"run directory: {where(Path(summary['run_dir']))}\ncheckpoint: {summary['checkpoint']}")
            for key in ("final_loss", "final_eval_loss", "tokens_per_s", "padding_waste", "wall_s"):
                if key in summary:
                    print(f"{key}: {summary[key]:.4f}")
            return 0
        summary = grpo_job(recipe, resume, fresh_if_unresumable)
    except (ConfigError, ClusterUnreachable, ShipError) as e:  # what only the data or the cluster can tell, before any actor
        print(f"r1ray: {'invalid config: ' if isinstance(e, ConfigError) else ''}{e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        name = str(e) or "SIGINT"
        print(f"r1ray: stopped by {name}; the run directory's summary.json says how far it got", file=sys.stderr)
        return 143 if name == "SIGTERM" else 130
    except (RemoteCallError, BrokenRewardError, StalenessError) as e:
        run_dir = getattr(e, "run_dir", None)
        if run_dir:  # before the error, which stays the last line
            print(f"r1ray: the run directory keeps what was done; continue it from its last checkpoint with: "
                  f"r1ray {args.command} --resume {store.uri_of(run_dir) or run_dir}", file=sys.stderr)
        print(f"r1ray: run failed: {e}", file=sys.stderr)
        return 1
    print(f"run directory: {where(Path(summary['run_dir']))}")
    for key in ("eval_before", "eval_after", "wall_s"):
        if key in summary:
            print(f"{key}: {summary[key]:.3f}")
    return 0

if __name__ == "__main__":
    sys.exit(main())
