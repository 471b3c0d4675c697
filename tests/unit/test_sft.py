"""SFT data and packing without Ray: assistant-only masks, truncation, packed = unpacked."""
import pytest
import torch

from r1ray.actors.batching import token_logprobs
from r1ray.actors.packing import SftExample, pack_bins, sft_batch
from r1ray.controllers.common.chat import TemplateError, render_conversation
from r1ray.controllers.sft.data import Truncation, truncate

CONVERSATION = [
    {"role": "user", "content": "1+1"},
    {"role": "assistant", "content": "<think>1+1=2</think><answer>\\boxed{2}</answer>"},
    {"role": "user", "content": "and 2+2?"},
    {"role": "assistant", "content": "\\boxed{4}"},
]


@pytest.fixture(scope="module")
def tokenizer(tiny_world):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_world / "model")


def _trained_text(tok, e: SftExample) -> str:
    return tok.decode([i for i, t in zip(e.ids, e.trained) if t])


def test_only_assistant_turns_are_trained_in_a_multi_turn_conversation(tokenizer):
    e = render_conversation(tokenizer, CONVERSATION, system_prompt="be brief")
    assert _trained_text(tokenizer, e) == ("<think>1+1=2</think><answer>\\boxed{2}</answer><|im_end|>"
                                           "\\boxed{4}<|im_end|>")
    text = tokenizer.decode(e.ids)
    assert text.startswith("<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\n1+1")
    # every trained span is one assistant turn and ends with the end-of-turn token
    spans, current = [], []
    for i, t in zip(e.ids, e.trained):
        if t:
            current.append(i)
        elif current:
            spans.append(current)
            current = []
    spans.append(current)
    assert len(spans) == 2 and all(s[-1] == tokenizer.eos_token_id for s in spans)
    # the conversation's own system turn wins over the recipe's
    own = render_conversation(tokenizer, [{"role": "system", "content": "mine"}] + CONVERSATION, system_prompt="x")
    assert "mine" in tokenizer.decode(own.ids) and "x<|im_end|>" not in tokenizer.decode(own.ids)


def test_the_tiny_warm_up_trains_on_exactly_what_it_did_before(tokenizer, tiny_world):
    import datasets

    from r1ray.controllers.common.data import PromptRenderer
    from r1ray.controllers.config import DataConfig

    row = datasets.load_from_disk(str(tiny_world / "data"))["train"][0]
    # what the warm-up trained on before conversations were rendered whole: the templated prompt,
    # then the answer's tokens and the end-of-turn token
    prompt = tokenizer.apply_chat_template(row["messages"][:-1], add_generation_prompt=True, tokenize=True,
                                           return_dict=False)
    completion = tokenizer(row["messages"][-1]["content"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert PromptRenderer(tokenizer, DataConfig()).sft_example(row) == SftExample.from_pair(prompt, completion)


def test_conversations_without_an_answer_or_with_an_unstable_template_are_refused(tokenizer):
    with pytest.raises(ValueError, match="no assistant turn"):
        render_conversation(tokenizer, [{"role": "user", "content": "hi"}])

    class Unstable:  # a template that numbers the turns from the end: prefixes render differently
        eos_token_id = tokenizer.eos_token_id

        def apply_chat_template(self, msgs, add_generation_prompt=False, **kwargs):
            return [len(msgs)] + [7] * (3 * len(msgs)) + ([9] if add_generation_prompt else [])

    with pytest.raises(TemplateError, match="prefix-stable"):
        render_conversation(Unstable(), CONVERSATION)


def test_truncation_is_counted_and_an_example_with_nothing_left_is_dropped():
    counts = Truncation()
    e = SftExample(list(range(10)), [0] * 4 + [1] * 6)
    assert truncate(e, 12, 0, counts) is e
    cut = truncate(e, 7, 1, counts)
    assert cut.ids == list(range(7)) and cut.targets == 3
    assert truncate(e, 4, 2, counts) is None
    assert (counts.examples, counts.tokens_lost, counts.dropped) == (2, 3 + 6, [2])


def test_best_fit_decreasing_packing():
    rows = pack_bins([5, 3, 8, 2, 4, 7], capacity=10)
    assert sorted(sum([5, 3, 8, 2, 4, 7][i] for i in r) for r in rows) == [9, 10, 10]
    assert sorted(i for r in rows for i in r) == list(range(6)) and all(r == sorted(r) for r in rows)
    with pytest.raises(ValueError, match="example 1 has 11 tokens"):
        pack_bins([3, 11], capacity=10)


def test_a_packed_batch_gives_the_loss_and_gradients_of_the_same_examples_unpacked(tiny_model):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    lengths = [(5, 9), (3, 4), (7, 12), (4, 6), (6, 3)]
    examples = [SftExample.from_pair(torch.randint(3, 250, (p,)).tolist(), torch.randint(3, 250, (c,)).tolist())
                for p, c in lengths]
    targets = sum(e.targets for e in examples)

    def loss_and_grads(rows):
        model.zero_grad()
        batch = sft_batch(rows, pad_id=0)
        nll = -(token_logprobs(model, batch) * batch.completion_mask).sum() / targets
        nll.backward()
        return nll.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    unpacked_loss, unpacked_grads = loss_and_grads([[e] for e in examples])
    bins = pack_bins([len(e.ids) for e in examples], capacity=32)
    assert len(bins) < len(examples)  # several examples share a row
    packed = sft_batch([[examples[i] for i in b] for b in bins], pad_id=0)
    assert packed.attention_mask is None and packed.position_ids is not None
    assert int(packed.completion_mask.sum()) == targets  # no target crosses an example boundary
    packed_loss, packed_grads = loss_and_grads([[examples[i] for i in b] for b in bins])
    assert packed_loss == pytest.approx(float(unpacked_loss), rel=1e-5)
    assert packed_grads.keys() == unpacked_grads.keys()
    for name, g in unpacked_grads.items():
        torch.testing.assert_close(packed_grads[name], g, rtol=1e-4, atol=1e-6, msg=name)
    # the check can fail: one row without the position-id restart mixes the examples
    leaky = sft_batch([[examples[i] for i in b] for b in bins], pad_id=0)
    leaky.position_ids = torch.arange(leaky.input_ids.shape[1]).expand_as(leaky.input_ids).clone()
    model.zero_grad()
    leaked = -(token_logprobs(model, leaky) * leaky.completion_mask).sum() / targets
    assert float(leaked.detach()) != pytest.approx(float(unpacked_loss), rel=1e-3)


def test_learning_rate_schedules():
    from r1ray.actors.learner import lr_factor

    assert [lr_factor(s, 2, "constant", 10, 0.0) for s in (0, 1, 2, 9)] == [0.5, 1.0, 1.0, 1.0]
    assert lr_factor(2, 2, "cosine", 10, 0.1) == pytest.approx(1.0)
    assert lr_factor(6, 2, "cosine", 10, 0.1) == pytest.approx(0.1 + 0.9 * 0.5)  # half way: the midpoint
    assert lr_factor(10, 2, "cosine", 10, 0.1) == pytest.approx(0.1)
    assert lr_factor(6, 2, "linear", 10, 0.0) == pytest.approx(0.5)
    assert lr_factor(50, 0, "linear", 10, 0.2) == pytest.approx(0.2)  # past the end: the floor


def test_the_gpu_sft_and_grpo_recipes_are_valid_for_one_8_gpu_node():
    from r1ray.controllers.common.system import SFT, placement_plan
    from r1ray.controllers.config import load_recipe
    from r1ray.controllers.stages import plan

    sft = load_recipe("configs/qwen2.5-1.5b-sft-h100.yaml", cpus=128, gpus=8)
    assert (sft.sft.lr, sft.sft.epochs, sft.sft.packing, sft.sft.max_seq_length) == (2e-5, 1, True, 4096)
    assert sft.learner.zero_stage == 3 and sft.learner.dtype == "bfloat16" and sft.learner.gradient_checkpointing
    assert sum(p.total().get("GPU", 0) for p in placement_plan(sft, SFT)) == 8  # learners only
    grpo = load_recipe("configs/qwen2.5-math-7b-grpo-h100.yaml", cpus=128, gpus=8)
    assert grpo.model.path == "Qwen/Qwen2.5-Math-7B" and grpo.learner.optim.lr == 1.5e-6
    assert [(r.name, r.weight) for r in grpo.rewards] == [("accuracy", 1.0), ("format", 0.5)]
    assert sum(p.total().get("GPU", 0) for p in placement_plan(grpo)) == 8
    stages = plan("openr1-staged-h100", output_dir="/tmp/x", cpus=128, gpus=8)
    assert [s.type for s in stages] == ["distill", "sft", "grpo", "eval"]
    assert stages[0].recipe.distill.serve.tensor_parallel_size == 2
    assert stages[1].recipe.data.path == "/tmp/x/distill/dataset"
    assert stages[2].recipe.model.path == "/tmp/x/sft/checkpoint-sft"


def test_lora_trains_only_the_adapters_and_exports_them_merged(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    from r1ray.actors.learner import LearnerConfig, LearnerRank, SftStats
    from r1ray.actors.lora import LoraConfig
    from r1ray.cluster.groups import free_port

    learner = LearnerRank(tiny_model, LearnerConfig(num_ranks=1, zero_stage=2, micro_batch_size=4,
                                                    lora=LoraConfig(r=4, alpha=8, dropout=0.0)), rank=0, world_size=1)
    learner.setup("127.0.0.1", free_port())
    learner.start_phase(lr=1e-2)
    module = learner.engine.module
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    example = SftExample.from_pair([5, 6, 7, 8], [10, 11, 12, 13, 2])
    losses = [SftStats.combine([learner.sft_step([[example]] * 4, global_tokens=20)], 20)["loss"] for _ in range(4)]
    assert losses[-1] < losses[0]
    learner.save_hf(str(tmp_path / "merged"))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any("lora" in k for k in merged.state_dict())
    ids = torch.tensor([example.ids])
    module.eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, module(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
    assert {n for n, p in module.named_parameters() if p.requires_grad} == trainable  # still training adapters


def test_lora_is_checked_up_front():
    from r1ray.controllers.config import load_recipe
    from r1ray.controllers.config.schema import ConfigError

    assert load_recipe("tiny-cpu", ["learner.lora={r: 4}"], stage="sft").learner.lora.r == 4
    recipe = load_recipe("tiny-cpu", ["learner.lora={r: 4}"])  # GRPO: the reference is the learner, adapters off
    assert recipe.reference_on_learner and not recipe.reference_actor
    recipe = load_recipe("tiny-cpu", ["learner.lora={r: 4}", "reference.adapters_off=false"])
    assert recipe.reference_actor and not recipe.reference_on_learner
    assert not load_recipe("tiny-cpu", ["learner.lora={r: 4}", "learner.loss.kl_coef=0"]).reference_on_learner
    with pytest.raises(ConfigError, match=r"reference.adapters_off.*learner.lora null"):
        load_recipe("tiny-cpu", ["reference.adapters_off=true"])
    assert load_recipe("tiny-cpu", ["learner.lora={r: 4}", "generator.backend=vllm", "sft.steps=0"]).learner.lora
    with pytest.raises(ConfigError, match=r"sft.steps.*r1ray sft stage"):
        load_recipe("tiny-cpu", ["learner.lora={r: 4}", "generator.backend=vllm"])
    with pytest.raises(ConfigError, match=r"learner.lora.r.*up to 512"):
        load_recipe("tiny-cpu", ["learner.lora={r: 1024}", "generator.backend=vllm", "sft.steps=0"])
    with pytest.raises(ConfigError, match=r"learner.lora.*zero_stage 3"):
        load_recipe("tiny-cpu", ["learner.lora={r: 4}", "learner.zero_stage=3"], stage="sft")
    with pytest.raises(ConfigError, match=r"learner.lora.r"):
        load_recipe("tiny-cpu", ["learner.lora={r: 0}"], stage="sft")
