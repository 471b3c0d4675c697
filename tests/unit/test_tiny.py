"""The tiny offline world: model, tokenizer and dataset load through the normal HF code paths."""
import re

from datasets import load_from_disk
from transformers import AutoModelForCausalLM, AutoTokenizer

from r1ray.controllers.common.tiny import TinySpec, build_tiny_world, make_example


def test_example_is_reversed_addition_with_trace():
    ex = make_example(123, 989, 3)  # 123 + 989 = 1112, written least significant digit first
    assert ex["problem"] == "321+989"
    assert ex["answer"] == "2111" and ex["solution"] == "\\boxed{2111}"
    trace = ex["messages"][-1]["content"]
    assert trace == "<think>3+9+0=12 2+8+1=11 1+9+1=11</think><answer>\\boxed{2111}</answer>"


def test_world_loads_with_auto_classes(tiny_world):
    tok = AutoTokenizer.from_pretrained(tiny_world / "model")
    model = AutoModelForCausalLM.from_pretrained(tiny_world / "model")
    assert model.config.model_type == "qwen2" and model.config.num_hidden_layers == TinySpec().num_layers
    text = "<think>1+4+0=5 2+6+0=8</think><answer>\\boxed{58}</answer>"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text  # spaces and tags survive the round trip
    assert tok.convert_ids_to_tokens(ids)[0] == "<think>"  # tags are single tokens
    prompt = tok.apply_chat_template([{"role": "user", "content": "12+34"}], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
    data = load_from_disk(str(tiny_world / "data"))
    assert set(data) == {"train", "test"}
    assert {"problem", "solution", "messages"} <= set(data["train"].column_names)
    train_problems = set(data["train"]["problem"])
    assert not train_problems & set(data["test"]["problem"])  # held-out really is held out
    row = data["test"][0]
    a, b = (int(x[::-1]) for x in row["problem"].split("+"))
    assert re.fullmatch(r"\\boxed\{(\d+)\}", row["solution"]).group(1)[::-1].lstrip("0") == str(a + b).lstrip("0") or a + b == 0


def test_build_is_idempotent(tiny_world):
    stamp = (tiny_world / "model" / "model.safetensors").stat().st_mtime
    build_tiny_world(tiny_world)
    assert (tiny_world / "model" / "model.safetensors").stat().st_mtime == stamp


def test_the_tools_world_mixes_calls_and_its_sft_tool_turn_is_the_episodes_own():
    """SFT on a tool-calling trace sees the tool turn as exactly the tokens an episode appends
    (so the warm-up teaches the context GRPO's episodes produce), untrained."""
    from r1ray.actors.episodes import tool_turn_template
    from r1ray.controllers.common.chat import render_conversation
    from r1ray.controllers.common.tiny import build_dataset, build_tokenizer

    ds = build_dataset(TinySpec.for_task("tools"))
    train, test = ds["train"], ds["test"]
    assert (len(train), len(test)) == (7000, 500)
    assert not set(train["problem"]) & set(test["problem"])
    share = sum(len(m) == 4 for m in train["messages"]) / len(train)
    assert 0.37 < share < 0.43 and all(len(m) in (2, 4) for m in train["messages"])
    row = next(r for r in train if len(r["messages"]) == 4)
    a, b = map(int, row["problem"].split("*"))
    assert row["answer"] == str(a * b) and row["messages"][2] == {"role": "tool", "content": row["answer"]}
    tok = build_tokenizer()
    ex = render_conversation(tok, row["messages"])
    head, tail = tool_turn_template(tok)
    turn = tok.encode(head + row["answer"] + tail, add_special_tokens=False)
    call = tok.encode(row["messages"][1]["content"], add_special_tokens=False)
    start = next(i for i in range(len(ex.ids)) if ex.ids[i:i + len(call)] == call) + len(call)
    assert ex.ids[start:start + len(turn)] == turn
    assert ex.trained[start + 1:start + len(turn)] == [0] * (len(turn) - 1)  # the turn is context, but its <|im_end|>
    assert ex.trained[start] == 1  # ends the model's call turn: SFT trains it, an episode appends it
