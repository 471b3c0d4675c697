"""On-policy distillation's pieces without Ray: the teacher's log-probs against a separate
forward pass of the teacher, the reverse-KL advantage against hand-computed values, the
teacher term on top of GRPO's advantages, and the recipes refused before anything starts."""
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from r1ray.actors.advantages import distill_advantages, reverse_kl
from r1ray.actors.reference import Reference
from r1ray.actors.rollout import Rollout, TrainSample
from r1ray.controllers.config import check_teacher_tokenizer, load_recipe
from r1ray.controllers.config.schema import ConfigError
from r1ray.controllers.grpo.groups import train_batch

TINY = "configs/tiny-cpu.yaml"


def test_reverse_kl_and_the_distillation_advantage_by_hand():
    student, teacher, mask = [-1.0, -2.0, -0.5, -0.25], [-1.5, -1.0, -0.5, -1.25], [1, 1, 0, 1]
    kl = reverse_kl(student, teacher, mask)
    assert kl == [0.5, -1.0, 0.0, 1.0]  # the tool turn's token (mask 0) carries none
    assert distill_advantages(kl) == [-0.5, 1.0, -0.0, -1.0]  # discount 0: each token's own -KL
    # discount 0.5: A_3 = -1, A_2 = 0 + 0.5 x -1 = -0.5, A_1 = 1 + 0.5 x -0.5 = 0.75, A_0 = -0.5 + 0.5 x 0.75
    assert distill_advantages(kl, 0.5) == [-0.125, 0.75, -0.5, -1.0]
    assert distill_advantages(kl, 1.0) == [-0.5, 0.0, -1.0, -1.0]  # undiscounted: the return to the end
    with pytest.raises(ValueError, match="3 student and 2 teacher log-probs"):
        reverse_kl([-1.0] * 3, [-1.0] * 2)
    # the teacher's log-probs arrive as float32 arrays: the same differences as from lists
    # (float64 subtraction of the float32 values, not a float32 one)
    t32, s_list = np.asarray([-1.1, -0.3, -2.7, -0.01], np.float32), [-0.7, -2.2, -0.05, -1.3]
    assert reverse_kl(s_list, t32, mask) == reverse_kl(s_list, t32.tolist(), mask)
    assert all(type(x) is float for x in reverse_kl(np.asarray(s_list, np.float32), t32))


def _rollouts(rewards, student, teacher) -> list[Rollout]:
    return [Rollout(f"p{i // 2}/{i % 2}", f"p{i // 2}", [1, 2], [5] * len(s), s, [0] * len(s), "stop", reward=rw,
                    teacher_logprobs=t) for i, (rw, s, t) in enumerate(zip(rewards, student, teacher))]


def test_train_batch_uses_the_teacher_alone_or_on_top_of_the_rewards():
    student = [[-1.0, -2.0], [-0.5], [-1.0, -1.0, -1.0], [-3.0]]
    teacher = [[-1.0, -1.0], [-1.5], [-2.0, -1.0, -0.5], [-3.0]]
    rewards = [1.0, 0.0, 1.0, 1.0]
    opd = load_recipe(TINY, ["grpo.advantage_estimator=on_policy_distill", "teacher.model=some/teacher",
                             "grpo.num_generations=2", "learner.loss.kl_coef=0"])
    samples, _, _ = train_batch(_rollouts(rewards, student, teacher), opd, 1)
    assert [s.advantage for s in samples] == [[0.0, 1.0], [-1.0], [-1.0, 0.0, 0.5], [0.0]]  # rewards play no part

    mixed = load_recipe(TINY, ["learner.loss.teacher_kl_coef=0.5", "teacher.model=some/teacher",
                               "grpo.num_generations=2", "grpo.advantage_scale=none", "learner.loss.kl_coef=0"])
    samples, _, _ = train_batch(_rollouts(rewards, student, teacher), mixed, 1)
    # Dr. GRPO's centred rewards (+0.5, -0.5 and 0, 0) minus 0.5 x each token's reverse KL
    assert [s.advantage for s in samples] == [[0.5, 1.0], [-1.0], [-0.5, 0.0, 0.25], [0.0]]

    # grpo.distill_kl_clip 0.75: each token's KL cut to [-0.75, 0.75] first (1 and -1 here), in both uses
    cut = load_recipe(TINY, ["grpo.advantage_estimator=on_policy_distill", "teacher.model=some/teacher",
                             "grpo.num_generations=2", "learner.loss.kl_coef=0", "grpo.distill_kl_clip=0.75"])
    samples, _, _ = train_batch(_rollouts(rewards, student, teacher), cut, 1)
    assert [s.advantage for s in samples] == [[0.0, 0.75], [-0.75], [-0.75, 0.0, 0.5], [0.0]]
    mixed_cut = load_recipe(TINY, ["learner.loss.teacher_kl_coef=0.5", "teacher.model=some/teacher",
                                   "grpo.num_generations=2", "grpo.advantage_scale=none", "learner.loss.kl_coef=0",
                                   "grpo.distill_kl_clip=0.75"])
    samples, _, _ = train_batch(_rollouts(rewards, student, teacher), mixed_cut, 1)
    assert [s.advantage for s in samples] == [[0.5, 0.875], [-0.875], [-0.375, 0.0, 0.25], [0.0]]

    missing = _rollouts(rewards, student, teacher)
    missing[2].teacher_logprobs = None
    with pytest.raises(RuntimeError, match="no teacher log-probs for p1/0"):
        train_batch(missing, opd, 1)


@pytest.mark.parametrize("overrides, key", [
    (["grpo.advantage_estimator=on_policy_distill"], "grpo.advantage_estimator"),
    (["learner.loss.teacher_kl_coef=0.1"], "learner.loss.teacher_kl_coef"),
    (["grpo.advantage_estimator=on_policy_distill", "teacher.model=t", "learner.loss.teacher_kl_coef=0.1"],
     "learner.loss.teacher_kl_coef"),
    (["grpo.advantage_estimator=on_policy_distill", "teacher.model=t", "learner.loss.kl_coef=0.1",
      "learner.loss.kl_in_reward=true"], "learner.loss.kl_in_reward"),
    (["teacher.model=t", "grpo.distill_discount=1.5"], "grpo.distill_discount"),
    (["grpo.advantage_estimator=on_policy_distill", "teacher.model=t", "grpo.distill_kl_clip=0"],
     "grpo.distill_kl_clip"),
    (["grpo.advantage_estimator=on_policy_distill", "teacher.model=t", "grpo.dynamic_sampling=true"],
     "grpo.dynamic_sampling"),
    (["teacher.model=t", "teacher.num_actors=0"], "teacher.num_actors"),
    (["teacher.model=t", "learner.loss.teacher_kl_coef=-1"], "learner.loss.teacher_kl_coef"),
    # settings that would do nothing: no teacher term to cut, no distillation advantage to discount
    (["grpo.distill_kl_clip=1.0"], "grpo.distill_kl_clip"),
    (["teacher.model=t", "grpo.distill_kl_clip=1.0"], "grpo.distill_kl_clip"),
    (["grpo.distill_discount=0.5"], "grpo.distill_discount"),
    (["teacher.model=t", "learner.loss.teacher_kl_coef=0.1", "grpo.distill_discount=0.5"], "grpo.distill_discount"),
])
def test_a_teacher_recipe_that_cannot_work_is_refused_by_name(overrides, key):
    with pytest.raises(ConfigError, match=f"config key '{key}'"):
        load_recipe(TINY, overrides)


@pytest.mark.parametrize("overrides", [
    ["grpo.advantage_estimator=on_policy_distill", "teacher.model=t", "grpo.distill_discount=0.5",
     "grpo.distill_kl_clip=1.0", "learner.loss.kl_coef=0"],
    ["teacher.model=t", "learner.loss.teacher_kl_coef=0.1", "grpo.distill_kl_clip=1.0", "learner.loss.kl_coef=0"],
])
def test_the_distillation_settings_are_taken_where_a_teacher_term_uses_them(overrides):
    r = load_recipe(TINY, overrides)
    assert r.grpo.distill_kl_clip == 1.0


def test_a_teacher_needs_the_students_tokenizer(tiny_model, tmp_path):
    from transformers import AutoTokenizer

    student = AutoTokenizer.from_pretrained(tiny_model)
    same = load_recipe(TINY, ["learner.loss.kl_coef=0", f"teacher.model={tiny_model}"])
    check_teacher_tokenizer(same, student)  # the student's own tokenizer: accepted

    other = tmp_path / "other"
    shutil.copytree(tiny_model, other)
    tok = AutoTokenizer.from_pretrained(other)
    tok.add_tokens(["<extra_teacher_token>"])
    tok.save_pretrained(other)
    with pytest.raises(ConfigError, match=r"config key 'teacher.model': .* has another tokenizer than the student "
                                          r"\(\d+ vs \d+ tokens; first difference: token '<extra_teacher_token>'"):
        check_teacher_tokenizer(load_recipe(TINY, ["learner.loss.kl_coef=0", f"teacher.model={other}"]), student)
    from r1ray.controllers.cli import check_data  # r1ray check refuses it too, before anything starts

    with pytest.raises(ConfigError, match=r"has another tokenizer than the student"):
        check_data(load_recipe(TINY, ["learner.loss.kl_coef=0", f"teacher.model={other}",
                                      f"model.tiny_dir={Path(tiny_model).parent}"]))
    with pytest.raises(ConfigError, match=r"config key 'teacher.model': .*/none' is not a folder here.*make demo"):
        check_teacher_tokenizer(load_recipe(TINY, ["learner.loss.kl_coef=0", f"teacher.model={tmp_path / 'none'}"]),
                                student)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"config key 'teacher.model': .* has no tokenizer that loads"):
        check_teacher_tokenizer(load_recipe(TINY, ["learner.loss.kl_coef=0", f"teacher.model={tmp_path / 'empty'}"]),
                                student)


def test_the_teachers_logprobs_equal_a_separate_forward_pass_of_the_teacher(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    # A teacher that is not the student: the tiny model with its weights moved
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p, generator=torch.Generator().manual_seed(p.numel())))
    model.save_pretrained(tmp_path / "teacher")
    samples = [TrainSample([11, 12, 13], [21, 22, 23, 24]), TrainSample([11], [30, 31]), TrainSample([5, 6], [7])]
    teacher = Reference(str(tmp_path / "teacher"), temperature=0.7, micro_batch_size=2, span="teacher_logprobs")
    got = teacher.logprobs(samples)
    for s, lp in zip(samples, got):
        ids = torch.tensor([s.prompt_ids + s.completion_ids])
        with torch.no_grad():
            logits = model(ids).logits[0].float() / 0.7
        want = torch.log_softmax(logits[:-1], -1).gather(-1, ids[0, 1:, None])[:, 0][-len(s.completion_ids):]
        assert lp == pytest.approx(want.tolist(), abs=1e-5)
    assert [sp["kind"] for sp in teacher.drain_spans()] == ["teacher_logprobs"]
