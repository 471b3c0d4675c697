"""Placement groups without Ray: the plan a recipe makes and the up-front checks."""
import pytest

from r1ray.cluster.placement import Bundles, unplaceable
from r1ray.controllers.common.system import placement_plan
from r1ray.controllers.config import load_recipe
from r1ray.controllers.config.schema import ConfigError

GPU_RECIPE = "configs/qwen2.5-1.5b-h100.yaml"


def _gpu_recipe(*overrides, gpus=8):
    return load_recipe(GPU_RECIPE, list(overrides), cpus=128, gpus=gpus)


def test_the_h100_recipe_plans_one_node():
    plans = placement_plan(_gpu_recipe())
    assert [p.name for p in plans] == ["train", "generator-0", "generator-1", "generator-2", "reward-scorer-0", "reward-scorer-1"]
    train = plans[0]
    assert [o for o, _ in train.bundles] == [f"learner-rank-{i}" for i in range(4)] + ["reference-0"]
    assert train.strategy == "PACK" and train.total() == {"CPU": 18, "GPU": 5}
    assert unplaceable(plans, [{"CPU": 128, "GPU": 8}]) is None
    # one GPU short
    assert "does not fit" in unplaceable(plans, [{"CPU": 128, "GPU": 7}])


def test_reference_actors_each_get_a_bundle_and_are_counted():
    plans = placement_plan(_gpu_recipe("reference.num_actors=2", "generator.num_actors=2", gpus=8))
    train = plans[0]
    assert [o for o, _ in train.bundles][-2:] == ["reference-0", "reference-1"]
    assert train.total() == {"CPU": 20, "GPU": 6}
    with pytest.raises(ConfigError, match=r"needs 9 GPUs \(learner 4, reference 2, generators and others 3\) but 8 are available"):
        _gpu_recipe("reference.num_actors=2")
    with pytest.raises(ConfigError, match="'reference.num_actors': got 0"):
        _gpu_recipe("reference.num_actors=0")


def test_tensor_parallel_generators_need_their_gpus_on_one_node():
    r = _gpu_recipe("generator.num_actors=1", "generator.tensor_parallel_size=4", "generator.gpus_per_actor=4", gpus=16)
    plans = placement_plan(r)
    assert plans[1].bundles == [("generator-0", {"CPU": 4, "GPU": 4})]
    assert unplaceable(plans, [{"CPU": 64, "GPU": 8}, {"CPU": 64, "GPU": 8}]) is None
    why = unplaceable(plans, [{"CPU": 64, "GPU": 2}] * 8)  # 16 GPUs, but never 4 on one node
    assert why.startswith("generator-0 needs 4 CPU, 4 GPU on one node") and "2" in why


@pytest.mark.parametrize("overrides,message", [
    (["generator.gpus_per_actor=0.5"], "'generator.gpus_per_actor': got 0.5; accepted: 0 or a whole number"),
    (["learner.gpus_per_rank=1.5"], "'learner.gpus_per_rank': got 1.5"),
    (["generator.gpus_per_actor=2"], "vLLM would leave 1 of them idle"),
    (["generator.tensor_parallel_size=2"], "'generator.gpus_per_actor': got 1 with tensor_parallel_size 2; accepted: 2"),
    (["generator.tensor_parallel_size=0"], "'generator.tensor_parallel_size': got 0"),
])
def test_placements_that_cannot_work_are_refused_by_name(overrides, message):
    with pytest.raises(ConfigError) as e:
        _gpu_recipe(*overrides)
    assert message in str(e.value)


def test_tensor_parallelism_is_vllms():
    with pytest.raises(ConfigError) as e:
        load_recipe("configs/tiny-cpu.yaml", ["generator.tensor_parallel_size=2", "generator.gpus_per_actor=2"],
                    cpus=8, gpus=2)
    assert "accepted: 1, or backend 'vllm'" in str(e.value)


def test_bundles_drop_zero_resources():
    b = Bundles("x")
    b.add("a", 0.5, 0)
    assert b.bundles == [("a", {"CPU": 0.5})]
