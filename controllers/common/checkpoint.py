"""GRPO checkpoints and exact resume.

Layout, under the run directory::

    checkpoints/step-000040/           DeepSpeed's checkpoint (tag ``step-000040``): weights, optimizer
                                       shards, lr scheduler; ``rng_rank<r>.pt`` per learner rank
    checkpoints/step-000040/driver.json  the driver's state, written last: a checkpoint without it
                                       is incomplete (the run died while saving) and is ignored

``driver.json`` also lists every other file of the checkpoint with its size and sha256 (the
learner ranks hash the files they wrote, in parallel; the driver hashes the rest). Resuming
verifies the newest checkpoint against that list and falls back to the newest intact one,
saying which file was wrong and how; with none intact it refuses, naming them.

The driver's state is what makes the resumed run consume the same data in the same order:
the step, the policy version, the prompts consumed so far and how many prompts the sampler had
handed out up to the last consumed group (groups admitted after it were in flight; they are
admitted again, in the same order).
"""
from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

from ...actors import storage as store
from ...actors.learner import LearnerRank, file_record
from ..config.schema import ConfigError
from .runlog import write_json_atomic

log = logging.getLogger("r1ray")

STATE = "driver.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def tag_for(step: int) -> str:
    return f"step-{step:06d}"


class Checkpoints:
    """Where a run's GRPO checkpoints live; ``commit`` marks one complete and prunes old ones."""

    def __init__(self, run_dir: Path, every_steps: int, keep_last: int):
        self.dir, self.every, self.keep = Path(run_dir) / "checkpoints", every_steps, keep_last
        self.uploading: list[tuple[list, dict, list]] = []  # (the ranks' wait_uploads refs, state, saved)

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def begin(self, step: int) -> None:
        """Before the learners write step ``step``: a driver.json left there by an earlier run
        (a resumed run saves the same step again) must not mark the new files complete."""
        (self.dir / tag_for(step) / STATE).unlink(missing_ok=True)
        store.remove(self.dir / tag_for(step) / STATE)

    def save(self, step: int, learners) -> list:
        """Checkpoints whose uploads are done committed (``flush``), then step ``step`` asked of the
        learner ranks (``learners``, their group); the refs of their ``save_checkpoint``."""
        self.flush(learners)
        self.begin(step)
        return learners.call_all(LearnerRank.save_checkpoint, str(self.dir), tag_for(step))

    def commit(self, state: dict, saved: list[dict] = (), learners=None) -> None:
        """``commit_now``, or on object storage (``learners`` given: their group) once every rank's
        background upload of its files is done: the training goes on meanwhile, and the driver
        state (what makes the checkpoint complete) reaches the storage after every shard."""
        if learners is not None and store.uri_of(self.dir):
            self.uploading.append((learners.call_all(LearnerRank.wait_uploads), state, list(saved)))
            self.flush(learners)
        else:
            self.commit_now(state, saved)

    def flush(self, learners, wait: bool = False) -> None:
        """Commit the checkpoints whose uploads are done (``wait``: all of them, waiting; the end of a run)."""
        while self.uploading and (wait or learners.done(self.uploading[0][0])):
            refs, state, saved = self.uploading.pop(0)
            learners.get(refs, "wait_uploads (checkpoint files to the storage)", timeout_s=3600 if wait else None)
            self.commit_now(state, saved)

    def settle(self, learners) -> None:
        """However a run ends: the uploads in progress waited for and their checkpoints committed;
        a failure (a rank gone) is logged, and the older checkpoints stay what a resume uses."""
        if not self.uploading or learners is None:
            return
        try:
            self.flush(learners, wait=True)
        except Exception as e:  # noqa: BLE001 - the run is ending; say which checkpoint is not complete
            log.error("checkpoint uploads did not finish (%s); the checkpoints after the last complete one stay "
                      "incomplete on the storage", e)

    def commit_now(self, state: dict, saved: list[dict] = ()) -> Path:
        """Write the driver's state into the step's directory (which the learners filled), with
        the size and sha256 of every file in it (``saved``: the learners' ``save_checkpoint``
        results, whose files they hashed; the driver hashes the rest), then delete all but the
        newest ``keep_last`` complete checkpoints (and incomplete older ones)."""
        path = self.dir / tag_for(state["step"])
        hashed = {name: record for part in saved for name, record in part["files"].items()}
        path.mkdir(parents=True, exist_ok=True)  # on object storage the ranks may all have written elsewhere
        write_json_atomic(path / STATE, {**state, "files": manifest(path, hashed)})
        store.push(path / STATE)  # on object storage: last, after the ranks uploaded their files
        complete = [p for p in self.steps() if (p / STATE).exists()]
        for old in self.steps():
            if old not in complete[-self.keep:] and _step(old) < state["step"]:
                shutil.rmtree(old, ignore_errors=True)
                store.remove(old)
        log.info("checkpoint: %s (step %d%s)", path, state["step"],
                 f", policy version {state['policy_version']}" if state.get("policy_version") else "")
        return path

    def steps(self) -> list[Path]:
        """Step directories, oldest first."""
        if not self.dir.is_dir():
            return []
        return sorted((p for p in self.dir.iterdir() if _STEP_DIR.match(p.name)), key=_step)

    def latest(self) -> dict | None:
        """The newest intact checkpoint's driver state (with ``path`` and ``tag``), or None when
        there is no complete one. A damaged one (a file missing, cut short or changed since it
        was written) is skipped with a warning naming the file; ConfigError when every complete
        checkpoint is damaged."""
        damaged = []
        for path in reversed(self.steps()):
            if not (path / STATE).exists():
                log.warning("checkpoint %s is incomplete (no %s: the run stopped while saving it): skipped", path, STATE)
                continue
            try:
                store.pull(path)  # on object storage: the whole checkpoint, to verify it here
                state = json.loads((path / STATE).read_text())
            except (OSError, ValueError) as e:
                problem = f"{STATE} cannot be read ({type(e).__name__}: {e})"
            else:
                problem = verify(path, state.get("files"))
            if problem is None:
                if damaged:
                    log.warning("resuming from %s, the newest intact checkpoint", path)
                state.pop("files", None)
                return {**state, "path": str(path), "tag": path.name}
            log.warning("checkpoint %s is damaged: %s; trying an older one", path, problem)
            damaged.append(f"{path.name}: {problem}")
        if damaged:
            raise ConfigError(f"--resume: no intact checkpoint in {self.dir}: " + "; ".join(damaged) +
                              "; accepted: a run directory with an intact checkpoint (restore the damaged files), "
                              "or start a new run")
        return None


def manifest(step_dir: Path, known: dict | None = None) -> dict:
    """Every file under ``step_dir`` but driver.json (paths relative to it): the records in
    ``known``, the others hashed here."""
    known = {rel: record for rel, record in (known or {}).items() if rel != STATE}
    for f in sorted(step_dir.rglob("*")):
        rel = f.relative_to(step_dir).as_posix()
        if f.is_file() and rel != STATE and rel not in known:
            known[rel] = file_record(f)
    return dict(sorted(known.items()))


def verify(step_dir: Path, files: dict | None) -> str | None:
    """None when every file listed is there with its size and checksum; else what is wrong with
    the first that is not. A checkpoint written before checkpoints listed their files passes."""
    for rel, want in (files or {}).items():
        f = step_dir / rel
        if not f.is_file():
            return f"{rel} is missing (expected {want['size']} bytes)"
        size = f.stat().st_size
        if size != want["size"]:
            return f"{rel} has {size} bytes, expected {want['size']} (cut short or changed since it was written)"
        found = file_record(f)["sha256"]
        if found != want["sha256"]:
            return f"{rel} has sha256 {found}, expected {want['sha256']} (changed since it was written)"
    return None


def _step(path: Path) -> int:
    return int(_STEP_DIR.match(path.name).group(1))


# Keys a resumed run must share with the run it continues: they decide the data order and
# the batches (the rest, e.g. grpo.steps or ray.*, may change on resume).
SAME_ON_RESUME = ("seed", "model.path", "data.path", "data.name", "data.train_split", "data.on_invalid_row",
                  "grpo.prompts_per_step", "grpo.num_generations", "grpo.dynamic_sampling", "learner.num_ranks",
                  "learner.zero_stage")


def _get(d: dict, dotted: str):
    for part in dotted.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d


def check_resumable(saved: dict, recipe: dict, run_dir: Path) -> None:
    """Refuse a recipe that would not continue the saved run's data order, naming the key."""
    for key in SAME_ON_RESUME:
        if _get(saved, key) != _get(recipe, key):
            raise ConfigError(f"config key '{key}': got {_get(recipe, key)!r} but the run in {str(run_dir)!r} used "
                              f"{_get(saved, key)!r}; accepted: the same value (a resumed run must see the same data "
                              "in the same order), or start a new run")
