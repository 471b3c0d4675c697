"""The tiny offline world: a small Qwen2 model, a character tokenizer and a math dataset.

Everything here is built locally with no network, saved with ``save_pretrained`` /
``datasets.save_to_disk`` so that ``transformers`` and vLLM load it from a path exactly as
they would load a hub model.

The task is 3-digit addition written least-significant digit first ("reversed"): a tiny
causal model can learn it because each answer digit depends only on digits already seen.
The SFT trace spells out the column sums with carries, e.g. for 321+654 (123 + 456):
``<think>3+6+0=9 2+5+0=7 1+4+0=5</think><answer>\\boxed{975}</answer>``.

``task="tools"`` (configs/tiny-tools.yaml) is a world where a tool matters: 2-digit
multiplication, which a model this small cannot do in its head but can do by calling the
calculator and copying its answer. Its SFT traces mix the two ways: ``tool_share`` of them call
the calculator (a tool turn, then the answer), the rest answer at once.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TAGS = ["<think>", "</think>", "<answer>", "</answer>", "\\boxed{"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class TinySpec:
    """Shape of the tiny world; the defaults are what the tiny CPU recipe uses."""

    num_layers: int = 3
    hidden_size: int = 128
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 512
    max_position: int = 256
    digits: int = 3
    train_size: int = 20000
    test_size: int = 500
    seed: int = 0
    task: str = "add"  # "add": reversed-digit addition; "tools": 2-digit multiplication with a calculator
    tool_share: float = 0.4  # task "tools": share of the SFT traces that call the calculator

    @classmethod
    def for_task(cls, task: str) -> "TinySpec":
        """The world a recipe's ``model.tiny_task`` names (the tools world has 8100 problems)."""
        return cls(task=task, train_size=7000) if task == "tools" else cls(task=task)


def build_tokenizer():
    """A byte-level BPE tokenizer with no merges (one token per byte) and Qwen-style chat tokens.

    Byte-level like Qwen2's own tokenizer, so that ``AutoTokenizer`` (which picks
    ``Qwen2Tokenizer`` from the model config and applies its byte-level pre-tokenizer) and
    vLLM encode and decode exactly as this object does, spaces and newlines included.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {t: i for i, t in enumerate(SPECIAL + sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None, ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    hf.add_tokens(TAGS)  # each tag is one token: shorter completions, easier format learning
    hf.chat_template = CHAT_TEMPLATE
    hf.padding_side = "left"
    return hf


def build_model(tokenizer, spec: TinySpec):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(spec.seed)
    cfg = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_position,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
    )
    return Qwen2ForCausalLM(cfg)


def _rev(n: int, width: int) -> str:
    return str(n).zfill(width)[::-1]


def make_example(a: int, b: int, digits: int) -> dict:
    """One row in the open-r1 column shape: problem, solution (boxed), reasoning trace."""
    ra, rb = _rev(a, digits), _rev(b, digits)
    steps, carry, out = [], 0, []
    for da, db in zip(ra, rb):
        s = int(da) + int(db) + carry
        steps.append(f"{da}+{db}+{carry}={s}")
        out.append(str(s % 10))
        carry = s // 10
    if carry:
        out.append("1")
    answer = "".join(out)
    problem = f"{ra}+{rb}"
    return {
        "problem": problem,
        "solution": f"\\boxed{{{answer}}}",
        "answer": answer,
        "messages": [
            {"role": "user", "content": problem},
            {"role": "assistant", "content": f"<think>{' '.join(steps)}</think><answer>\\boxed{{{answer}}}</answer>"},
        ],
    }


TOOL_CALL = '<tool_call>\n{{"name": "calculator", "arguments": {{"expression": "{expression}"}}}}\n</tool_call>'


def make_tool_example(a: int, b: int, call: bool) -> dict:
    """One row of the tools world: ``a*b``; its SFT trace calls the calculator or answers at once."""
    problem, answer = f"{a}*{b}", str(a * b)
    final = f"<answer>\\boxed{{{answer}}}</answer>"
    turns = ([{"role": "assistant", "content": TOOL_CALL.format(expression=problem)},
              {"role": "tool", "content": answer}] if call else [])
    return {"problem": problem, "solution": f"\\boxed{{{answer}}}", "answer": answer,
            "messages": [{"role": "user", "content": problem}, *turns, {"role": "assistant", "content": final}]}


def _tool_dataset(spec: TinySpec):
    from datasets import Dataset, DatasetDict

    rng = random.Random(spec.seed)
    pairs = [(a, b) for a in range(10, 100) for b in range(10, 100)]
    if spec.train_size + spec.test_size > len(pairs):
        raise ValueError(f"TinySpec: train_size + test_size = {spec.train_size + spec.test_size}; the tools world "
                         f"has {len(pairs)} problems")
    rng.shuffle(pairs)
    rows = [make_tool_example(a, b, rng.random() < spec.tool_share)
            for a, b in pairs[: spec.train_size + spec.test_size]]
    return DatasetDict(train=Dataset.from_list(rows[: spec.train_size]), test=Dataset.from_list(rows[spec.train_size :]))


def build_dataset(spec: TinySpec):
    """Disjoint train / test splits of reversed-digit additions (or of the tools world's products)."""
    from datasets import Dataset, DatasetDict

    if spec.task == "tools":
        return _tool_dataset(spec)
    if spec.task != "add":
        raise ValueError(f"TinySpec.task: got {spec.task!r}; accepted: 'add', 'tools'")
    rng = random.Random(spec.seed)
    hi = 10**spec.digits
    pairs: set[tuple[int, int]] = set()
    while len(pairs) < spec.train_size + spec.test_size:
        pairs.add((rng.randrange(hi), rng.randrange(hi)))
    ordered = sorted(pairs)
    rng.shuffle(ordered)
    rows = [make_example(a, b, spec.digits) for a, b in ordered]
    return DatasetDict(
        train=Dataset.from_list(rows[: spec.train_size]),
        test=Dataset.from_list(rows[spec.train_size :]),
    )


def build_tiny_world(out_dir: str | Path, spec: TinySpec = TinySpec(), force: bool = False) -> Path:
    """Build (or reuse) ``out_dir/model`` and ``out_dir/data``. Returns ``out_dir``."""
    out = Path(out_dir)
    marker = out / "tiny_world.json"
    if marker.exists() and not force:
        if json.loads(marker.read_text()) == spec.__dict__:
            return out
    tok = build_tokenizer()
    model = build_model(tok, spec)
    (out / "model").mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out / "model")
    tok.save_pretrained(out / "model")
    build_dataset(spec).save_to_disk(str(out / "data"))
    marker.write_text(json.dumps(spec.__dict__, indent=1))
    return out
