"""The tiny offline world: a small Qwen2 model, a character tokenizer and a math dataset.

Everything here is built locally with no network, saved with ``save_pretrained`` /
``datasets.save_to_disk`` so that ``transformers`` and vLLM load it from a path exactly as
they would load a hub model.

The task is 3-digit addition written least-significant digit first ("reversed"): a tiny
causal model can learn it because each answer digit depends only on digits already seen.
The SFT trace spells out the column sums with carries, e.g. for 321+654 (123 + 456):
``<think>3+6+0=9 2+5+0=7 1+4+0=5</think><answer>\\boxed{975}</answer>``.
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


def build_dataset(spec: TinySpec):
    """Disjoint train / test splits of reversed-digit additions."""
    from datasets import Dataset, DatasetDict

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
