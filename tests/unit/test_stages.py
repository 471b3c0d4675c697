"""Multi-stage recipes (``r1ray run``) without running them: the plan, a distill stage feeding
the next, bad stages refused up front."""
import pytest
from tiny_recipes import staged as _staged

from r1ray.controllers.config.schema import ConfigError
from r1ray.controllers.stages import plan


def test_the_shipped_staged_recipe_plans_sft_grpo_eval():
    stages = plan("tiny-staged", output_dir="/tmp/somewhere")
    assert [(s.name, s.type) for s in stages] == [("sft", "sft"), ("grpo", "grpo"), ("eval", "eval")]
    sft, grpo, ev = stages
    assert sft.recipe.sft.steps == 200 and sft.recipe.model.path == "tiny"
    assert grpo.recipe.model.path == "/tmp/somewhere/sft/checkpoint-sft" and grpo.recipe.sft.steps == 0
    assert ev.recipe.model.path == "/tmp/somewhere/grpo/checkpoint-final" and ev.recipe.eval.tasks
    assert str(grpo.dir) == "/tmp/somewhere/grpo"


def test_a_distill_stage_feeds_its_dataset_to_the_next_stage(tmp_path, tiny_world):
    stages = plan(str(_staged(tmp_path, tiny_world, [
        {"type": "distill", "set": {"distill.base_url": "https://api.example.com/v1", "distill.model": "teacher"}},
        {"type": "sft"}, {"type": "grpo"}])), output_dir=str(tmp_path / "out"))
    distill, sft, grpo = stages
    assert sft.recipe.data.path == str(tmp_path / "out" / "distill" / "dataset")
    assert sft.recipe.model.path == distill.recipe.model.path  # the student is the recipe's model
    assert grpo.recipe.model.path == str(tmp_path / "out" / "sft" / "checkpoint-sft")
    assert distill.output() is None  # nothing distilled yet


@pytest.mark.parametrize("stages,match", [
    ([{"type": "sft"}, {"type": "rl"}], r"stages\[1\].type.*'rl'.*distill, sft, grpo, eval"),
    ([{"type": "distill"}], r"stage 'distill'.*distill.base_url.*distill.serve.*exactly one"),
    ([{"type": "sft"}, {"type": "distill", "set": {"distill.base_url": "http://x/v1", "distill.model": "m"}}],
     r"stages\[1\].*distill as the first stage"),
    ([{"type": "eval"}], r"stages\[0\].*evaluates the model of the stage before it"),
    ([{"type": "distill", "set": {"distill.base_url": "http://x/v1", "distill.model": "m"}}, {"type": "eval"}],
     r"stages\[1\].*an sft or grpo stage before it"),
    ([{"type": "sft"}, {"type": "sft"}], r"stages\[1\].name.*'sft' is used twice"),
    ([{"type": "sft"}, {"type": "grpo", "set": {"grpo.num_generations": 1}}],
     r"stage 'grpo' \(stages\[1\]\): config key 'grpo.num_generations'"),  # the last stage checked before the first runs
    ([{"type": "sft", "set": {"sft.steps": 0}}], r"stage 'sft'.*sft.steps"),
])
def test_bad_stages_are_refused_before_anything_runs(tmp_path, tiny_world, stages, match):
    with pytest.raises(ConfigError, match=match):
        plan(str(_staged(tmp_path, tiny_world, stages)))
