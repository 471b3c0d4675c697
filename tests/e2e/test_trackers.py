"""Experiment trackers through the CLI: a tiny run logs to TensorBoard, W&B (offline) and MLflow
(a local file store) at once, every metric at its step, and a resumed run continues the same
tracker runs; a tracker that cannot start is refused before anything starts."""
import json

import pytest
import r1ray_cli
import wandb_records
import yaml

pytest.importorskip("wandb")
pytest.importorskip("mlflow")


def _env(tmp_path) -> dict:
    return {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "MLFLOW_ALLOW_FILE_STORE": "true",
            "MLFLOW_TRACKING_URI": (tmp_path / "mlruns").as_uri()}


def _jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.timeout(900)
def test_a_run_logs_to_every_tracker_at_its_steps_and_a_resume_continues_the_same_runs(tmp_path, tiny_world,
                                                                                       monkeypatch):
    out, env = tmp_path / "run", _env(tmp_path)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # for this process's client too
    proc = r1ray_cli.run(
        "train", "configs/tiny-cpu.yaml", "--output-dir", out, "--set", f"model.tiny_dir={tiny_world}",
        *r1ray_cli.QUIET, "--set", "sft.steps=3", "--set", "grpo.steps=4", "--set", "grpo.prompts_per_step=4",
        "--set", "grpo.num_generations=4", "--set", "sampling.max_new_tokens=16", "--set", "eval.num_prompts=8",
        "--set", "checkpoint.every_steps=2", "--set", "grpo.log_completions_every=2",
        "--set", "logging.trackers=[tensorboard, wandb, mlflow]", "--set", "logging.tags=[e2e]",
        extra_env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    grpo, sft = _jsonl(out / "metrics.jsonl"), _jsonl(out / "sft_metrics.jsonl")
    ids = json.loads((out / "trackers.json").read_text())["runs"]

    rows = wandb_records.history(out)
    assert [(r["step"], r["loss"], r["reward/mean"]) for r in rows if "loss" in r and "step" in r] == [
        (g["step"], g["loss"], g["reward/mean"]) for g in grpo]
    assert [(r["sft/step"], r["sft/loss"]) for r in rows if "sft/step" in r] == [(s["step"], s["loss"]) for s in sft]
    assert [r["step"] for r in rows if "completions/_type" in r] == [2, 4]
    config = wandb_records.config(out)
    assert config["grpo.steps"] == 4 and config["logging.tags"] == "['e2e']"

    import mlflow

    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    run = client.get_run(ids["mlflow"])
    assert run.info.run_name == "run" and run.info.status == "FINISHED" and "e2e" in run.data.tags
    assert [(m.step, m.value) for m in client.get_metric_history(ids["mlflow"], "loss")] == [
        (g["step"], pytest.approx(g["loss"])) for g in grpo]
    assert [m.step for m in client.get_metric_history(ids["mlflow"], "sft.loss")] == [1, 2, 3]
    assert [m.value for m in client.get_metric_history(ids["mlflow"], "samples.masked_truncated")] == [
        g["samples/masked_truncated"] for g in grpo]
    assert run.data.params["grpo.steps"] == "4"
    summary = json.loads((out / "summary.json").read_text())
    logged = json.loads(open(client.download_artifacts(ids["mlflow"], "summary.json", str(tmp_path))).read())
    assert logged["eval_after"] == summary["eval_after"] and "tracker_errors" not in summary, summary.get("tracker_errors")

    # Resumed past its end: the same tracker runs, steps 5 and 6 added, nothing sent twice
    proc = r1ray_cli.run("train", "--resume", out, "--set", "grpo.steps=6", extra_env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert json.loads((out / "trackers.json").read_text())["runs"] == ids
    assert wandb_records.run_ids(out) == [ids["wandb"]] * 2
    assert [r["step"] for r in wandb_records.history(out) if "loss" in r and "step" in r] == list(range(1, 7))
    assert [m.step for m in client.get_metric_history(ids["mlflow"], "loss")] == list(range(1, 7))
    assert yaml.safe_load((out / "config.yaml").read_text())["logging"]["trackers"] == ["tensorboard", "wandb", "mlflow"]
    assert (out / "curves.png").is_file() and (out / "sft_curves.png").is_file()  # redrawn whole by the resume
    assert {a.path for a in client.list_artifacts(ids["mlflow"], "plots")} == {"plots/curves.png", "plots/sft_curves.png"}

    # r1ray eval of the run directory: its own tracker run (job_type eval) in the run's group
    proc = r1ray_cli.run("eval", "--checkpoint", out, "--tasks", "heldout", "--limit", "4", extra_env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    where = out / "eval" / "checkpoint-final"
    report = json.loads((where / "results.json").read_text())["tasks"]["heldout"]
    (record,) = wandb_records.run_records(where)
    assert (record.job_type, record.run_group, record.display_name) == ("eval", "run", "eval-run-checkpoint-final")
    logged = wandb_records.summary(where)
    assert logged["eval/heldout/pass@1"] == report["pass@1"] and logged["eval/heldout/answered"] == report["answered"]
    table = next(r for r in wandb_records.history(where) if "eval/heldout/samples/_type" in r)
    assert table["eval/heldout/samples/nrows"] == 4
    eval_id = json.loads((where / "trackers.json").read_text())["runs"]["mlflow"]
    run = client.get_run(eval_id)
    assert run.data.tags["r1ray.job_type"] == "eval" and run.data.tags["r1ray.group"] == "run"
    assert run.data.metrics["summary.eval.heldout.pass_at_1"] == pytest.approx(report["pass@1"])
    assert run.data.params["checkpoint"] == str(out / "checkpoint-final")
    samples = client.download_artifacts(eval_id, "eval/heldout/samples/step-0.json", str(tmp_path))
    details = [json.loads(line) for line in (where / "heldout.details.jsonl").read_text().splitlines()]
    assert [row[:2] for row in json.loads(open(samples).read())["data"]] == [
        ["\n".join(f"{m['role']}: {m['content']}" for m in d["prompt"]), d["gold"]] for d in details]


def test_a_tracker_that_cannot_start_is_refused_before_anything_starts(tmp_path, tiny_world):
    env = {"HOME": str(tmp_path), "WANDB_MODE": "", "WANDB_API_KEY": ""}  # not logged in, no ~/.netrc
    out = tmp_path / "run"
    args = ["configs/tiny-cpu.yaml", "--set", f"model.tiny_dir={tiny_world}", *r1ray_cli.QUIET,
            "--set", "logging.trackers=[tensorboard, wandb]"]
    proc = r1ray_cli.run("train", *args, "--output-dir", out, extra_env=env, timeout=300)
    assert proc.returncode == 2 and "config key 'logging.trackers': wandb is not logged in" in proc.stderr
    assert "`wandb login`" in proc.stderr and "logging.on_tracker_error: warn" in proc.stderr
    assert not out.exists() and "Started a local Ray" not in proc.stderr
    proc = r1ray_cli.run("check", *args, "--skip-data", extra_env=env, timeout=300)
    assert proc.returncode == 2 and "wandb is not logged in" in proc.stderr
    proc = r1ray_cli.run("check", *args, "--skip-data", "--set", "logging.on_tracker_error=warn", extra_env=env,
                         timeout=300)
    assert proc.returncode == 0 and "trackers: tensorboard" in proc.stdout and "wandb is not logged in" in proc.stderr
    proc = r1ray_cli.run("eval", *args, "--checkpoint", tiny_world / "model", "--tasks", "heldout",
                         "--output-dir", tmp_path / "eval", extra_env=env, timeout=300)
    assert proc.returncode == 2 and "wandb is not logged in" in proc.stderr and not (tmp_path / "eval").exists()
