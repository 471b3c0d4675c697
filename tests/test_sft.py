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

    from r1ray.controllers.config import DataConfig
    from r1ray.controllers.common.data import PromptRenderer

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


# -- r1ray sft: bad data is refused before anything starts -----------------------------------------
def _sft_cli(*args, env_extra=None):
    import os
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "r1ray.controllers.cli", "sft", *args], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "DS_ACCELERATOR": "cpu", **(env_extra or {})})


def _write_jsonl(path, rows):
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


GOOD = {"messages": [{"role": "user", "content": "1+1"}, {"role": "assistant", "content": "2"}]}


@pytest.mark.parametrize("rows,match", [
    ([GOOD, {"text": "no messages"}], None),  # a missing column: named with the columns there are
    ([GOOD, {"messages": [{"role": "user", "content": "1+1"}, {"role": "user", "content": "and?"}]}],
     r"split 'train' \(data.train_split\) row 1, column 'messages' \(data.messages_column\): the last message's "
     r"role is 'user', not 'assistant'"),
    ([GOOD, {"messages": []}], r"row 1, column 'messages'.*not a non-empty list"),
])
def test_bad_conversations_are_refused_naming_the_row_and_column(tmp_path, tiny_world, rows, match):
    data = tmp_path / "data"
    data.mkdir()
    if match is None:  # one file without the column at all
        _write_jsonl(data / "train.jsonl", [{"text": "a"}, {"text": "b"}])
        match = r"config key 'data.messages_column': got 'messages'; accepted: a column of split 'train'.*it has: text"
    else:
        _write_jsonl(data / "train.jsonl", rows)
    out = tmp_path / "run"
    proc = _sft_cli("configs/tiny-cpu.yaml", "--output-dir", str(out), "--set", f"data.path={data}",
                    "--set", f"model.tiny_dir={tiny_world}", "--set", "sft.steps=2")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert __import__("re").search(match, proc.stderr), proc.stderr[-2000:]
    assert not out.exists()  # refused before the run directory was made


def test_an_empty_split_is_refused(tmp_path, tiny_world):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("")
    proc = _sft_cli("configs/tiny-cpu.yaml", "--output-dir", str(tmp_path / "run"), "--set", f"data.path={data}",
                    "--set", f"model.tiny_dir={tiny_world}", "--set", "sft.steps=2")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "config key 'data.train_split': split 'train'" in proc.stderr and "has no rows" in proc.stderr


# -- r1ray sft end to end: packing, held-out loss, HF checkpoints, an interrupted run resumed -------
def _sft_cmd(out, tiny_world, *extra):
    import sys

    return [sys.executable, "-m", "r1ray.controllers.cli", "sft", "configs/tiny-cpu.yaml", "--output-dir", str(out),
            "--set", f"model.tiny_dir={tiny_world}", "--set", "ray.dashboard=false", "--set", "sft.steps=12",
            "--set", "sft.batch_size=32", "--set", "sft.packing=true", "--set", "sft.max_seq_length=256",
            "--set", "sft.schedule=cosine", "--set", "sft.warmup_steps=2", "--set", "sft.min_lr_ratio=0.1",
            "--set", "sft.eval_every=6", "--set", "sft.eval_examples=32", "--set", "checkpoint.every_steps=3",
            "--set", "checkpoint.keep_last=2", *extra]


def _records(out):
    import json

    return [json.loads(line) for line in (out / "sft_metrics.jsonl").read_text().splitlines()]


@pytest.mark.timeout(900)
def test_an_interrupted_sft_run_resumes_to_the_same_final_loss(tmp_path, tiny_world):
    import json
    import os
    import signal
    import subprocess
    import time

    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    whole = tmp_path / "whole"
    proc = subprocess.run(_sft_cmd(whole, tiny_world), capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    want = _records(whole)
    assert [r["step"] for r in want] == list(range(1, 13))
    assert [r["step"] for r in want if "eval_loss" in r] == [6, 12]
    assert want[-1]["loss"] < want[0]["loss"] and want[-1]["eval_loss"] < want[5]["eval_loss"]
    assert all(0 <= r["padding_waste"] < 0.5 and r["rows"] < 32 for r in want)  # 32 conversations, packed
    assert want[1]["lr"] == pytest.approx(1e-3) and want[-1]["lr"] == pytest.approx(1e-4, rel=0.05)  # cosine to 0.1
    summary = json.loads((whole / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps_done"] == 12
    assert summary["truncated"] == {"examples": 0, "tokens_lost": 0, "dropped_rows": 0}
    assert summary["tokens_per_s"] > 0 and summary["final_eval_loss"] == want[-1]["eval_loss"]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for ckpt in [whole / "checkpoint-sft", whole / "checkpoints" / "step-000009" / "hf"]:
        AutoModelForCausalLM.from_pretrained(ckpt)
        AutoTokenizer.from_pretrained(ckpt)
    assert [p.name for p in sorted((whole / "checkpoints").glob("step-*"))] == ["step-000006", "step-000009"]

    cut = tmp_path / "cut"
    proc = subprocess.Popen(_sft_cmd(cut, tiny_world), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=env)
    t0 = time.monotonic()
    while not ((cut / "sft_metrics.jsonl").exists() and len((cut / "sft_metrics.jsonl").read_text().splitlines()) >= 5):
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() - t0 < 300, "the run never reached step 5"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)  # no clean-up at all
    proc.wait()
    written = len(_records(cut))
    assert 5 <= written < 12
    proc = subprocess.run(_sft_cmd(cut, tiny_world, "--resume", "auto"), capture_output=True, text=True, timeout=600,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((cut / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["resumed_from_step"] in (3, 6, 9)
    got = _records(cut)
    assert [r["step"] for r in got] == list(range(1, 13))  # the records after the checkpoint were redone once
    for a, b in zip(got, want):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), a["step"]
        assert a.get("eval_loss") == pytest.approx(b.get("eval_loss"), rel=1e-5) if "eval_loss" in b else True


def test_the_gpu_sft_and_grpo_recipes_are_valid_for_one_8_gpu_node():
    from r1ray.controllers.config import load_recipe
    from r1ray.controllers.stages import plan
    from r1ray.controllers.common.system import SFT, placement_plan

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

    from r1ray.actors.learner import LearnerConfig, LearnerRank, LoraConfig, SftStats
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


def test_lora_is_an_sft_option_checked_up_front():
    from r1ray.controllers.config import load_recipe
    from r1ray.controllers.config.schema import ConfigError

    assert load_recipe("tiny-cpu", ["learner.lora={r: 4}"], stage="sft").learner.lora.r == 4
    with pytest.raises(ConfigError, match=r"learner.lora.*r1ray sft"):
        load_recipe("tiny-cpu", ["learner.lora={r: 4}"])  # GRPO updates every weight
    with pytest.raises(ConfigError, match=r"learner.lora.*zero_stage 3"):
        load_recipe("tiny-cpu", ["learner.lora={r: 4}", "learner.zero_stage=3"], stage="sft")
    with pytest.raises(ConfigError, match=r"learner.lora.r"):
        load_recipe("tiny-cpu", ["learner.lora={r: 0}"], stage="sft")
