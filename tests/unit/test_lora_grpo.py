"""LoRA for GRPO on the real engines (tiny model, no Ray): the adapters-off reference, adapter-only
weight syncs into the hf generator, the rebase after an SFT warm-up, and the final checkpoint."""
import io
import sys
from pathlib import Path

import pytest
import torch
from tiny_actors import assert_learners_policy
from tiny_actors import learner as _learner
from tiny_actors import prompt as _prompt

from r1ray.actors.generator import Generator, GeneratorConfig, SamplingConfig
from r1ray.actors.lora import LoraConfig
from r1ray.actors.packing import SftExample
from r1ray.actors.reference import Reference
from r1ray.actors.rollout import TrainSample

LORA = LoraConfig(r=4, alpha=8, dropout=0.0)
GREEDY = SamplingConfig(max_new_tokens=12)


def _trained(tiny_model, steps: int = 3):
    """A LoRA learner after ``steps`` GRPO steps on its own samples (the adapters moved), its
    generator (synced: adapters only), and the samples."""
    gen = Generator(tiny_model, GeneratorConfig(backend="hf"), seed=3, lora=LORA)
    learner = _learner(tiny_model, lora=LORA)
    learner.start_phase(lr=3e-2)
    for version in range(1, steps + 1):
        rollouts = gen.generate([_prompt(tiny_model), _prompt(tiny_model, "12+34", "p1")], 4,
                                SamplingConfig(max_new_tokens=10))
        samples = [TrainSample(r.prompt_ids, r.completion_ids, r.logprobs, a)
                   for r, a in zip(rollouts, [1.0, -1.0, 0.5, -0.5] * 2)]
        tokens = float(sum(len(s.completion_ids) for s in samples))
        learner.grpo_step(samples, tokens, tokens)
        gen.load_weights(learner.export_weights(), version)
    return learner, gen, samples


@pytest.fixture(scope="module")
def trained(tiny_model):
    return _trained(tiny_model)


def _policy_logprobs(learner, samples):
    """The learner's own log-probs (adapters on) of ``samples``: its first iteration's, no step."""
    from r1ray.actors.batching import pad_batch, token_logprobs

    packed = pad_batch([s.prompt_ids for s in samples], [s.completion_ids for s in samples], learner.pad_id)
    with torch.no_grad():
        return packed.gather(token_logprobs(learner.engine, packed, learner.cfg.loss.temperature).cpu())


def _flat(rows: list[list[float]]) -> list[float]:
    return [x for row in rows for x in row]


def test_reference_with_adapters_off_equals_a_separate_base_model(trained, tiny_model):
    learner, _, samples = trained
    ref = Reference(tiny_model, temperature=learner.cfg.loss.temperature).logprobs(samples)
    off = learner.reference_logprobs(samples)
    on = _policy_logprobs(learner, samples)
    assert max(abs(a - b) for x, y in zip(on, ref) for a, b in zip(x, y)) > 1e-3  # the adapters matter
    for x, y in zip(off, ref):
        assert x == pytest.approx(y, abs=1e-6)
    assert _policy_logprobs(learner, samples) == on  # switched back on afterwards


def test_adapter_sync_carries_only_the_adapters_and_the_generator_matches_the_learner(trained, tiny_model):
    learner, gen, samples = trained
    state = torch.load(io.BytesIO(learner.export_weights()), weights_only=True)
    assert set(state) == {"adapter"} and all("lora_" in k for k in state["adapter"])
    adapter_bytes = sum(v.numel() * v.element_size() for v in state["adapter"].values())
    full_bytes = sum(p.numel() * p.element_size() for p in learner.engine.module.get_base_model().parameters())
    assert adapter_bytes < 0.25 * full_bytes  # r=4 on a tiny model; benchmarks/weight_sync.py has the 500M rows
    # greedy: the generator's tokens and log-probs are the learner's policy's
    assert learner.cfg.loss.temperature == 1.0  # the generator's greedy log-probs are at temperature 1
    assert_learners_policy(learner, gen.generate([_prompt(tiny_model)], 1, GREEDY, greedy=True), 3, abs_tol=1e-4)
    # a generator without the learner's adapters refuses the sync instead of changing nothing
    plain = Generator(tiny_model, GeneratorConfig(backend="hf"), seed=3, lora=LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="learner.lora"):
        plain.load_weights(learner.export_weights(), 9)


def test_rebase_keeps_the_policy_moves_the_reference_and_reaches_generator_and_reference(tiny_model, tmp_path):
    learner, gen, samples = _trained(tiny_model, steps=2)
    before = _policy_logprobs(learner, samples)
    learner.save_hf(str(tmp_path / "sft"))  # as the warm-up does: checkpoint-sft, then the rebase
    learner.rebase_adapters()
    assert _flat(_policy_logprobs(learner, samples)) == pytest.approx(_flat(before), abs=1e-5)
    assert all(not v.any() for k, v in learner.engine.module.state_dict().items() if "lora_B" in k)
    merged = Reference(str(tmp_path / "sft"), temperature=learner.cfg.loss.temperature).logprobs(samples)
    for x, y in zip(learner.reference_logprobs(samples), merged):  # adapters off = the warmed-up model
        assert x == pytest.approx(y, abs=1e-6)
    blob = learner.export_weights()
    assert set(torch.load(io.BytesIO(blob), weights_only=True)) == {"adapter", "base"}
    assert set(torch.load(io.BytesIO(learner.export_weights()), weights_only=True)) == {"adapter"}  # once
    gen.load_weights(blob, 10)
    out = gen.generate([_prompt(tiny_model)], 1, GREEDY, greedy=True)[0]
    lp = _policy_logprobs(learner, [TrainSample(out.prompt_ids, out.completion_ids)])[0]
    assert lp == pytest.approx(out.logprobs, abs=1e-4)
    ref = Reference(tiny_model, temperature=learner.cfg.loss.temperature)
    ref.load_weights(blob)  # re-anchored to the rebased base (= the policy: B is zero)
    for x, y in zip(ref.logprobs(samples), merged):
        assert x == pytest.approx(y, abs=1e-6)
    # the optimizer goes on from the zeroed B (ZeRO-2 keeps fp32 copies: they were zeroed too)
    learner.start_phase(lr=3e-2)
    tokens = float(sum(len(s.completion_ids) for s in samples))
    learner.grpo_step(samples, tokens, tokens)
    b = [v for k, v in learner.engine.module.state_dict().items() if "lora_B" in k]
    assert max(float(v.abs().max()) for v in b) < 0.1  # one step from zero, not back at the trained B


def test_trained_reference_refuses_adapters_that_are_not_zero(trained, tiny_model):
    learner, _, _ = trained
    learner._base_changed = True  # a base export while B is not zero (never sent to a reference)
    with pytest.raises(ValueError, match="zero adapters"):
        Reference(tiny_model).load_weights(learner.export_weights())


def test_final_checkpoint_is_merged_and_keeps_the_adapter(trained, tiny_model, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    learner, _, _ = trained
    path = tmp_path / "checkpoint-final"
    learner.save_hf(str(path), adapter_base=tiny_model)
    merged = AutoModelForCausalLM.from_pretrained(path)
    assert not any("lora" in k for k in merged.state_dict())
    again = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), path / "adapter")
    assert again.peft_config["default"].base_model_name_or_path == tiny_model
    ids = torch.tensor([SftExample.from_pair([5, 6, 7, 8], [10, 11, 2]).ids])
    module = learner.engine.module
    module.eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, module(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(again(input_ids=ids).logits, module(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_reference_work_on_the_learners_waits_behind_the_train_step_without_a_short_deadline():
    """LoRA's reference log-probs run on the learner ranks after the train step queued there (and
    the checkpoint it may save): their deadline starts from the train step's and is a first
    call's, not the few seconds per sample the last reference call took."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from simfleet import Ref, SimTransport

    from r1ray.cluster import transport
    from r1ray.cluster.groups import Watchdog
    from r1ray.controllers.common.inflight import InFlight, Work
    from r1ray.controllers.config.recipe import RayConfig

    rc = RayConfig()
    with transport.use(SimTransport()):  # (refs that never finish: only the deadlines matter here)
        inflight = InFlight(Watchdog([]), rc, 4, lambda n: 1.0)
        inflight.rates["reference"] = 0.001  # what an earlier reference call on idle learners took
        train = inflight.submit(Work("train", [Ref()], who=["learner-rank-0"], queue="learner"))
        ref = inflight.submit(Work("reference", [Ref()], [object()], who=["learner-rank-0"], queue="learner"))
        assert ref.deadline >= train.deadline + rc.call_timeout_s - 1e-6
        # the reference actor's calls keep their own queue and the measured budget
        actor = inflight.submit(Work("reference", [Ref()], [object()], actor=0, who=["reference-0"]))
        assert actor.deadline - actor.started == pytest.approx(rc.deadline_min_s)
        later = inflight.submit(Work("train", [Ref()], who=["learner-rank-0"], queue="learner"))
        assert later.deadline >= ref.deadline  # a train step queued behind the reference call
