"""Checkpoints without Ray: the learner's state round-trips to the same next step, the sampler
continues the data order, damaged checkpoints are found, jsonl is cut back, a resume that
would change the data order is refused."""
import json
import os

import pytest
import torch
from tiny_actors import learner as _learner
from tiny_actors import prompt as _prompt

from r1ray.actors.generator import Generator, GeneratorConfig, SamplingConfig
from r1ray.actors.rollout import TrainSample
from r1ray.controllers.common.checkpoint import Checkpoints, check_resumable, tag_for
from r1ray.controllers.common.data import EpochSampler
from r1ray.controllers.common.runlog import truncate_jsonl
from r1ray.controllers.config.schema import ConfigError


def test_a_learner_restored_from_a_checkpoint_takes_the_same_next_step(tiny_model, tmp_path):
    """Weights, Adam moments, the lr scheduler's position and the RNG all come back: the step
    after a restore is the step the original would have taken, bit for bit."""
    rollouts = Generator(tiny_model, GeneratorConfig(backend="hf"), seed=3).generate(
        [_prompt(tiny_model)], 4, SamplingConfig(max_new_tokens=8))
    samples = [TrainSample(r.prompt_ids, r.completion_ids, r.logprobs, a)
               for r, a in zip(rollouts, [1.0, -1.0, 0.5, -0.5])]
    tokens = float(sum(len(s.completion_ids) for s in samples))

    a = _learner(tiny_model)
    a.start_phase(lr=1e-2, warmup_steps=4)
    for _ in range(2):
        a.grpo_step(samples, tokens, tokens)
    saved = a.save_checkpoint(str(tmp_path), "step-2")
    # a world of one writes every file of the checkpoint, and lists each with its size and sha256
    assert set(saved["files"]) == set(os.listdir(tmp_path / "step-2")) and "rng_rank0.pt" in saved["files"]
    assert all(r["size"] == (tmp_path / "step-2" / n).stat().st_size for n, r in saved["files"].items())
    noise = torch.rand(4)
    stats_a = a.grpo_step(samples, tokens, tokens)
    weights_a = {k: v.clone() for k, v in a.engine.module.state_dict().items()}

    b = _learner(tiny_model)
    b.start_phase(lr=1e-2, warmup_steps=4)
    b.load_checkpoint(str(tmp_path), "step-2")
    assert torch.equal(torch.rand(4), noise)  # the RNG continues where the checkpoint left it
    stats_b = b.grpo_step(samples, tokens, tokens)
    assert stats_b.lr == stats_a.lr  # warm-up position: step 3 of 4
    assert stats_b.loss_sum == stats_a.loss_sum
    assert all(torch.equal(v, weights_a[k]) for k, v in b.engine.module.state_dict().items())

    fresh = _learner(tiny_model)  # without the optimizer's moments the same step lands elsewhere
    fresh.start_phase(lr=1e-2, warmup_steps=4)
    fresh.engine.module.load_state_dict(torch.load(tmp_path / "step-2" / "mp_rank_00_model_states.pt",
                                                   weights_only=False)["module"])
    fresh.grpo_step(samples, tokens, tokens)
    assert any(not torch.equal(v, weights_a[k]) for k, v in fresh.engine.module.state_dict().items())
    with pytest.raises(FileNotFoundError, match="step-9"):
        b.load_checkpoint(str(tmp_path), "step-9")


def test_a_sampler_seeks_to_where_another_stopped():
    whole = EpochSampler(7, seed=3)
    first = whole.take(10)  # crosses into the second epoch
    rest = whole.take(9)
    resumed = EpochSampler(7, seed=3)
    resumed.seek(10)
    assert resumed.taken == 10 and resumed.take(9) == rest
    assert first[7][1].endswith(".1")  # ids stay unique across epochs


def test_checkpoints_keep_the_newest_complete_ones(tmp_path):
    cks = Checkpoints(tmp_path, every_steps=2, keep_last=2)
    assert cks.latest() is None and cks.due(4) and not cks.due(3)
    for step in (2, 4, 6):
        (cks.dir / tag_for(step)).mkdir(parents=True)
        cks.commit({"step": step, "policy_version": step + 1})
    assert [p.name for p in cks.steps()] == ["step-000004", "step-000006"]
    (cks.dir / tag_for(8)).mkdir()  # the run died while the learners were writing step 8
    latest = cks.latest()
    assert latest["step"] == 6 and latest["tag"] == "step-000006" and latest["policy_version"] == 7
    assert not Checkpoints(tmp_path, every_steps=0, keep_last=1).due(4)


def test_a_damaged_checkpoint_is_found_and_the_newest_intact_one_used(tmp_path, caplog):
    """driver.json lists every file with its size and sha256; a file cut short, changed or
    missing sends the resume to the newest intact checkpoint, naming the file, what was expected
    and what was found; with none intact the resume is refused, naming each."""
    import logging

    cks = Checkpoints(tmp_path, every_steps=2, keep_last=3)
    for step in (2, 4, 6):
        folder = cks.dir / tag_for(step)
        (folder / "hf").mkdir(parents=True)
        (folder / "shard.pt").write_bytes(bytes(range(256)) * step)
        (folder / "hf" / "model.safetensors").write_bytes(b"w" * 100)
        cks.commit({"step": step, "policy_version": step},  # step 2: a record a learner made, kept as it is
                   [{"files": {"shard.pt": {"size": 256 * step, "sha256": "learner's"}}}] if step == 2 else [])
    listed = json.loads((cks.dir / tag_for(6) / "driver.json").read_text())["files"]
    assert set(listed) == {"shard.pt", "hf/model.safetensors"} and listed["shard.pt"]["size"] == 256 * 6
    assert cks.latest()["step"] == 6 and "files" not in cks.latest()

    caplog.set_level(logging.WARNING, logger="r1ray")
    with open(cks.dir / tag_for(6) / "shard.pt", "r+b") as f:  # a copy cut short
        f.truncate(1000)
    assert cks.latest()["step"] == 4
    assert f"step-000006 is damaged: shard.pt has 1000 bytes, expected {256 * 6}" in caplog.text
    (cks.dir / tag_for(4) / "hf" / "model.safetensors").write_bytes(b"x" * 100)  # same size, other bytes
    with pytest.raises(ConfigError) as e:
        cks.latest()
    message = str(e.value)
    assert "no intact checkpoint" in message and "step-000006: shard.pt has 1000 bytes" in message
    assert "step-000004: hf/model.safetensors has sha256" in message and "step-000002: shard.pt has sha256" in message
    (cks.dir / tag_for(6) / "shard.pt").unlink()
    with pytest.raises(ConfigError, match=r"step-000006: shard.pt is missing \(expected 1536 bytes\)"):
        cks.latest()
    again = Checkpoints(tmp_path / "again", 2, 2)  # a resumed run saves a step that is there already
    (again.dir / tag_for(2)).mkdir(parents=True)
    (again.dir / tag_for(2) / "shard.pt").write_bytes(b"old")
    again.commit({"step": 2, "policy_version": 2})
    again.begin(2)  # the old driver.json goes first: a save cut short now is incomplete, not "complete"
    assert again.latest() is None
    (again.dir / tag_for(2) / "shard.pt").write_bytes(b"new shard")
    again.commit({"step": 2, "policy_version": 3}, [{"files": {"driver.json": {"size": 1, "sha256": "stale"}}}])
    assert again.latest()["policy_version"] == 3  # driver.json itself is never in the list
    legacy = Checkpoints(tmp_path / "legacy", 2, 2)  # written before checkpoints listed their files
    (legacy.dir / tag_for(2)).mkdir(parents=True)
    (legacy.dir / tag_for(2) / "driver.json").write_text(json.dumps({"step": 2, "policy_version": 2}))
    assert legacy.latest()["step"] == 2


def test_a_failed_resume_keeps_the_recorded_outcome():
    from r1ray.controllers.common.job import resume_outcome

    before = {"status": "completed", "grpo_steps_done": 10, "eval_after": 0.9}
    failed = {"status": "failed", "error": "RuntimeError: a shard is unreadable", "stage": "grpo"}
    kept = resume_outcome(before, failed, progressed=False)
    assert kept["status"] == "completed" and kept["eval_after"] == 0.9
    assert kept["last_resume"] == {"status": "failed", "error": "RuntimeError: a shard is unreadable"}
    assert resume_outcome(before, failed, progressed=True) is failed  # it trained: its own outcome counts
    assert resume_outcome(None, failed, progressed=False) is failed  # not a resume


def test_jsonl_is_cut_back_to_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "x": s * 2}) + "\n" for s in range(1, 6)) + '{"step": 6, "x"')
    assert truncate_jsonl(path, 3) == 3
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]
    assert truncate_jsonl(tmp_path / "absent.jsonl", 3) == 0


def test_a_recipe_that_changes_the_data_order_is_refused(tmp_path):
    saved = {"seed": 0, "data": {"path": "tiny"}, "grpo": {"prompts_per_step": 16, "steps": 100}}
    check_resumable(saved, {**saved, "grpo": {"prompts_per_step": 16, "steps": 200}}, tmp_path)  # more steps: fine
    with pytest.raises(ConfigError, match=r"'grpo.prompts_per_step': got 8 .* used 16"):
        check_resumable(saved, {**saved, "grpo": {"prompts_per_step": 8}}, tmp_path)
