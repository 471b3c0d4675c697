"""Where run directories live (controllers/config/storage.py): relative paths resolved against
``storage.path``, the current directory from a shell or ``~/r1ray_runs`` inside a Ray job;
paths Ray deletes refused before anything starts."""
import json
import shutil
from argparse import Namespace

import pytest

from r1ray.actors import storage as store
from r1ray.actors.learner import file_record
from r1ray.controllers.cli import resumed_recipe
from r1ray.controllers.common.checkpoint import Checkpoints, tag_for
from r1ray.controllers.common.job import run_dir_for
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


def test_an_empty_storage_path_is_refused(shell):
    with pytest.raises(ConfigError, match=r"'storage.path': got ''; accepted: a folder path or a URI, or null"):
        load_recipe("tiny-cpu", ["storage.path="])


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


# -- object storage (actors/storage.py), through pyarrow.fs on a local file:// "bucket" ------------
@pytest.fixture
def bucket(shell, tmp_path, monkeypatch):
    """A file:// URI standing for a bucket, and this node's staging folder."""
    monkeypatch.setenv("R1RAY_STAGING", str(tmp_path / "staging"))
    (tmp_path / "bucket").mkdir()
    return f"file://{tmp_path}/bucket", tmp_path / "staging"


def test_a_run_on_object_storage_works_in_a_staging_copy_of_the_same_uri(bucket, tmp_path):
    uri, staging = bucket
    recipe = load_recipe("tiny-cpu", [f"storage.path={uri}"], "runs/job-1")
    assert recipe.output_dir == str(staging / "file" / str(tmp_path / "bucket" / "runs" / "job-1").strip("/"))
    assert store.uri_of(recipe.output_dir) == f"{uri}/runs/job-1"
    assert store.uri_of(tmp_path / "elsewhere") is None
    direct = load_recipe("tiny-cpu", [], f"{uri}/runs/job-2")  # a URI as the output directory
    assert store.uri_of(direct.output_dir) == f"{uri}/runs/job-2"


def test_push_pull_and_remove_move_exactly_the_files_asked(bucket, tmp_path):
    uri, _ = bucket
    run = store.local_path(f"{uri}/run")
    (run / "a").mkdir(parents=True)
    (run / "a" / "x.bin").write_bytes(b"x" * 100)
    (run / "b.txt").write_text("b")
    assert store.push(run, only=["b.txt"]) == 1
    assert store.remote_files(f"{uri}/run") == {"b.txt": 1}
    assert store.push(run) == 101
    assert store.remote_files(f"{uri}/run") == {"a/x.bin": 100, "b.txt": 1}
    shutil.rmtree(run)  # another node: nothing staged
    assert store.pull(run, small_only=True) == 101 and (run / "a" / "x.bin").read_bytes() == b"x" * 100
    assert store.pull(run) == 0  # the same sizes: nothing fetched again
    (run / "b.txt").write_text("changed")  # another size: fetched again
    assert store.pull(run / "b.txt") == 1 and (run / "b.txt").read_text() == "b"
    store.remove(run / "a")
    assert store.remote_files(f"{uri}/run") == {"b.txt": 1}
    assert store.push(tmp_path / "not-staged") == 0 and store.pull(tmp_path / "not-staged") == 0


def test_the_driver_mirrors_its_own_files_but_not_the_learners(bucket):
    uri, _ = bucket
    run = store.local_path(f"{uri}/run")
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    (run / "checkpoints" / "step-000001").mkdir(parents=True)
    (run / "checkpoints" / "step-000001" / "shard.pt").write_bytes(b"s")  # a rank uploads its own
    (run / "checkpoint-final").mkdir()
    (run / "checkpoint-final" / "model.safetensors").write_bytes(b"w")
    mirror = store.Mirror(run, every_s=3600)
    assert mirror.sync() == 1 and mirror.sync() == 0  # unchanged: not sent again
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 2}\n')
    mirror.close()
    assert store.remote_files(f"{uri}/run") == {"metrics.jsonl": 24}


def test_a_checkpoint_on_object_storage_is_complete_only_with_its_driver_state_and_verified_from_it(bucket):
    uri, _ = bucket
    run = store.local_path(f"{uri}/run")
    ckpts = Checkpoints(run, every_steps=1, keep_last=1)
    for step in (1, 2):
        ckpts.begin(step)
        folder = ckpts.dir / tag_for(step)
        folder.mkdir(parents=True)
        (folder / "rank0.pt").write_bytes(b"r" * step)
        store.push(folder, only=["rank0.pt"])  # what a learner rank does as it saves
        assert "driver.json" not in store.remote_files(f"{uri}/run/checkpoints/{tag_for(step)}")
        ckpts.commit({"step": step, "records": []}, [{"files": {"rank0.pt": file_record(folder / "rank0.pt")}}])
    assert set(store.remote_files(f"{uri}/run/checkpoints")) == {"step-000002/rank0.pt", "step-000002/driver.json"}
    shutil.rmtree(run)  # resumed on a machine that has nothing staged: the driver's states come first
    store.pull(run, small_only=True)
    assert Checkpoints(run, 1, 1).latest()["step"] == 2
    # a shard changed on the storage after it was written: refused, naming it
    with open(str(tmp_uri_path(uri, "run/checkpoints/step-000002/rank0.pt")), "wb") as f:
        f.write(b"XY")
    shutil.rmtree(run)
    store.pull(run, small_only=True)
    with pytest.raises(ConfigError, match=r"step-000002: rank0.pt has sha256"):
        Checkpoints(run, 1, 1).latest()


def tmp_uri_path(uri: str, rel: str) -> str:
    return uri.removeprefix("file://") + "/" + rel


def test_a_storage_that_cannot_be_written_is_refused_up_front(shell, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")  # an S3 endpoint where nothing listens
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    with pytest.raises(ConfigError, match=r"'storage.path': cannot write to 's3://bucket/runs'.*Could not connect.*"
                                          r"accepted: .*check the bucket, the endpoint and the credentials"):
        load_recipe("tiny-cpu", ["storage.path=s3://bucket/runs"])
    with pytest.raises(ConfigError, match=r"'storage.path': got 's3://b/r\?endpoint_override=h'; accepted: a URI "
                                          r"without settings after '\?'.*AWS_ENDPOINT_URL"):
        load_recipe("tiny-cpu", ["storage.path=s3://b/r?endpoint_override=h"])
    with pytest.raises(ConfigError, match=r"'storage.path': cannot write to 'nosuch://x'"):
        load_recipe("tiny-cpu", ["storage.path=nosuch://x"])


def test_a_fresh_run_never_overwrites_a_run_that_is_only_on_the_storage(bucket):
    uri, _ = bucket
    recipe = load_recipe("tiny-cpu", [f"storage.path={uri}"], "runs/job-1")
    first = run_dir_for(recipe)
    (first / "config.yaml").write_text("seed: 0\n")
    store.push(first)
    again = load_recipe("tiny-cpu", [f"storage.path={uri}"], "runs/job-1")
    shutil.rmtree(first)  # nothing staged here (as for a run whose files are all big)
    second = run_dir_for(again)
    assert store.uri_of(second) == f"{uri}/runs/job-1-1"


def test_a_learner_uploads_its_checkpoint_while_it_trains_and_another_node_resumes_from_the_storage(
        bucket, tiny_model):
    """A world of one, in process: the checkpoint's files go up in the background (the next step
    does not wait for them); with nothing staged any more, a new learner downloads them and takes
    the step the first one took after the checkpoint, bit for bit."""
    import torch
    from tiny_actors import learner as _learner
    from tiny_actors import prompt as _prompt

    from r1ray.actors.generator import Generator, GeneratorConfig, SamplingConfig
    from r1ray.actors.rollout import TrainSample

    uri, _ = bucket
    rollouts = Generator(tiny_model, GeneratorConfig(backend="hf"), seed=3).generate(
        [_prompt(tiny_model)], 4, SamplingConfig(max_new_tokens=8))
    samples = [TrainSample(r.prompt_ids, r.completion_ids, r.logprobs, a) for r, a in zip(rollouts, [1.0, -1.0, .5, 0])]
    tokens = float(sum(len(s.completion_ids) for s in samples))
    ckpts = store.local_path(f"{uri}/run/checkpoints")
    a = _learner(tiny_model)
    a.start_phase(lr=1e-2, warmup_steps=4)
    a.grpo_step(samples, tokens, tokens)
    saved = a.save_checkpoint(str(ckpts), "step-1")
    assert len(a.uploads) == 1  # going up in the background
    stats_a = a.grpo_step(samples, tokens, tokens)
    assert a.wait_uploads() == sum(r["size"] for r in saved["files"].values()) and not a.uploads
    assert store.remote_files(f"{uri}/run/checkpoints/step-1") == {n: r["size"] for n, r in saved["files"].items()}

    shutil.rmtree(ckpts)  # another node: nothing staged
    b = _learner(tiny_model)
    b.start_phase(lr=1e-2, warmup_steps=4)
    b.load_checkpoint(str(ckpts), "step-1")
    stats_b = b.grpo_step(samples, tokens, tokens)
    assert stats_b.loss_sum == stats_a.loss_sum
    assert all(torch.equal(v, a.engine.module.state_dict()[k]) for k, v in b.engine.module.state_dict().items())


def test_eval_and_stages_find_a_run_on_object_storage_with_nothing_staged(bucket):
    uri, _ = bucket
    run = store.local_path(f"{uri}/staged/grpo")
    (run / "checkpoint-final").mkdir(parents=True)
    (run / "checkpoint-final" / "config.json").write_text("{}")
    (run / "config.yaml").write_text("seed: 0\n")
    store.push(run)
    shutil.rmtree(store.staging_root())
    assert resolve_checkpoint(f"{uri}/staged/grpo") == (str(run / "checkpoint-final"), run)
    shutil.rmtree(store.staging_root())
    assert resolve_checkpoint("staged/grpo", uri) == (str(run / "checkpoint-final"), run)  # relative: under storage
    stages = plan("tiny-staged", [f"storage.path={uri}"], output_dir="staged")
    assert [store.uri_of(s.dir) for s in stages] == [f"{uri}/staged/{n}" for n in ("sft", "grpo", "eval")]
    assert stages[2].recipe.model.path == str(run / "checkpoint-final")  # the actors download it where they run
