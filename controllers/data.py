"""Datasets -> prompts for the generator and (prompt, completion) token pairs for SFT."""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from .config import TINY, DataConfig


def load_splits(cfg: DataConfig, tiny_dir: Path | None):
    """Returns (train, test) ``datasets.Dataset``s: the tiny world, a saved dir, or a hub dataset."""
    import datasets

    if cfg.path == TINY:
        ds = datasets.load_from_disk(str(tiny_dir / "data"))
    elif Path(cfg.path).expanduser().exists():
        ds = datasets.load_from_disk(str(Path(cfg.path).expanduser()))
    else:
        ds = datasets.load_dataset(cfg.path, cfg.name)
    for split in (cfg.train_split, cfg.test_split):
        if split not in ds:
            raise ValueError(f"data: split {split!r} not in {cfg.path} (has {', '.join(ds)})")
    train = ds[cfg.train_split]
    for col in (cfg.prompt_column, cfg.solution_column):
        if col not in train.column_names:
            raise ValueError(f"config key 'data.prompt_column'/'data.solution_column': column {col!r} not in "
                             f"{cfg.path} (columns: {', '.join(train.column_names)})")
    return train, ds[cfg.test_split]


class PromptRenderer:
    """Chat-template rendering and tokenisation, done once per prompt in the driver."""

    def __init__(self, tokenizer, cfg: DataConfig):
        self.tok, self.cfg = tokenizer, cfg

    def messages(self, row: dict) -> list[dict]:
        msgs = [{"role": "system", "content": self.cfg.system_prompt}] if self.cfg.system_prompt else []
        return msgs + [{"role": "user", "content": row[self.cfg.prompt_column]}]

    def prompt(self, row: dict, prompt_id: str) -> dict:
        msgs = self.messages(row)
        ids = self.tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False)
        columns = {k: v for k, v in row.items() if k != self.cfg.messages_column}
        columns["prompt"] = msgs
        return {"prompt_id": prompt_id, "prompt_ids": list(ids), "columns": columns}

    def sft_pair(self, row: dict) -> tuple[list[int], list[int]]:
        msgs = row[self.cfg.messages_column]
        if not msgs or msgs[-1]["role"] != "assistant":
            raise ValueError(f"data column {self.cfg.messages_column!r}: the last message must be the assistant's")
        prefix = ([{"role": "system", "content": self.cfg.system_prompt}] if self.cfg.system_prompt else []) + msgs[:-1]
        p = self.tok.apply_chat_template(prefix, add_generation_prompt=True, tokenize=True, return_dict=False)
        c = self.tok(msgs[-1]["content"], add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id]
        return list(p), c


@dataclass
class EpochSampler:
    """Shuffled passes over the train split; ids stay unique across passes (``train-<row>.<epoch>``)."""

    size: int
    seed: int

    def __post_init__(self):
        self.epoch, self.pos, self.order = 0, 0, []
        self._reshuffle()

    def _reshuffle(self):
        self.order = list(range(self.size))
        random.Random(self.seed * 1_000_003 + self.epoch).shuffle(self.order)

    def take(self, n: int) -> list[tuple[int, str]]:
        out = []
        while len(out) < n:
            if self.pos == len(self.order):
                self.epoch, self.pos = self.epoch + 1, 0
                self._reshuffle()
            idx = self.order[self.pos]
            out.append((idx, f"train-{idx}.{self.epoch}"))
            self.pos += 1
        return out
