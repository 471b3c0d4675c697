"""Where run directories live (controllers/config/storage.py): relative paths resolved against
``storage.path``, the current directory from a shell or ``~/r1ray_runs`` inside a Ray job;
paths Ray deletes refused before anything starts."""
import json
from argparse import Namespace

import pytest

from r1ray.controllers.cli import resumed_recipe
from r1ray.controllers.config import dump, load_recipe
from r1ray.controllers.config.schema import ConfigError
from r1ray.controllers.evaluation.job import output_dir, resolve_checkpoint
from r1ray.controllers.stages import plan


@pytest.fixture
def shell(tmp_path, monkeypatch):
    """A shell in ``tmp_path/clone`` with HOME at ``tmp_path/home``, outside any Ray job."""
    clone, home = tmp_path / "clone", tmp_path / "home"
    clone.mkdir()
    home.mkdir()
    monkeypatch.chdir(clone)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    return clone, home


def _in_job(monkeypatch, submission_id="grpo-1"):
    """What Ray's job supervisor puts in the entrypoint's environment."""
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(
        {"runtime_env": {}, "metadata": {"job_submission_id": submission_id, "job_name": submission_id}}))


def test_from_a_shell_a_relative_run_directory_stays_in_the_current_directory(shell):
    clone, _ = shell
    assert load_recipe("tiny-cpu").output_dir == str(clone / "runs" / "tiny-cpu")
    assert load_recipe("tiny-cpu", output_dir="runs/job-1").output_dir == str(clone / "runs" / "job-1")


def test_storage_path_takes_relative_run_directories_and_leaves_absolute_ones(shell, tmp_path):
    shared = tmp_path / "shared"
    sets = [f"storage.path={shared}"]
    assert load_recipe("tiny-cpu", sets, "runs/job-1").output_dir == str(shared / "runs" / "job-1")
    assert load_recipe("tiny-cpu", sets, str(tmp_path / "elsewhere")).output_dir == str(tmp_path / "elsewhere")
    assert load_recipe("tiny-cpu", ["storage.path=~/runs"], "a").output_dir == str(tmp_path / "home" / "runs" / "a")


def test_inside_a_ray_job_relative_run_directories_go_to_a_persistent_folder(shell, tmp_path, monkeypatch):
    _, home = shell
    copy = tmp_path / "ray" / "session_x" / "runtime_resources" / "working_dir_files" / "_ray_pkg_abc"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)  # the job's current directory: Ray's copy of --working-dir
    _in_job(monkeypatch)
    assert load_recipe("tiny-cpu", [], "runs/job-1").output_dir == str(home / "r1ray_runs" / "runs" / "job-1")
    with pytest.raises(ConfigError, match=r"'storage.path': '.*_ray_pkg_abc' is inside a Ray runtime-env folder.*"
                                          r"accepted: a persistent folder"):
        load_recipe("tiny-cpu", ["storage.path=."], "runs/job-1")
    with pytest.raises(ConfigError, match=r"'output_dir': '.*_ray_pkg_abc/runs/job-1' is inside a Ray runtime-env "
                                          r"folder.*storage.path=/path/to/runs.*~/r1ray_runs"):
        load_recipe("tiny-cpu", [], str(copy / "runs" / "job-1"))


@pytest.mark.parametrize("where", ["/tmp/ray/session_2026-12-03/runs/a", "/tmp/ray"])
def test_a_run_directory_in_rays_temporary_folder_is_refused(shell, where):
    with pytest.raises(ConfigError, match=rf"'output_dir': '{where}' is inside Ray's temporary folder '/tmp/ray'"):
        load_recipe("tiny-cpu", [], where)


def test_rays_own_temporary_folder_is_found_through_ray_tmpdir(shell, tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path / "raytmp"))
    with pytest.raises(ConfigError, match="is inside Ray's temporary folder"):
        load_recipe("tiny-cpu", [], str(tmp_path / "raytmp" / "ray" / "session_latest" / "runs"))


@pytest.mark.parametrize("value,match", [
    ("s3://bucket/runs", r"'storage.path': got 's3://bucket/runs'; accepted: a local folder.*mount the bucket"),
    ("", r"'storage.path': got ''; accepted: a folder path, or null"),
])
def test_a_storage_path_that_cannot_be_used_is_refused(shell, value, match):
    with pytest.raises(ConfigError, match=match):
        load_recipe("tiny-cpu", [f"storage.path={value}"])


def test_stages_eval_reports_and_resume_resolve_against_the_same_storage(shell, tmp_path, monkeypatch):
    shared = tmp_path / "shared"
    stages = plan("tiny-staged", [f"storage.path={shared}"], output_dir="staged")
    assert [str(s.dir) for s in stages] == [str(shared / "staged" / n) for n in ("sft", "grpo", "eval")]
    assert stages[1].recipe.model.path == str(shared / "staged" / "sft" / "checkpoint-sft")
    assert output_dir(None, "some/model", None, str(shared)) == shared / "runs" / "eval" / "model"
    # a run written under the job's storage is found there by a relative --resume and --checkpoint
    _in_job(monkeypatch)
    run = tmp_path / "home" / "r1ray_runs" / "runs" / "job-1"
    (run / "checkpoint-final").mkdir(parents=True)
    (run / "checkpoint-final" / "config.json").write_text("{}")
    recipe = load_recipe("tiny-cpu", [], "runs/job-1")
    assert recipe.output_dir == str(run)
    dump(recipe, run / "config.yaml")  # as r1ray train writes it
    _, run_dir = resumed_recipe(Namespace(resume="runs/job-1", recipe=None, overrides=[], output_dir=None))
    assert run_dir == run
    assert resolve_checkpoint("runs/job-1") == (str(run / "checkpoint-final"), run)
