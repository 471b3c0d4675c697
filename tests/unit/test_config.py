"""Recipes: loading, overrides, and every kind of bad input rejected before Ray starts."""
import pytest
import yaml

from r1ray.controllers.config import Recipe, check_resources, load_recipe
from r1ray.controllers.config.schema import ConfigError

TINY = "configs/tiny-cpu.yaml"


def test_tiny_recipe_loads_and_overrides_apply():
    r = load_recipe(TINY, ["grpo.steps=7", "learner.loss.kl_coef=0", "generator.backend=vllm",
                           "learner.optim.betas=[0.9, 0.95]"])
    assert isinstance(r, Recipe)
    assert r.grpo.steps == 7 and r.learner.loss.kl_coef == 0.0 and r.generator.backend == "vllm"
    assert r.learner.optim.betas == (0.9, 0.95)
    assert r.rewards[0].name == "accuracy"
    # the resolved config round-trips through YAML into the same recipe
    again = load_recipe(None, [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip()}"
                               for k, v in r.to_dict().items()])
    assert again == r


def test_grpo_family_keys_load():
    r = load_recipe(TINY, ["learner.loss.loss_type=cispo", "learner.loss.clip_eps_high=5.0",
                           "learner.loss.importance_sampling_level=sequence", "learner.loss.num_iterations=2",
                           "learner.loss.kl_estimator=k2", "learner.loss.kl_in_reward=true",
                           "learner.loss.max_completion_length=64", "grpo.advantage_estimator=reinforce_pp",
                           "grpo.mask_truncated_completions=true", "learner.loss.entropy_coef=0.01"])
    lc = r.learner.loss
    assert (lc.loss_type, lc.clip_eps_high, lc.num_iterations, lc.kl_estimator) == ("cispo", 5.0, 2, "k2")
    assert r.grpo.advantage_estimator == "reinforce_pp" and r.grpo.mask_truncated_completions
    assert load_recipe(TINY).learner.loss.loss_type == "dapo"  # the shipped recipes say dapo
    assert load_recipe(TINY, ["learner.loss.loss_type=dr_grpo", "learner.loss.delta=2"]).learner.loss.delta == 2.0
    assert load_recipe(TINY, ["learner.loss.kl_max=10"]).learner.loss.kl_max == 10.0
    assert load_recipe(TINY).learner.loss.kl_max is None  # uncapped, as TRL


def test_recipe_by_shipped_name():
    assert load_recipe("tiny-cpu").sft.steps > 0


def test_code_is_shipped_to_joined_clusters_unless_turned_off():
    assert load_recipe(TINY).ray.ship_code is True
    assert load_recipe(TINY, ["ray.ship_code=false"]).ray.ship_code is False


@pytest.mark.parametrize("override, fragment", [
    (["grpo.stepz=3"], "'grpo.stepz' is not known"),
    (["learner.zero_stage=5"], "'learner.zero_stage': got 5; accepted: one of 0, 1, 2, 3"),
    (["grpo.steps=ten"], "'grpo.steps': got 'ten'; accepted: an integer"),
    (["grpo.steps=-1"], "'grpo.steps': got -1"),
    (["learner.loss.aggregation=token_mean"], "'learner.loss.aggregation' was replaced by learner.loss.loss_type"),
    (["learner.loss.loss_type=ppo"], "one of 'grpo', 'bnpo', 'dr_grpo', 'dapo', 'cispo', 'sapo'"),
    (["learner.loss.loss_type=cispo"], "accepted: a number >= 1, because for cispo"),
    (["learner.loss.delta=1.1"], "'learner.loss.delta': got 1.1"),
    (["learner.loss.loss_type=sapo", "learner.loss.delta=3"], "with loss_type 'sapo'"),
    (["learner.loss.num_iterations=0"], "'learner.loss.num_iterations': got 0"),
    (["learner.loss.num_iterations=2", "learner.loss.off_policy=tis"], "off_policy 'none'"),
    (["learner.loss.kl_estimator=k4"], "one of 'k1', 'k2', 'k3'"),
    (["learner.loss.kl_max=0"], "'learner.loss.kl_max': got 0; accepted: null (uncapped, as TRL) or a number > 0"),
    (["learner.loss.kl_in_reward=true", "learner.loss.kl_coef=0"], "'learner.loss.kl_in_reward': got True"),
    (["learner.loss.importance_sampling_level=seq"], "one of 'token', 'sequence'"),
    (["learner.loss.max_completion_length=10"], "null (meaning sampling.max_new_tokens=48)"),
    (["learner.loss.entropy_coef=-1"], "'learner.loss.entropy_coef': got -1"),
    (["learner.loss.sapo_temperature_neg=0"], "'learner.loss.sapo_temperature_neg': got 0"),
    (["grpo.advantage_estimator=ppo"], "one of 'grpo', 'rloo', 'reinforce_pp'"),
    (["generator.backend=sglang"], "one of 'hf', 'vllm'"),
    (["grpo.num_generations=1"], "'grpo.num_generations': got 1"),
    (["grpo.prompts_per_step=3", "grpo.num_generations=3"], "learner.num_ranks=2"),
    (["learner.num_ranks=4", "learner.cpus_per_rank=1", "ray.num_cpus=2"], "'learner.num_ranks': got 4 ranks"),
    (["sampling.top_p=1.5"], "'sampling.top_p'"),
    (["sampling.max_new_tokens=500"], "generator.max_model_len=128"),
    (["rewards=[{name: accuracy}, {name: acuracy}]"], "rewards[1]"),
    (["rewards=[{name: accuracy, wieght: 1}]"], "'rewards[0].wieght' is not known"),
    (["learner.optim.lr=true"], "'learner.optim.lr': got True; accepted: a number"),
    (["sft.batch_size=63"], "'sft.batch_size': got 63"),
    (["scorer.cpus_per_actor=2"], "CPUs in all"),
    (["grpo.max_staleness=-1"], "'grpo.max_staleness': got -1"),
    (["sft.stop_at_pass_rate=1.5"], "'sft.stop_at_pass_rate': got 1.5"),
    (["sft.probe_every=0"], "'sft.probe_every': got 0"),
    (["sampling.temperature=0.55"], "accepted: the value of sampling.temperature (0.55)"),
    (["learner.loss.off_policy=is"], "one of 'none', 'decoupled', 'tis'"),
    (["ray.ship_code=sometimes"], "'ray.ship_code': got 'sometimes'; accepted: true or false"),
    (["generator.max_actors=0"], "accepted: 1 <= min_actors <= num_actors <= max_actors"),
    (["generator.min_actors=2"], "'generator.min_actors' / 'generator.max_actors': got 2 / None with num_actors 1"),
    (["generator.max_num_seqs=0"], "'generator.max_num_seqs': got 0"),
    (["generator.max_num_seqs=64", "generator.max_num_batched_tokens=32"], "accepted: at least max_num_seqs"),
    (["learner.logits_dtype=bfloat16"], "one of 'model', 'float32'"),
    (["scorer.memory_mb=0"], "'scorer.memory_mb': got 0"),
    (["scorer.memory_mb=lots"], "'scorer.memory_mb': got 'lots'; accepted: an integer or one of 'auto' or null"),
])
def test_bad_configs_name_the_key_value_and_what_is_accepted(override, fragment):
    with pytest.raises(ConfigError) as e:
        load_recipe(TINY, override)
    assert fragment in str(e.value)


def test_vllm_generator_groups_may_be_elastic():
    r = load_recipe(TINY, ["generator.backend=vllm", "generator.max_actors=3"])
    assert (r.generator.num_actors, r.generator.max_actors) == (1, 3)


def test_gpu_recipe_validates_for_its_cluster_and_not_for_this_machine():
    r = load_recipe("configs/qwen2.5-1.5b-h100.yaml", cpus=128, gpus=8)
    assert r.generator.backend == "vllm" and r.learner.dtype == "bfloat16"
    # vLLM's H100 batch, not AsyncEngineArgs' 128 / 2048; generation streams past the train step
    assert (r.generator.max_num_seqs, r.generator.max_num_batched_tokens) == (1024, 16384)
    assert r.grpo.max_staleness == 1
    with pytest.raises(ConfigError, match="GPUs"):
        load_recipe("configs/qwen2.5-1.5b-h100.yaml", cpus=128, gpus=4)


def test_gpu_count_checked():
    r = load_recipe(TINY)
    r.learner.gpus_per_rank = 1.0
    with pytest.raises(ConfigError, match="GPUs"):
        check_resources(r, cpus=16, gpus=1)


def test_bad_yaml_and_missing_recipe(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("grpo: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_recipe(str(bad))
    with pytest.raises(ConfigError, match="tiny-cpu"):
        load_recipe("no-such-recipe")
    with pytest.raises(ConfigError, match="expected key.sub=value"):
        load_recipe(TINY, ["grpo.steps"])


def test_a_null_optional_section_stays_null():
    """``learner.lora: null`` (what config.yaml holds for a run without adapters) is no adapters,
    not an adapter config with defaults."""
    from r1ray.controllers.config import load_recipe

    assert load_recipe("configs/tiny-cpu.yaml", ["learner.lora=null"]).learner.lora is None
    assert load_recipe("configs/tiny-cpu.yaml").learner.lora is None


def test_a_stop_whose_keyboard_interrupt_was_swallowed_is_raised_again():
    """A signal's KeyboardInterrupt raised inside a finalizer is printed and lost; the drivers'
    loops call interrupt.check(), which raises it again."""
    import signal

    from r1ray.controllers.common import interrupt

    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        interrupt.install()
        interrupt.check()  # nothing asked yet
        try:
            signal.raise_signal(signal.SIGTERM)
        except KeyboardInterrupt:
            pass  # what "Exception ignored in __del__" amounts to
        with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
            interrupt.check()
    finally:
        interrupt.requested = None
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def _float_keys(cls, prefix=""):
    """Every key of the recipe schema whose type admits a float (optional ones too)."""
    import dataclasses
    import types
    import typing

    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, key = hints[f.name], f"{prefix}{f.name}"
        args = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
        for arg in args:
            if dataclasses.is_dataclass(arg):
                yield from _float_keys(arg, key + ".")
            elif arg is float:
                yield key


def test_every_float_key_refuses_nan_and_infinity():
    from r1ray.controllers.config import Recipe

    keys = sorted(set(_float_keys(Recipe)))
    assert len(keys) > 40 and "learner.optim.lr" in keys and "learner.loss.delta" in keys
    for key in keys:
        for bad in (".nan", ".inf", "-.inf", "1" + "0" * 400):
            with pytest.raises(ConfigError) as e:
                load_recipe(TINY, [f"{key}={bad}"])
            assert f"'{key}'" in str(e.value) and "finite" in str(e.value), (key, bad, str(e.value))
    with pytest.raises(ConfigError, match=r"'rewards\[0\].weight'.*finite"):
        load_recipe(TINY, ["rewards=[{name: accuracy, weight: .nan}]"])


def test_exponent_numbers_without_a_dot_are_numbers():
    """PyYAML reads ``2e-3`` (YAML 1.1 wants ``2.0e-3``) as a string: a number key takes it as the number."""
    assert load_recipe(TINY, ["learner.optim.lr=2e-3"]).learner.optim.lr == 0.002
    assert load_recipe(TINY, ["learner.optim.lr=1E+1"]).learner.optim.lr == 10.0
    for bad in ("e-3", "2e", "two"):
        with pytest.raises(ConfigError, match=r"'learner.optim.lr'.*a number"):
            load_recipe(TINY, [f"learner.optim.lr={bad}"])
    assert load_recipe(TINY, ["output_dir=1e5"]).output_dir.endswith("/1e5")  # a string key keeps the string
