"""placement.mode colocate: the hf generator inside learner rank 0 on the learner's own module
(real engines, no Ray), its placement, and what cannot be colocated, refused up front."""
import pytest
from tiny_actors import assert_learners_policy
from tiny_actors import learner as _learner
from tiny_actors import prompt as _prompt

from r1ray.actors.generator import GeneratorConfig, SamplingConfig
from r1ray.actors.lora import LoraConfig
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
                         (["generator.num_actors=2"], r"generator.num_actors.*got 2"),
                         (["generator.max_actors=2"], r"generator.num_actors.*max_actors 2"),
                         (["learner.zero_stage=3"], r"learner.zero_stage.*got 3"),
                         (["generator.dtype=bfloat16"], r"generator.dtype.*'float32'")]:
        with pytest.raises(ConfigError, match=match):
            load_recipe("tiny-cpu", ["placement.mode=colocate", "grpo.max_staleness=0", *extra])
    with pytest.raises(ConfigError, match="placement.mode"):
        load_recipe("tiny-cpu", ["placement.mode=hybrid"])


def test_colocated_vllm_generators_share_the_learner_ranks_bundles():
    """vLLM colocated: generator i is scheduled into learner rank i's bundle, which grows by the
    generator's CPUs; on GPUs the rank and the generator ask for half of that bundle's GPU each,
    so Ray gives them the same device and the plan reserves no GPU for generators."""
    from r1ray.cluster.placement import Bundles, unplaceable
    from r1ray.controllers.common.system import GPU_SHARE, placement_plan
    from r1ray.controllers.config.validate import check_resources

    vllm = [*COLOCATE, "generator.backend=vllm", "learner.num_ranks=2", "learner.cpus_per_rank=1",
            "generator.cpus_per_actor=0.5", "ray.num_cpus=8", "ray.num_gpus=8"]
    recipe = load_recipe("tiny-cpu", [*vllm, "generator.num_actors=2"])
    assert recipe.colocated and not recipe.hosts_generator
    [train, *rest] = placement_plan(recipe)
    assert [plan.name for plan in rest] == ["reward-scorer-0"]  # no generator group of its own
    assert train.bundles[:2] == [("learner-rank-0", {"CPU": 1.5}), ("learner-rank-1", {"CPU": 1.5})]
    assert train.index("generator-0") == 0 and train.index("generator-1") == 1
    check_resources(recipe, cpus=3.5)  # learners 2 + generators 1 + scorer 0.25 + reference 0.25
    with pytest.raises(ConfigError, match=r"CPUs in all .*generator 1"):
        check_resources(recipe, cpus=3.0)
    gpus = load_recipe("tiny-cpu", [*vllm, "learner.gpus_per_rank=1", "generator.gpus_per_actor=1",
                                    "reference.gpus=1"])
    check_resources(gpus, cpus=8, gpus=3)  # two ranks' GPUs (one shared with the generator) + the reference's
    with pytest.raises(ConfigError, match=r"needs 3 GPUs \(learner 2, reference 1, generators and others 0\) but 2"):
        check_resources(gpus, cpus=8, gpus=2)
    plan = placement_plan(gpus)
    assert plan[0].bundles[0] == ("learner-rank-0", {"CPU": 1.5, "GPU": 1})
    assert unplaceable(plan, [{"CPU": 8, "GPU": 3}]) is None
    assert GPU_SHARE * 2 == 1  # the rank's and the generator's asks fill the bundle's one GPU
    with pytest.raises(ValueError):
        Bundles("train").index("generator-0")
    for extra, match in [(["generator.num_actors=3"], r"generator.num_actors.*got 3.*accepted: 1 to 2"),
                         (["generator.max_actors=2"], r"generator.num_actors.*no elastic range"),
                         (["learner.gpus_per_rank=2", "generator.gpus_per_actor=2", "generator.tensor_parallel_size=2"],
                          r"got 2 / 2 / 2 .*accepted: 1 / 1 / 1"),
                         (["learner.gpus_per_rank=1", "generator.gpus_per_actor=0"], r"got 1 / 0 / 1")]:
        with pytest.raises(ConfigError, match=match):
            load_recipe("tiny-cpu", [*vllm, *extra])
    assert load_recipe("tiny-cpu", [*vllm, "generator.dtype=bfloat16"]).generator.dtype == "bfloat16"
    assert load_recipe("tiny-cpu", [*vllm, "learner.zero_stage=3"]).learner.zero_stage == 3  # sent bucket by bucket
    evaluate = placement_plan(recipe, ("rollout",))  # r1ray eval: generators in groups of their own
    assert [p.name for p in evaluate][:2] == ["generator-0", "generator-1"]
    assert load_recipe("tiny-cpu", COLOCATE, stage="sft").colocated  # no generator there: nothing to refuse
