"""placement.mode colocate: the hf generator inside learner rank 0 on the learner's own module
(real engines, no Ray), its placement, and what cannot be colocated, refused up front."""
import pytest
from tiny_actors import assert_learners_policy
from tiny_actors import learner as _learner
from tiny_actors import prompt as _prompt

from r1ray.actors.generator import GeneratorConfig, SamplingConfig
from r1ray.actors.learner import LoraConfig
from r1ray.actors.rollout import TrainSample
from r1ray.controllers.config import load_recipe
from r1ray.controllers.config.schema import ConfigError

COLOCATE = ["placement.mode=colocate", "grpo.max_staleness=0"]


@pytest.mark.parametrize("lora", [None, LoraConfig(r=4, alpha=8, dropout=0.1)], ids=["full", "lora"])
def test_a_hosted_generator_samples_the_learners_current_weights_without_a_copy(tiny_model, lora):
    learner = _learner(tiny_model, lora=lora)
    learner.start_phase(lr=3e-2)
    learner.host_generator(GeneratorConfig(backend="hf"), seed=1)
    assert learner.generator._engine.model is learner.engine.module  # one copy of the weights
    prompts = [_prompt(tiny_model), _prompt(tiny_model, "12+34", "p1")]
    rollouts = learner.generate(prompts, 4, SamplingConfig(max_new_tokens=10))
    samples = [TrainSample(r.prompt_ids, r.completion_ids, r.logprobs, a)
               for r, a in zip(rollouts, [1.0, -1.0, 0.5, -0.5] * 2)]
    tokens = float(sum(len(s.completion_ids) for s in samples))
    stats = learner.grpo_step(samples, tokens, tokens)
    assert stats.logp_diff_abs_sum / stats.tokens < 1e-5  # the behaviour log-probs are the learner's own
    assert learner.adopt_weights(1) == 0.0
    outs = learner.generate(prompts, 1, SamplingConfig(max_new_tokens=12), greedy=True)
    module = learner.engine.module
    assert not module.training  # generation runs without dropout
    assert_learners_policy(learner, outs, 1, abs_tol=1e-5)
    learner.grpo_step(samples, tokens, tokens)  # training switches dropout (LoRA's) on again
    assert module.training


def test_colocate_is_checked_up_front():
    from r1ray.controllers.common.system import placement_plan
    from r1ray.controllers.config.validate import check_resources

    recipe = load_recipe("tiny-cpu", COLOCATE)
    assert recipe.colocated
    names = [owner for plan in placement_plan(recipe) for owner, _ in plan.bundles]
    assert "generator-0" not in names and "learner-rank-0" in names
    check_resources(recipe, cpus=1.5)  # learners 1 + scorer 0.25 + reference 0.25, no generator: fits
    with pytest.raises(ConfigError, match=r"CPUs in all .*generator 0.5"):
        check_resources(load_recipe("tiny-cpu", []), cpus=1.5)  # split: the generator's 0.5 more
    for extra, match in [(["grpo.max_staleness=1"], r"grpo.max_staleness.*got 1.*accepted: 0"),
                         (["generator.backend=vllm"], r"placement.mode.*'vllm'"),
                         (["generator.num_actors=2"], r"generator.num_actors.*got 2"),
                         (["generator.max_actors=2"], r"generator.num_actors.*max_actors 2"),
                         (["learner.zero_stage=3"], r"learner.zero_stage.*got 3"),
                         (["generator.dtype=bfloat16"], r"generator.dtype.*'float32'")]:
        with pytest.raises(ConfigError, match=match):
            load_recipe("tiny-cpu", ["placement.mode=colocate", "grpo.max_staleness=0", *extra])
    with pytest.raises(ConfigError, match="placement.mode"):
        load_recipe("tiny-cpu", ["placement.mode=hybrid"])
    assert load_recipe("tiny-cpu", COLOCATE, stage="sft").colocated  # no generator there: nothing to refuse
