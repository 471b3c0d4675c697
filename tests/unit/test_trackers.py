"""Experiment trackers, read back through their own clients: W&B offline (its record file, with
W&B's own protobuf schema), MLflow with a local file store (MlflowClient), TensorBoard (its
event reader)."""
import json
import logging
import shutil
import sys

import pytest
import wandb_records

from r1ray.controllers.common.trackers import STATE, Trackers, TrackerUnavailable, check, mlflow_key

pytest.importorskip("wandb")
pytest.importorskip("mlflow")

CONFIG = {"learner": {"optim": {"lr": 1e-6}, "zero_stage": 2}, "rewards": [{"name": "accuracy", "weight": 1.0}],
          "distill": {"api_key_env": "DEEPSEEK_API_KEY"}}
SECRET = "sk-never-logged-4242"


@pytest.fixture
def local_trackers(tmp_path, monkeypatch):
    """W&B offline and MLflow on a file store under tmp_path; a key in the environment that
    must never reach a tracker."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setenv("WANDB_API_KEY", SECRET)
    monkeypatch.setenv("DEEPSEEK_API_KEY", SECRET)
    run_dir = tmp_path / "runs" / "tiny"
    run_dir.mkdir(parents=True)
    return run_dir


def _steps(trackers: Trackers, grpo: range, sft: range = range(0)):
    for s in sft:
        trackers.log({"step": s, "loss": 1.0 / s, "lr": 1e-5, "probe_pass@1": None}, axis="sft")
    for s in grpo:
        trackers.log({"step": s, "loss": 0.1 * s, "reward/mean": s / 10, "eval/heldout/pass@1": 0.5,
                      "samples": 16, "grad_norm": float("nan"), "note": "text"})


def _mlflow(run_dir):
    import mlflow

    run_id = json.loads((run_dir / STATE).read_text())["runs"]["mlflow"]
    return mlflow.MlflowClient(), run_id


def test_every_metric_reaches_wandb_and_mlflow_at_its_step_with_config_tables_and_summary(local_trackers):
    run_dir = local_trackers
    trackers = Trackers.open(["tensorboard", "wandb", "mlflow"], run_dir, "r1ray-tests", tags=["tiny", "cpu"])
    trackers.params(CONFIG)
    _steps(trackers, range(1, 4), sft=range(1, 3))
    trackers.table("completions", [{"prompt": "1+1=", "completion": "\\boxed{2}", "reward": 1.0}], step=3)
    trackers.summary({"eval_after": 0.9, "grpo": {"samples": 48}, "status": "completed"})
    assert trackers.close() == {}

    # W&B: each axis against its own step metric; the config flattened; the table at step 3
    rows = wandb_records.history(run_dir)
    grpo = [r for r in rows if "step" in r and "loss" in r]
    sft = [r for r in rows if "sft/step" in r]
    assert [(r["step"], r["loss"], r["reward/mean"], r["eval/heldout/pass@1"]) for r in grpo] == [
        (1, 0.1, 0.1, 0.5), (2, 0.2, 0.2, 0.5), (3, pytest.approx(0.3), 0.3, 0.5)]
    assert all("grad_norm" not in r and "note" not in r for r in grpo)  # not finite, not a number
    assert [(r["sft/step"], r["sft/loss"]) for r in sft] == [(1, 1.0), (2, 0.5)]
    table = next(r for r in rows if "completions/_type" in r)
    assert table["completions/_type"] == "table-file" and table["completions/nrows"] == 1 and table["step"] == 3
    config = wandb_records.config(run_dir)
    assert config["learner.optim.lr"] == 1e-6 and config["learner.zero_stage"] == 2
    assert config["distill.api_key_env"] == "DEEPSEEK_API_KEY"

    # MLflow: the same, through its client
    client, run_id = _mlflow(run_dir)
    run = client.get_run(run_id)
    assert run.info.run_name == "tiny" and run.info.status == "FINISHED"
    assert {"tiny", "cpu"} <= set(run.data.tags)
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")] == [
        (1, 0.1), (2, 0.2), (3, pytest.approx(0.3))]
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "sft.loss")] == [(1, 1.0), (2, 0.5)]
    assert [m.step for m in client.get_metric_history(run_id, "eval.heldout.pass_at_1")] == [1, 2, 3]
    assert [m.value for m in client.get_metric_history(run_id, "reward.mean")] == [0.1, 0.2, 0.3]
    assert run.data.params["learner.optim.lr"] == "1e-06" and run.data.params["learner.zero_stage"] == "2"
    artifacts = {a.path for a in client.list_artifacts(run_id)} | {
        a.path for a in client.list_artifacts(run_id, "completions")}
    assert {"summary.json", "completions/step-3.json"} <= artifacts
    local = client.download_artifacts(run_id, "completions/step-3.json", str(run_dir.parent))
    assert json.loads(open(local).read())["data"] == [["1+1=", "\\boxed{2}", 1.0]]

    # TensorBoard: its own reader
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard")).Reload()
    assert [(e.step, round(e.value, 6)) for e in events.Scalars("grpo/loss")] == [(1, 0.1), (2, 0.2), (3, 0.3)]
    assert [e.step for e in events.Scalars("sft/loss")] == [1, 2]

    # No key from the environment anywhere in what the trackers wrote
    for path in [*run_dir.rglob("*"), *(run_dir.parents[1] / "mlruns").rglob("*")]:
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


def test_a_resumed_run_continues_the_same_tracker_runs_without_sending_a_step_twice(local_trackers):
    run_dir = local_trackers
    first = Trackers.open(["wandb", "mlflow"], run_dir, "r1ray-tests")
    first.params(CONFIG)
    _steps(first, range(1, 6))  # the driver dies after step 5; the newest checkpoint is step 4
    first.close()
    ids = json.loads((run_dir / STATE).read_text())["runs"]

    resumed = Trackers.open(["wandb", "mlflow"], run_dir, "r1ray-tests")
    resumed.params({**CONFIG, "grpo": {"steps": 8}})  # a resume may raise grpo.steps
    _steps(resumed, range(5, 9))  # step 5 redone from the checkpoint, then 6..8
    resumed.close()
    assert json.loads((run_dir / STATE).read_text())["runs"] == ids

    assert wandb_records.run_ids(run_dir) == [ids["wandb"], ids["wandb"]]
    assert [r["step"] for r in wandb_records.history(run_dir) if "loss" in r] == list(range(1, 9))
    client, run_id = _mlflow(run_dir)
    assert run_id == ids["mlflow"]
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == list(range(1, 9))
    assert client.get_run(run_id).data.params["grpo.steps"] == "8"


def test_a_tracker_that_fails_mid_run_is_counted_and_warned_about_once(local_trackers, caplog):
    run_dir = local_trackers
    trackers = Trackers.open(["tensorboard", "mlflow"], run_dir, "r1ray-tests")
    _steps(trackers, range(1, 3))
    shutil.rmtree(run_dir.parents[1] / "mlruns")  # the store is gone under the run
    with caplog.at_level(logging.WARNING, logger="r1ray.trackers"):
        _steps(trackers, range(3, 6))
    errors = trackers.close()
    assert errors["mlflow"] >= 3 and "tensorboard" not in errors
    warned = [r for r in caplog.records if "tracker mlflow failed" in r.getMessage()]
    assert len(warned) == 1 and "the run goes on" in warned[0].getMessage()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert [e.step for e in EventAccumulator(str(run_dir / "tensorboard")).Reload().Scalars("grpo/loss")] == [1, 2, 3, 4, 5]


def test_trackers_that_cannot_start_are_named_with_their_fix(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    for key in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_DISABLED", "WANDB_BASE_URL"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # nothing listens on the discard port
    problems = check(["tensorboard", "wandb", "mlflow"], timeout_s=2)
    assert set(problems) == {"wandb", "mlflow"}
    assert "wandb is not logged in to api.wandb.ai" in problems["wandb"] and "WANDB_MODE=offline" in problems["wandb"]
    assert "http://127.0.0.1:9" in problems["mlflow"] and "127.0.0.1:9 does not answer" in problems["mlflow"]

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if not installed
    assert check(["wandb", "mlflow"]) == {
        "mlflow": "mlflow is not installed; accepted: pip install 'r1ray[mlflow]', or remove mlflow from logging.trackers"}

    # Started anyway: refused by name, or (on_tracker_error: warn) the run goes on without it
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with pytest.raises(TrackerUnavailable, match=r"logging.trackers: mlflow could not start: .*logging.on_tracker_error"):
        Trackers.open(["tensorboard", "mlflow"], run_dir, "p")
    with caplog.at_level(logging.WARNING, logger="r1ray.trackers"):
        trackers = Trackers.open(["tensorboard", "mlflow"], run_dir, "p", on_error="warn")
    assert [t.name for t in trackers.trackers] == ["tensorboard"]
    assert any("mlflow could not start" in r.getMessage() for r in caplog.records)
    trackers.close()


def test_metric_names_mlflow_accepts():
    assert mlflow_key("eval/aime24/pass@1") == "eval.aime24.pass_at_1"
    assert mlflow_key("reward/accuracy/mean") == "reward.accuracy.mean"
    assert mlflow_key("time/step_s (p50)") == "time.step_s _p50_"


def test_a_jobs_curves_reach_every_tracker_as_images_with_its_labels_and_summary(local_trackers):
    from r1ray.controllers.common.job import end_trackers

    run_dir = local_trackers
    (run_dir / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "loss": 0.1 * s, "reward/mean": s / 10}) + "\n" for s in range(1, 4)))
    (run_dir / "sft_metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n")
    trackers = Trackers.open(["tensorboard", "wandb", "mlflow"], run_dir, "r1ray-tests", job_type="eval",
                             group="tiny-run")
    summary = {"eval/heldout/pass@1": 0.5, "wall_s": 3.0, "status": "completed"}
    end_trackers(trackers, run_dir, summary)
    assert "tracker_errors" not in summary and (run_dir / "curves.png").is_file()

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard")).Reload()
    assert set(events.Tags()["images"]) == {"curves", "sft_curves"}

    rows = wandb_records.history(run_dir)
    assert sorted(k for r in rows for k, v in r.items() if k.endswith("/_type") and v == "image-file") == [
        "curves/_type", "sft_curves/_type"]
    (run,) = wandb_records.run_records(run_dir)
    assert (run.job_type, run.run_group, run.display_name) == ("eval", "tiny-run", "tiny")
    assert wandb_records.summary(run_dir)["eval/heldout/pass@1"] == 0.5

    client, run_id = _mlflow(run_dir)
    tags = client.get_run(run_id).data.tags
    assert (tags["r1ray.job_type"], tags["r1ray.group"]) == ("eval", "tiny-run")
    assert {a.path for a in client.list_artifacts(run_id, "plots")} == {"plots/curves.png", "plots/sft_curves.png"}
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "summary.eval.heldout.pass_at_1")] == [
        (0, 0.5)]
