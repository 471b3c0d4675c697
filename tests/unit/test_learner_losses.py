"""A short GRPO step per loss type through the real learner (DeepSpeed, world of one, tiny model)."""
import math
from pathlib import Path

import pytest
import torch
from tiny_actors import learner as _learner
from tiny_actors import prompt as _prompt

from r1ray.actors.advantages import batch_advantages
from r1ray.actors.generator import Generator, GeneratorConfig, SamplingConfig
from r1ray.actors.learner import GrpoStats
from r1ray.actors.loss import LossConfig, global_denominator
from r1ray.actors.rollout import TrainSample


@pytest.fixture(scope="module")
def rollouts(tiny_model):
    gen = Generator(tiny_model, GeneratorConfig(backend="hf"), seed=5)
    return gen.generate([_prompt(tiny_model)], 4, SamplingConfig(max_new_tokens=8))


@pytest.fixture(scope="module")
def learner(tiny_model):
    learner = _learner(tiny_model)
    learner.start_phase(lr=1e-2)
    return learner


CASES = {
    "grpo": LossConfig(loss_type="grpo", importance_sampling_level="sequence"),
    "bnpo": LossConfig(loss_type="bnpo", entropy_coef=0.01),
    "dr_grpo": LossConfig(loss_type="dr_grpo", delta=2.0),
    "dapo": LossConfig(loss_type="dapo", num_iterations=2),
    "cispo": LossConfig(loss_type="cispo", clip_eps_high=5.0),
    "sapo": LossConfig(loss_type="sapo"),
}


@pytest.mark.parametrize("loss_type", list(CASES))
def test_one_step_per_loss_type_moves_the_weights(learner, rollouts, loss_type):
    learner.cfg.loss = CASES[loss_type]  # the learner reads its loss config at every step
    per_token = loss_type == "dapo"  # REINFORCE++'s per-token advantages through the learner too
    adv = batch_advantages([1.0, 0.0, 0.5, 0.0], 4, "reinforce_pp" if per_token else "grpo",
                           lengths=[len(r.completion_ids) for r in rollouts])
    samples = [TrainSample(r.prompt_ids, r.completion_ids, r.logprobs, a, in_loss=k != 3)
               for k, (r, a) in enumerate(zip(rollouts, adv))]  # the last one masked (a truncated completion)
    lengths = [len(s.completion_ids) if s.in_loss else 0 for s in samples]
    before = {k: v.clone() for k, v in learner.engine.module.state_dict().items()}
    stats = learner.grpo_step(samples, global_denominator(loss_type, lengths, 8, 2), float(sum(lengths)))
    metrics = GrpoStats.combine([stats])
    assert stats.tokens == sum(lengths) * CASES[loss_type].num_iterations
    assert math.isfinite(metrics["loss"]) and metrics["grad_norm"] > 0 and metrics["entropy/mean"] > 0
    after = learner.engine.module.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    if loss_type == "dapo":  # iteration 2 measured its ratio against iteration 1's weights: no longer 1
        assert metrics["ratio/max"] > 1.0 + 1e-4 or metrics["ratio/min"] < 1.0 - 1e-4


def test_a_skipped_import_fails_inside_and_imports_again_after():
    """``skipped_imports``: a module not imported yet fails to import inside (as if not installed)
    and imports again afterwards; one already imported is left alone."""
    import sys

    from r1ray.actors.learner import skipped_imports

    name = "pydoc_data.topics"  # a standard-library module nothing here imports
    sys.modules.pop(name, None)
    with skipped_imports(name, "json"):
        with pytest.raises(ImportError):
            __import__(name)
        import json
        assert json.dumps([1]) == "[1]"
    assert __import__(name, fromlist=["topics"]).topics


def test_a_function_compiled_on_first_call_is_compiled_then_and_not_when_decorated():
    """``compiled_on_first_call`` (DeepSpeed's Muon kernels): decorating inside compiles nothing;
    the first call compiles once with the decorator's arguments and gives the function's result;
    the compiler's ``compile`` is its own again outside."""
    import types

    from r1ray.actors.learner import compiled_on_first_call

    made = []

    def compile(**kwargs):  # what deepspeed.runtime.compiler.compile() gives: torch.compile
        def wrap(fn):
            made.append((fn.__name__, kwargs))
            return torch.compile(fn, backend="eager", **kwargs)
        return wrap

    compiler = types.SimpleNamespace(compile=compile)
    with compiled_on_first_call(compiler):
        @compiler.compile(dynamic=False)
        def double(x):
            return 2 * x
    assert compiler.compile is compile and made == [] and double.__name__ == "double"
    assert torch.equal(double(torch.ones(3)), torch.full((3,), 2.0))
    assert torch.equal(double(torch.arange(3.0)), torch.tensor([0.0, 2.0, 4.0]))
    assert made == [("double", {"dynamic": False})]


def test_an_op_build_removes_a_stale_lock_while_holding_the_os_lock(tmp_path, monkeypatch, caplog):
    """``builds_past_stale_locks``: inside, a JIT build of an op finds torch's ``lock`` file gone
    (a killed build's, logged by name) and runs holding an flock on the op's folder that a second
    builder cannot take meanwhile; a folder without a lock builds untouched; outside,
    ``jit_load`` is DeepSpeed's own again."""
    import fcntl

    from torch.utils.cpp_extension import _get_build_directory

    from r1ray.actors.learner import builds_past_stale_locks

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    seen = []

    class Builder:  # the shape of DeepSpeed's OpBuilder: a name, and jit_load building it
        name = "some_op"

        def jit_load(self, verbose=True):
            folder = Path(_get_build_directory(self.name, verbose=False))
            with open(folder / "r1ray-build.flock") as other, pytest.raises(BlockingIOError):
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held by the build
            seen.append((folder / "lock").exists())
            return f"{self.name} loaded"

    own = Builder.jit_load
    stale = Path(_get_build_directory("some_op", verbose=False)) / "lock"
    stale.touch()
    with caplog.at_level("WARNING", logger="r1ray"), builds_past_stale_locks(Builder):
        assert Builder().jit_load() == "some_op loaded"
        assert Builder().jit_load(verbose=False) == "some_op loaded"  # no lock now: nothing removed
    assert seen == [False, False] and Builder.jit_load is own
    assert [r.getMessage() for r in caplog.records] == [
        f"removing {stale}, left by a build of DeepSpeed's some_op op that was stopped part-way "
        "(torch waits for it to go, without limit)"]


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_setup_reports_the_models_whole_parameter_count(tiny_model, zero_stage):
    """What `actors up` logs: the plain model's count, also under ZeRO-3, whose partitioned
    parameters are empty placeholders on the rank (it logged 0 before)."""
    from transformers import AutoModelForCausalLM

    from r1ray.actors.learner import LearnerConfig, LearnerRank
    from r1ray.cluster.groups import free_port

    plain = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_model).parameters())
    rank = LearnerRank(tiny_model, LearnerConfig(num_ranks=1, zero_stage=zero_stage, micro_batch_size=2), rank=0,
                       world_size=1)
    assert rank.setup("127.0.0.1", free_port())["params"] == plain
