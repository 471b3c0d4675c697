"""Each actor as a plain in-process class on the tiny model: the real engines, no Ray."""
import io
import math
import pickle
import time
import warnings

import numpy as np
import pytest
import torch
from tiny_actors import learner as _learner
from tiny_actors import prompt as _prompt

from r1ray.actors.batching import pad_batch
from r1ray.actors.generator import Generator, GeneratorConfig, SamplingConfig
from r1ray.actors.learner import GrpoStats, SftStats
from r1ray.actors.packing import SftExample
from r1ray.actors.reference import Reference
from r1ray.actors.rollout import Rollout, TokenIds, TrainSample
from r1ray.actors.scorer import RewardScorer, RewardSpec, ScorerConfig


def _scored(scorer, rollouts):
    """What RewardScorer.score sends back, written onto the rollouts: (the rollouts, the stats)."""
    result = scorer.score(rollouts)
    return result.apply(rollouts), result.stats


@pytest.fixture(scope="module")
def hf_generator(tiny_model):
    return Generator(tiny_model, GeneratorConfig(backend="hf"), seed=1)


def test_hf_generator_returns_complete_rollouts(hf_generator, tiny_model):
    prompts = [_prompt(tiny_model), _prompt(tiny_model, "111+222", "p1")]
    out = hf_generator.generate(prompts, 3, SamplingConfig(max_new_tokens=12))
    assert [r.sample_id for r in out] == ["p0/0", "p0/1", "p0/2", "p1/0", "p1/1", "p1/2"]
    # a group's rollouts share one copy of its prompt's tokens (pickled once a call)
    assert out[0].prompt_ids is out[1].prompt_ids is out[2].prompt_ids and out[2].prompt_ids is not out[3].prompt_ids
    assert out[0].prompt_ids == prompts[0]["prompt_ids"] and out[0].prompt_ids is not prompts[0]["prompt_ids"]
    for r in out:
        # its ids an int32 array (one buffer through the driver) that refuses +: a list's join
        # would be an element-wise sum; pickled, it stays one
        assert type(r.completion_ids) is TokenIds and r.completion_ids.dtype == np.int32
        assert type(pickle.loads(pickle.dumps(r)).completion_ids) is TokenIds
        with pytest.raises(TypeError, match="TokenIds"):
            r.prompt_ids + r.completion_ids
        assert 1 <= len(r.completion_ids) <= 12
        assert len(r.logprobs) == len(r.completion_ids) == len(r.versions)
        assert all(lp <= 0 for lp in r.logprobs) and r.version == 0
        assert r.finish_reason in {"stop", "length"}
        assert (r.finish_reason == "stop") == (r.completion_ids[-1] == hf_generator.eos_token_id)
        assert r.columns["solution"] == "\\boxed{975}"


def test_behaviour_logprobs_match_the_reference_model(hf_generator, tiny_model):
    rollouts = hf_generator.generate([_prompt(tiny_model)], 4, SamplingConfig(max_new_tokens=10, temperature=0.7))
    ref = Reference(tiny_model, temperature=0.7)
    ref_lp = ref.logprobs([TrainSample.of(r) for r in rollouts])
    for r, lp in zip(rollouts, ref_lp):
        assert lp == pytest.approx(r.logprobs, abs=1e-4)
        assert isinstance(lp, np.ndarray) and lp.dtype == np.float32  # one buffer through the driver


def test_scattering_float32_arrays_places_the_same_values_as_lists(tiny_model):
    """The learner lays the reference's arrays and the generator's lists out alike."""
    rollouts = [Rollout(f"p/{k}", "p", [1, 2, 3], [4] * (k + 2), [-0.25 * (j + 1) for j in range(k + 2)], [0] * (k + 2),
                        "stop") for k in range(3)]
    packed = pad_batch([r.prompt_ids for r in rollouts], [r.completion_ids for r in rollouts], 0)
    as_lists = packed.scatter([r.logprobs for r in rollouts])
    as_arrays = packed.scatter([np.asarray(r.logprobs, dtype=np.float32) for r in rollouts])
    assert torch.equal(as_lists, as_arrays) and packed.gather(as_arrays) == [r.logprobs for r in rollouts]
    # as Ray unpickles them from its object store: read-only, which torch warns of when it wraps one
    frozen = [pickle.loads(pickle.dumps(np.asarray(r.logprobs, dtype=np.float32), protocol=5)) for r in rollouts]
    for a in frozen:
        a.setflags(write=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(packed.scatter(frozen), as_lists)


def test_learner_step_moves_weights_and_generator_adopts_them(tiny_model, tmp_path):
    gen = Generator(tiny_model, GeneratorConfig(backend="hf"), seed=3)
    rollouts = gen.generate([_prompt(tiny_model)], 4, SamplingConfig(max_new_tokens=8))
    learner = _learner(tiny_model)
    learner.start_phase(lr=1e-2)
    before = {k: v.clone() for k, v in learner.engine.module.state_dict().items()}
    samples = [TrainSample(r.prompt_ids, r.completion_ids, r.logprobs, a) for r, a in zip(rollouts, [1.0, -1.0, 0.5, -0.5])]
    tokens = float(sum(len(r.completion_ids) for r in rollouts))
    stats = learner.grpo_step(samples, global_denom=tokens, global_tokens=tokens)
    assert stats.tokens == sum(len(r.completion_ids) for r in rollouts)
    metrics = GrpoStats.combine([stats])
    assert metrics["ratio/mean"] == pytest.approx(1.0, abs=1e-4)  # on-policy: ratio 1
    assert metrics["ratio/min"] <= 1.0 <= metrics["ratio/max"] and metrics["grad_norm"] > 0
    assert 0 < metrics["entropy/mean"] < math.log(learner.engine.module.config.vocab_size)
    after = learner.engine.module.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    blob = learner.export_weights()
    state = torch.load(io.BytesIO(blob), weights_only=True)
    assert all(torch.equal(state[k], after[k]) for k in state)
    gen.load_weights(blob, version=1)
    assert all(torch.equal(gen._engine.model.state_dict()[k], state[k]) for k in state)
    assert set(gen.generate([_prompt(tiny_model)], 1, SamplingConfig(max_new_tokens=4))[0].versions) == {1}
    path = learner.save_hf(str(tmp_path / "ckpt"))
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(path)
    assert all(torch.equal(reloaded.state_dict()[k], state[k]) for k in state if k in reloaded.state_dict())


def test_sft_step_lowers_the_loss(tiny_model):
    learner = _learner(tiny_model)
    learner.start_phase(lr=3e-3)
    p = _prompt(tiny_model)["prompt_ids"]
    example = SftExample.from_pair(p, [10, 11, 12, 13, 2])
    losses = [SftStats.combine([learner.sft_step([[example]] * 4, global_tokens=20)], 20)["loss"] for _ in range(5)]
    assert losses[-1] < losses[0]
    # the same examples packed two to a row: the same held-out loss as one to a row, no padding
    one, two = learner.sft_eval([[example]] * 4, 4), learner.sft_eval([[example, example]] * 2, 4)  # >= enough forwards
    assert two.nll_sum == pytest.approx(one.nll_sum, rel=1e-5) and two.slots == two.tokens == one.tokens


def test_scorer_scores_per_function_and_weights_them():
    scorer = RewardScorer([RewardSpec("accuracy", 1.0), RewardSpec("format", 0.5)], ScorerConfig(workers_per_actor=1))
    try:
        good = "<think>1+4+0=5</think><answer>\\boxed{975}</answer>"
        rollouts = [Rollout(f"p/{i}", "p", [1], [2], [0.0], [0], "stop", text=t, columns={"solution": "\\boxed{975}"})
                    for i, t in enumerate([good, "\\boxed{975}", "<think>x</think><answer>\\boxed{1}</answer>", "no"])]
        scored, stats = _scored(scorer, rollouts)
        assert [r.scores["accuracy"] for r in scored] == [1.0, 1.0, 0.0, 0.0]
        assert [r.scores["format"] for r in scored] == [1.0, 0.0, 1.0, 0.0]
        assert [r.reward for r in scored] == [1.5, 1.0, 0.5, 0.0]
        assert stats["accuracy/timeouts"] == 0 and stats["format/errors"] == 0
        assert scorer.score_one(rollouts[:2], "accuracy") == [1.0, 1.0]
    finally:
        scorer.close()


def test_partial_rollouts_continue_unfinished_sequences_with_new_weights(hf_generator, tiny_model):
    """Weights that arrive mid-request are adopted between chunks: later tokens carry the new
    version, earlier ones keep the old, and every token has its behaviour log-prob."""
    import threading

    state = {k: v.clone() for k, v in hf_generator._engine.model.state_dict().items()}
    buf = io.BytesIO()
    torch.save(state, buf)
    start_calls, out = hf_generator.calls, []
    worker = threading.Thread(target=lambda: out.extend(hf_generator.generate(
        [_prompt(tiny_model)], 2, SamplingConfig(max_new_tokens=40), greedy=True, chunk_tokens=1)))
    worker.start()
    while hf_generator.calls < start_calls + 3:  # two chunks done: the request is under way
        time.sleep(0.001)
    hf_generator.load_weights(buf.getvalue(), version=hf_generator.version + 1)
    worker.join()
    new = hf_generator.version
    assert any(len(r.completion_ids) > 3 for r in out)
    for r in out:
        assert len(r.versions) == len(r.completion_ids) == len(r.logprobs)
        assert r.versions == sorted(r.versions) and r.versions[0] == new - 1
        if len(r.completion_ids) > 3:
            assert r.versions[-1] == new  # continued under the new weights
