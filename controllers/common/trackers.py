"""Experiment trackers (``logging.trackers``): TensorBoard, Weights & Biases, MLflow.

A run's metrics go to its jsonl files first (controllers/common/runlog.py); ``Trackers``
sends the same records to every tracker the recipe names, each on its own x-axis: GRPO steps
(``step``) and SFT steps (``sft/step``), so an SFT warm-up and the GRPO after it do not fight
over one step counter. Also the resolved recipe as the run's parameters, evaluation results,
example completions as a table, the run directory's plots as images and the summary at the end.

Failing well: ``check`` says, before anything starts, which tracker cannot start and how to fix
it (not installed, not logged in, its server unreachable); a tracker that fails mid-run is
counted and warned about once, and the run goes on without it. Each tracker's own settings come
from its environment variables (WANDB_MODE, WANDB_PROJECT, WANDB_ENTITY, WANDB_API_KEY,
MLFLOW_TRACKING_URI, ...); nothing from the environment is logged.

Resume: the trackers' run ids and the last step each axis sent are kept in
``<run_dir>/trackers.json``; a resumed run continues the same tracker runs and does not send
again the steps it redoes after its checkpoint (exact resume redoes them with the same samples).
"""
from __future__ import annotations

import logging
import math
import netrc
import os
import re
from pathlib import Path
from urllib.parse import urlparse

from ...cluster.runtime import unreachable
from .runlog import read_json, write_json_atomic

log = logging.getLogger("r1ray.trackers")

STATE = "trackers.json"
AXES = {"grpo": "step", "sft": "sft/step"}  # axis -> the metric the tracker plots it against
INSTALL = {"wandb": "pip install 'r1ray[wandb]'", "mlflow": "pip install 'r1ray[mlflow]'"}


class TrackerUnavailable(RuntimeError):
    """A tracker that cannot start; the message names it and the fix."""


def numbers(record: dict) -> dict[str, float]:
    """The finite numbers of a record (what a tracker can plot)."""
    return {k: float(v) for k, v in record.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def flatten(data, prefix: str = "") -> dict[str, object]:
    """A nested config as dotted keys (``learner.optim.lr``); lists kept as their text."""
    if isinstance(data, dict):
        out: dict[str, object] = {}
        for k, v in data.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: data if isinstance(data, (int, float, str, bool)) or data is None else str(data)}


# ---- what each tracker needs before a run starts ------------------------------------------

def _reachable(url: str, timeout_s: float) -> str | None:
    """None when something listens at ``url``'s host and port; else why not."""
    parts = urlparse(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    why = unreachable(parts.hostname, port, timeout_s)
    return f"{parts.hostname}:{port} does not answer within {timeout_s:g} s ({why})" if why else None


def _check_wandb(timeout_s: float) -> str | None:
    try:
        import wandb  # noqa: F401
    except ImportError:
        return f"wandb is not installed; accepted: {INSTALL['wandb']}, or remove wandb from logging.trackers"
    mode = os.environ.get("WANDB_MODE", "online")
    if mode in ("offline", "disabled", "dryrun") or os.environ.get("WANDB_DISABLED", "").lower() in ("1", "true"):
        return None
    base = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
    host = urlparse(base).hostname
    try:
        logged_in = bool(os.environ.get("WANDB_API_KEY")) or netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        logged_in = False
    if not logged_in:
        return (f"wandb is not logged in to {host} (no WANDB_API_KEY, no {host} entry in ~/.netrc); accepted: "
                "`wandb login`, WANDB_API_KEY, or WANDB_MODE=offline (sync later with `wandb sync`)")
    down = _reachable(base, timeout_s)
    return f"wandb's server {down}; accepted: a reachable WANDB_BASE_URL, or WANDB_MODE=offline" if down else None


def _check_mlflow(timeout_s: float) -> str | None:
    try:
        import mlflow
    except ImportError:
        return f"mlflow is not installed; accepted: {INSTALL['mlflow']}, or remove mlflow from logging.trackers"
    uri = mlflow.get_tracking_uri()
    if urlparse(uri).scheme in ("http", "https"):
        down = _reachable(uri, timeout_s)
        if down:
            return (f"the MLflow tracking server {uri} ({down}); accepted: a running server in MLFLOW_TRACKING_URI, "
                    "or a local store (MLFLOW_TRACKING_URI=sqlite:///mlflow.db, or file:/path with "
                    "MLFLOW_ALLOW_FILE_STORE=true)")
        return None
    try:  # a local store: open it as the run will
        mlflow.MlflowClient(uri).search_experiments(max_results=1)
    except Exception as e:  # noqa: BLE001 - its own message names the problem
        return (f"MLflow cannot open the tracking store {uri!r}: {str(e).splitlines()[0][:300]}; accepted: "
                "MLFLOW_TRACKING_URI naming a server or a store this install opens")
    return None


CHECKS = {"wandb": _check_wandb, "mlflow": _check_mlflow}


def check(trackers: list[str], timeout_s: float = 5.0) -> dict[str, str]:
    """Each named tracker that cannot start, with why and the fix (TensorBoard always can)."""
    return {name: why for name in trackers if name in CHECKS and (why := CHECKS[name](timeout_s))}


# ---- the trackers ----------------------------------------------------------------------------

class Tracker:
    """One tracker's run. ``run_id``: what a resumed run continues (None: nothing to keep)."""

    name = "tracker"
    run_id: str | None = None

    def params(self, params: dict[str, object]) -> None: ...

    def log(self, metrics: dict[str, float], step: int, axis: str) -> None: ...

    def table(self, name: str, columns: list[str], rows: list[list], step: int) -> None: ...

    def image(self, name: str, path: Path) -> None: ...

    def summary(self, data: dict[str, float]) -> None: ...

    def close(self) -> None: ...


class TensorBoardTracker(Tracker):
    name = "tensorboard"

    def __init__(self, run_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def params(self, params):
        self.writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in params.items()))

    def log(self, metrics, step, axis):
        prefix = f"{axis}/"  # grpo/loss, sft/loss: the tags TensorBoard always had
        for k, v in metrics.items():
            self.writer.add_scalar(k if k.startswith(prefix) else prefix + k, v, step)

    def table(self, name, columns, rows, step):
        head = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
        body = "".join("| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in r) + " |\n"
                       for r in rows)
        self.writer.add_text(name, head + body, step)

    def image(self, name, path):
        import numpy as np
        from PIL import Image

        self.writer.add_image(name, np.asarray(Image.open(path).convert("RGB")), dataformats="HWC")

    def summary(self, data):
        self.writer.add_text("summary", "\n".join(f"    {k}: {v}" for k, v in data.items()))

    def close(self):
        self.writer.close()


class WandbTracker(Tracker):
    name = "wandb"

    def __init__(self, run_dir: Path, project: str, run_name: str, tags: list[str], run_id: str | None,
                 job_type: str = "train", group: str | None = None):
        import wandb

        self.wandb = wandb
        # WANDB_PROJECT, WANDB_ENTITY, WANDB_MODE, ... apply as wandb reads them; the run's files
        # go under the run directory (wandb/), so they live where the run lives.
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT") or project, name=run_name, tags=tags or None,
                              job_type=job_type, group=os.environ.get("WANDB_RUN_GROUP") or group,
                              dir=str(run_dir), id=run_id, resume="allow" if run_id else None,
                              settings=wandb.Settings(console="off", silent=True))
        self.run_id = self.run.id
        self.defined: set[str] = set()
        for metric in AXES.values():
            self.run.define_metric(metric)

    def params(self, params):
        self.run.config.update(params, allow_val_change=True)

    def log(self, metrics, step, axis):
        prefix = "" if axis == "grpo" else f"{axis}/"
        named = {k if k.startswith(prefix) else prefix + k: v for k, v in metrics.items()}
        for key in named.keys() - self.defined:  # each metric plotted against its axis's step
            self.run.define_metric(key, step_metric=AXES[axis])
            self.defined.add(key)
        # no step=: the axes are metrics of their own; wandb's internal step only counts calls
        self.run.log({**named, AXES[axis]: step})

    def table(self, name, columns, rows, step):
        self.run.log({name: self.wandb.Table(columns=columns, data=rows), AXES["grpo"]: step})

    def image(self, name, path):
        self.run.log({name: self.wandb.Image(str(path))})

    def summary(self, data):
        self.run.summary.update(data)

    def close(self):
        self.run.finish()


_MLFLOW_NAME = re.compile(r"[^/\w.\- :]")


def mlflow_key(key: str) -> str:
    """MLflow's names allow letters, digits, ``_ - . / :`` and spaces, and its file store makes
    each ``/`` a folder (so ``samples`` and ``samples/masked_truncated`` cannot both exist):
    ``eval/aime/pass@1`` becomes ``eval.aime.pass_at_1``."""
    return _MLFLOW_NAME.sub("_", key.replace("@", "_at_").replace("/", "."))


class MlflowTracker(Tracker):
    name = "mlflow"

    def __init__(self, run_dir: Path, project: str, run_name: str, tags: list[str], run_id: str | None,
                 job_type: str = "train", group: str | None = None):
        import mlflow

        self.mlflow = mlflow
        self.client = mlflow.MlflowClient()  # MLFLOW_TRACKING_URI, as mlflow reads it
        if run_id is None:
            experiment = self.client.get_experiment_by_name(project)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(project)
            labels = {t: "true" for t in tags} | {"r1ray.job_type": job_type} | ({"r1ray.group": group} if group else {})
            run = self.client.create_run(experiment_id, run_name=run_name, tags=labels)
            run_id = run.info.run_id
        else:
            self.client.update_run(run_id, status="RUNNING")
        self.run_id = run_id

    def params(self, params):
        from mlflow.entities import Param

        items = [Param(mlflow_key(k), str(v)[:6000]) for k, v in params.items()]
        logged = self.client.get_run(self.run_id).data.params  # a resumed run: params are write-once
        items = [p for p in items if p.key not in logged]
        for i in range(0, len(items), 100):  # MLflow's batch limit
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def log(self, metrics, step, axis):
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        prefix = "" if axis == "grpo" else f"{axis}/"
        items = [Metric(mlflow_key(k if k.startswith(prefix) else prefix + k), v, now, step) for k, v in metrics.items()]
        for i in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[i:i + 1000])

    def table(self, name, columns, rows, step):
        self.client.log_dict(self.run_id, {"step": step, "columns": columns, "data": rows}, f"{name}/step-{step}.json")

    def image(self, name, path):
        self.client.log_artifact(self.run_id, str(path), "plots")

    def summary(self, data):
        # MLflow has no summary: its numbers also as metrics (summary.*), so runs sort and compare by them
        self.client.log_dict(self.run_id, data, "summary.json")
        self.log({f"summary/{k}": v for k, v in data.items()}, 0, "grpo")

    def close(self):
        self.client.set_terminated(self.run_id)


# ---- all of them -----------------------------------------------------------------------------

class Trackers:
    """Every tracker of a run. No call ever raises: a failing tracker is counted, warned about
    once, and the others go on."""

    def __init__(self, trackers: list[Tracker], run_dir: Path | None = None, sent: dict[str, int] | None = None):
        self.trackers, self.run_dir = trackers, run_dir
        self.sent = dict(sent or {})  # axis -> the last step sent (a resumed run does not send it again)
        self.errors: dict[str, int] = {}

    @classmethod
    def open(cls, names: list[str], run_dir: Path, project: str, run_name: str | None = None,
             tags: list[str] | None = None, on_error: str = "fail", job_type: str = "train",
             group: str | None = None) -> Trackers:
        """Start each named tracker for ``run_dir`` (continuing the runs of its trackers.json).
        ``on_error`` "fail": a tracker that cannot start raises TrackerUnavailable; "warn": the
        run goes on without it. ``job_type`` (train, eval, distill) and ``group`` (the training
        run an evaluation belongs to) label the run: W&B's job_type and group, MLflow tags."""
        state = read_json(run_dir / STATE) or {}
        ids, run_name = state.get("runs", {}), run_name or run_dir.name
        started = []
        for name in names:
            try:
                if name == "tensorboard":
                    started.append(TensorBoardTracker(run_dir))
                elif name == "wandb":
                    started.append(WandbTracker(run_dir, project, run_name, list(tags or []), ids.get(name),
                                                job_type, group))
                elif name == "mlflow":
                    started.append(MlflowTracker(run_dir, project, run_name, list(tags or []), ids.get(name),
                                                 job_type, group))
                else:
                    raise ValueError(f"unknown tracker {name!r}")
            except Exception as e:  # noqa: BLE001 - whatever the tracker raised, named
                why = f"logging.trackers: {name} could not start: {type(e).__name__}: {str(e).splitlines()[0][:300]}"
                if on_error != "warn":
                    raise TrackerUnavailable(f"{why}; accepted: fix it, drop {name} from logging.trackers, or set "
                                             "logging.on_tracker_error: warn") from e
                log.warning("%s; the run goes on without it (logging.on_tracker_error: warn)", why)
        out = cls(started, run_dir, state.get("sent"))
        out._save()
        return out

    def _each(self, what: str, call) -> None:
        for tracker in self.trackers:
            try:
                call(tracker)
            except Exception as e:  # noqa: BLE001 - a tracker never ends the run
                count = self.errors.get(tracker.name, 0) + 1
                self.errors[tracker.name] = count
                if count == 1:
                    log.warning("tracker %s failed (%s: %s: %s); the run goes on, later failures are counted in "
                                "summary.json", tracker.name, what, type(e).__name__, str(e).splitlines()[0][:300])

    def _save(self) -> None:
        if self.run_dir is not None:
            write_json_atomic(self.run_dir / STATE, {"runs": {t.name: t.run_id for t in self.trackers if t.run_id},
                                                    "sent": self.sent})

    def params(self, config: dict) -> None:
        flat = flatten(config)
        self._each("params", lambda t: t.params(flat))

    def log(self, record: dict, axis: str = "grpo") -> None:
        """One jsonl record at its ``step`` on ``axis`` ("grpo" or "sft")."""
        step = int(record.get("step", 0))
        if step <= self.sent.get(axis, 0):
            return  # sent before the resume's checkpoint: a redone step is not sent twice
        metrics = {k: v for k, v in numbers(record).items() if k != "step"}
        self._each("log", lambda t: t.log(metrics, step, axis))
        self.sent[axis] = step
        self._save()

    def table(self, name: str, rows: list[dict], step: int) -> None:
        if not rows:
            return
        columns = list(dict.fromkeys(k for r in rows for k in r))
        data = [[r.get(c) if isinstance(r.get(c), (int, float, str, bool)) or r.get(c) is None else str(r.get(c))
                 for c in columns] for r in rows]
        self._each("table", lambda t: t.table(name, columns, data, step))

    def images(self, run_dir: Path) -> None:
        for path in sorted(run_dir.glob("*.png")):
            self._each("image", lambda t, p=path: t.image(p.stem, p))

    def summary(self, summary: dict) -> None:
        flat = {k: v for k, v in flatten(summary).items()
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        if not flat:
            return  # a job that ended before it had numbers
        self._each("summary", lambda t: t.summary(flat))

    def close(self) -> dict[str, int]:
        """Ends every tracker's run; returns the failures counted per tracker."""
        self._each("close", lambda t: t.close())
        self.trackers = []
        return dict(self.errors)
