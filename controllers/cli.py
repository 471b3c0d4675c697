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
    t.add_argument("recipe", help="YAML path or a shipped recipe name (e.g. configs/tiny-cpu.yaml, tiny-cpu)")
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
    c.add_argument("--skip-data", action="store_true",
                   help="check the recipe only, not its model's tokenizer and data (which may need the hub)")
    s = sub.add_parser("ship", help="build a wheel of this clone and write the runtime env that installs it on "
                       "every node, for `ray job submit --runtime-env`")
    s.add_argument("--out", default="runtime_env.yaml", help="the runtime-env YAML to write ('-': print it)")
    s.add_argument("--wheel-dir", default=None, help="where the wheel goes (default: R1RAY_WHEEL_DIR or "
                   "~/.cache/r1ray/wheels; an unchanged clone reuses its wheel)")
    w = sub.add_parser("tiny", help="build the tiny offline world (model, tokenizer, dataset)")
    w.add_argument("--dir", default="~/.cache/r1ray/tiny-world")
    w.add_argument("--force", action="store_true")
    return p


def check_data(recipe) -> dict:
    """What ``r1ray train`` checks of the data before Ray starts, without starting anything."""
    from transformers import AutoTokenizer

    from .data import prepare_data
    from .train import prepare_model

    model_path, tiny_dir = prepare_model(recipe)
    return prepare_data(recipe, AutoTokenizer.from_pretrained(model_path), tiny_dir).summary()


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
    from .schema import ConfigError

    if args.command == "tiny":
        from .tiny import build_tiny_world

        out = build_tiny_world(os.path.expanduser(args.dir), force=args.force)
        print(f"tiny world: {out}/model (model + tokenizer), {out}/data (train/test)")
        return 0
    if args.command == "ship":
        return ship(args.out, args.wheel_dir)
    from .config import load_recipe

    try:
        if getattr(args, "address", None):
            args.overrides.append(f"ray.address={json.dumps(args.address)}")  # quoted: YAML must not read 1:30 as a number
        recipe = load_recipe(args.recipe, args.overrides, getattr(args, "output_dir", None),
                             getattr(args, "cpus", None), getattr(args, "gpus", None))
    except ConfigError as e:
        print(f"r1ray: invalid config: {e}", file=sys.stderr)
        return 2
    if args.command == "check":
        import yaml

        print(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
        if not args.skip_data:
            try:
                report = check_data(recipe)
            except ConfigError as e:
                print(f"r1ray: invalid config: {e}", file=sys.stderr)
                return 2
            print(f"data: {report}")
        return 0
    if not any(x > 0 for x in (recipe.learner.gpus_per_rank,)):
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from ..actors.scorer import BrokenRewardError
    from ..cluster.groups import RemoteCallError
    from ..cluster.runtime import ClusterUnreachable
    from ..cluster.ship import ShipError
    from .staleness import StalenessError
    from .train import train

    try:
        summary = train(recipe)
    except (ConfigError, ClusterUnreachable, ShipError) as e:  # what only the data or the cluster can tell, before any actor
        print(f"r1ray: {'invalid config: ' if isinstance(e, ConfigError) else ''}{e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        name = str(e) or "SIGINT"
        print(f"r1ray: stopped by {name}; the run directory's summary.json says how far it got", file=sys.stderr)
        return 143 if name == "SIGTERM" else 130
    except (RemoteCallError, BrokenRewardError, StalenessError) as e:
        print(f"r1ray: run failed: {e}", file=sys.stderr)
        return 1
    print(f"run directory: {summary['run_dir']}")
    for key in ("eval_before", "eval_after", "wall_s"):
        if key in summary:
            print(f"{key}: {summary[key]:.3f}")
    return 0

if __name__ == "__main__":
    sys.exit(main())
