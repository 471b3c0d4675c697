"""The one shell every job runs in, so each job reads top-down as its own steps:

    check_output_dir(recipe)           # refused before anything exists
    model_path, tiny_dir = prepare_model(recipe)
    ...                                # the job's own checks: data, tasks, resume point
    run_dir = open_run(recipe, roles, resume)       # Ray joined, SIGTERM = Ctrl-C, config.yaml
    system = System(recipe, model_path, roles)
    with actors_running(system, run_dir, summary, previous, wrap_up):
        ...                            # the job's loop
    return summary                     # also summary.json: completed, interrupted or failed

Everything a user can get wrong is refused before the run directory exists, so a refused run
leaves nothing behind; a run that started always ends with summary.json and Ray stopped.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from ...actors import storage as store
from ...actors.learner import LearnerRank
from ..config import TINY, ConfigError, Recipe, check_resources, dump, joins_cluster
from . import interrupt
from .plots import draw_curves
from .runlog import write_json_atomic
from .system import GRPO, System
from .trackers import Trackers, TrackerUnavailable
from .trackers import check as check_trackers

log = logging.getLogger("r1ray")
_mirrors: dict[Path, store.Mirror] = {}  # staged run directories being uploaded (open_run -> close_run)


def where(run_dir: Path) -> str:
    """The run directory as a user finds it: its URI when it lives on object storage."""
    uri = store.uri_of(run_dir)
    return f"{uri} (staged in {run_dir})" if uri else str(run_dir)


def prepare_model(recipe: Recipe) -> tuple[str, Path | None]:
    """Resolve model.path; build the tiny world when the recipe asks for it and it is missing."""
    if recipe.model.path != TINY and recipe.data.path != TINY:
        return recipe.model.path, None
    from .tiny import TinySpec, build_tiny_world

    tiny_dir = Path(os.path.expanduser(recipe.model.tiny_dir))
    t0 = time.perf_counter()
    build_tiny_world(tiny_dir, TinySpec.for_task(recipe.model.tiny_task))
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
    while (candidate.exists() and any(candidate.iterdir())) or store.occupied(candidate):
        i += 1
        candidate = base.with_name(f"{base.name}-{i}")
    try:
        candidate.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _output_error(candidate, f"cannot be created ({e.strerror})") from None
    return candidate


def trackers_ready(recipe: Recipe) -> list[str]:
    """The trackers a run will start (``logging.trackers``), each checked before anything
    starts: one that cannot start (not installed, not logged in, its server down) is refused by
    name with its fix, or with ``logging.on_tracker_error: warn`` left out with a warning."""
    lc = recipe.logging
    problems = check_trackers(lc.trackers)
    if problems and lc.on_tracker_error == "fail":
        raise ConfigError("; ".join(f"config key 'logging.trackers': {why}" for why in problems.values())
                          + " (or set logging.on_tracker_error: warn to run without it)")
    for name, why in problems.items():
        log.warning("logging.trackers: %s; the run goes on without %s (logging.on_tracker_error: warn)", why, name)
    return [name for name in lc.trackers if name not in problems]


def start_trackers(recipe: Recipe, run_dir: Path, names: list[str], job_type: str = "train",
                   run_name: str | None = None, group: str | None = None, params: dict | None = None) -> Trackers:
    """The job's trackers started (continuing the runs a resumed run directory names), the
    resolved recipe (and ``params``) as their parameters. ``job_type``: train, eval or distill;
    ``run_name``: the name when ``logging.run_name`` is unset (else the directory's name);
    ``group``: the training run an evaluation belongs to."""
    lc = recipe.logging
    try:
        trackers = Trackers.open(names, run_dir, lc.project, lc.run_name or run_name, lc.tags, lc.on_tracker_error,
                                 job_type=job_type, group=group)
    except TrackerUnavailable as e:
        raise ConfigError(str(e)) from None
    trackers.params({**recipe.to_dict(), **(params or {})})
    return trackers


def end_trackers(trackers: Trackers, run_dir: Path, summary: dict) -> None:
    """The run's curves drawn (curves.png, sft_curves.png: none where the directory has no
    metrics), the summary's numbers and the run directory's plots to the trackers, their runs
    ended; calls that failed are counted in the summary (``tracker_errors``)."""
    draw_curves(run_dir)
    trackers.images(run_dir)
    trackers.summary(summary)
    errors = trackers.close()
    if errors:
        summary["tracker_errors"] = errors


def check_placement(recipe: Recipe, roles: tuple[str, ...]) -> None:
    """Every bundle of the placement plan fits on some alive node (a generator's
    tensor_parallel_size GPUs on one node), and all of them together fit the cluster."""
    from ...cluster.placement import alive_nodes, unplaceable
    from .system import placement_plan

    why = unplaceable(placement_plan(recipe, roles), alive_nodes())
    if why:
        key = "generator.tensor_parallel_size" if why.startswith("generator") else "the actors' cpus_per_* / gpus_per_*"
        raise ConfigError(f"config key '{key}': the placement cannot be met on this cluster: {why}")


def connect(recipe: Recipe, roles: tuple[str, ...] = GRPO, on_gpu: bool | None = None) -> None:
    """Start or join Ray; on a joined cluster check its resources and take a free namespace.
    Raises ConfigError / ClusterUnreachable / ShipError with Ray stopped again. ``roles``: the
    actor groups the job starts (``system.GRPO``, ``EVALUATE``, ``SFT``, ``DISTILL``), whose
    placement is checked. ``on_gpu``: whether the job's actors use GPUs (default: the learner's)."""
    from ...cluster import runtime

    if on_gpu is None:
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
    from ...cluster import runtime

    if store.uri_of(run_dir):
        summary["run_uri"] = store.uri_of(run_dir)
    try:
        write_json_atomic(run_dir / "summary.json", summary)
    except OSError as e:
        log.error("could not write %s: %s", run_dir / "summary.json", e)
    system.shutdown()
    runtime.stop()
    mirror = _mirrors.pop(Path(run_dir), None)
    if mirror is not None:
        try:
            mirror.close()
        except OSError as e:
            log.error("could not upload %s to %s: %s (the staging copy keeps everything)", run_dir, mirror.uri, e)


def save_interrupted(system: System, run_dir: Path, summary: dict) -> None:
    """``checkpoint.on_interrupt``: the learner's weights as they are (after the step in
    progress), in HF format; a failure is logged, the stop goes on."""
    path = run_dir / "checkpoint-interrupted"
    log.info("interrupted: saving the learner's weights to %s (checkpoint.on_interrupt)", path)
    try:
        system.learners.run_all(LearnerRank.save_hf, str(path), timeout_s=300)
        summary["checkpoint_interrupted"] = str(path)
    except Exception as e:  # noqa: BLE001 - the run stops anyway; say why there is no checkpoint
        log.error("could not save %s: %s", path, e)


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


def open_run(recipe: Recipe, roles: tuple[str, ...], resume: Path | None = None) -> Path:
    """Ray started or joined for ``roles`` (``connect``), SIGTERM (``ray job stop``, Kubernetes)
    made a Ctrl-C, and the run directory: ``resume``, or a fresh one (never an existing
    non-empty one), with the recipe written to config.yaml. Ray is stopped again on a refusal."""
    from ...cluster import runtime

    connect(recipe, roles)
    interrupt.install()
    try:
        run_dir = resume if resume is not None else run_dir_for(recipe)
    except ConfigError:
        runtime.stop()
        raise
    dump(recipe, run_dir / "config.yaml")
    if store.uri_of(run_dir):
        _mirrors[Path(run_dir)] = store.Mirror(run_dir, recipe.storage.sync_every_s)
        _mirrors[Path(run_dir)].sync()
    return run_dir


def check_shared(system: System, run_dir: Path) -> None:
    """Every learner rank sees the run directory (its config.yaml), where it writes its
    checkpoint shards and from where a resume reads them: a folder local to the driver's node
    would split a checkpoint over the nodes' disks, and ``--resume`` would find it incomplete."""
    if system.learners is None or store.uri_of(run_dir):  # on object storage each rank uploads its own files
        return
    marker = run_dir / "config.yaml"
    blind = [(i, host) for i, host in enumerate(system.learners.run_all(LearnerRank.sees, str(marker))) if host]
    if blind:
        who = ", ".join(f"learner-rank-{i} on {host}" for i, host in blind)
        raise ConfigError(f"config key 'storage.path': the run directory {str(run_dir)!r} is not shared with {who} "
                          f"(it does not see {marker.name}, which the driver wrote there): the checkpoint shards would "
                          "be split over the nodes' disks; accepted: storage.path (or an absolute --output-dir) on a "
                          "volume every node mounts at the same path (KubeRay: the shared volume of cluster/kuberay/)")


@contextmanager
def actors_running(system: System, run_dir: Path, summary: dict, previous: dict | None = None,
                   wrap_up: Callable[[], bool] | None = None):
    """The actors started (``summary["startup_s"]``) for the body; on the way out, however it
    ends: how it ended recorded (``ended``), then with signals ignored (a second Ctrl-C must not
    cut the clean-up short) the job's ``wrap_up`` (its counts, an interrupted checkpoint; it
    returns whether the run made progress), the outcome of a resume (``resume_outcome``, from
    ``previous``, the summary the resumed run had), summary.json, the actors and Ray stopped.
    ``summary`` stays the one dict the job returns."""
    try:
        system.start()
        summary["startup_s"] = system.startup_s
        check_shared(system, run_dir)
        yield
    except BaseException as e:
        ended(summary, e, run_dir)
        raise
    finally:
        with signals_ignored():
            progressed = wrap_up() if wrap_up is not None else True
            final = resume_outcome(previous, summary, progressed)
            if final is not summary:
                summary.clear()
                summary.update(final)
            close_run(system, run_dir, summary)
