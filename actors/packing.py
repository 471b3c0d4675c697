"""SFT examples as training rows: one example per row (right-padded), or several packed into a
row with no cross-contamination.

A packed row restarts ``position_ids`` at 0 for every example and passes no attention mask, so
transformers builds a block-diagonal causal mask from the position ids (SDPA and eager: its
packed-sequence detection; FlashAttention-2: the varlen path): no token attends across an
example boundary, and each example's log-probs equal those it has alone. The loss mask never
crosses a boundary either: the last token of one example does not predict the first of the next.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .batching import TokenBatch


@dataclass
class SftExample:
    """Token ids of one rendered conversation and which of them are trained (assistant tokens)."""

    ids: list[int]
    trained: list[int]  # 1 where the token is a target of the loss

    def __post_init__(self):
        if len(self.ids) != len(self.trained):
            raise ValueError(f"SftExample: {len(self.ids)} ids but {len(self.trained)} mask values")

    @property
    def targets(self) -> int:
        """Tokens the loss sees (a first token has nothing before it to predict it from)."""
        return sum(self.trained[1:])

    @classmethod
    def from_pair(cls, prompt: Sequence[int], completion: Sequence[int]) -> "SftExample":
        return cls(list(prompt) + list(completion), [0] * len(prompt) + [1] * len(completion))


def pack_bins(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices grouped into rows of at most ``capacity`` tokens, best-fit decreasing (TRL's
    "bfd"): the longest example first, each into the fullest row it still fits. A row keeps
    its examples in their original order."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        if lengths[i] > capacity:
            raise ValueError(f"pack_bins: example {i} has {lengths[i]} tokens, more than a row's {capacity}")
        best = min((r for r in range(len(rows)) if room[r] >= lengths[i]), key=lambda r: room[r], default=None)
        if best is None:
            rows.append([i])
            room.append(capacity - lengths[i])
        else:
            rows[best].append(i)
            room[best] -= lengths[i]
    return [sorted(r) for r in rows]


def uses_flash_attention(model) -> bool:
    """Whether ``model`` attends through a FlashAttention kernel. transformers reads per-example
    position ids as packed sequences there only in a batch of one row (its
    ``_is_packed_sequence``); SDPA and eager find the examples in every row."""
    return "flash" in (getattr(getattr(model, "config", None), "_attn_implementation", None) or "")


def one_row(rows: Sequence[Sequence[SftExample]]) -> list[list[SftExample]]:
    """Packed rows as a single row (FlashAttention's varlen path): the same examples, the same
    losses, no padding between rows."""
    return [[e for r in rows for e in r]]


def sft_batch(rows: Sequence[Sequence[SftExample]], pad_id: int) -> TokenBatch:
    """Rows of examples as one right-padded batch. A row of one example uses an attention mask;
    any batch with a packed row uses position ids reset per example (and pads as a segment of
    its own), which transformers turns into a block-diagonal causal mask."""
    packed = any(len(r) > 1 for r in rows)
    width = max(sum(len(e.ids) for e in r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    loss = torch.zeros((len(rows), width - 1), dtype=torch.long)
    for b, row in enumerate(rows):
        t = 0
        for e in row:
            n = len(e.ids)
            ids[b, t:t + n] = torch.tensor(e.ids, dtype=torch.long)
            attn[b, t:t + n] = 1
            pos[b, t:t + n] = torch.arange(n)
            # position t + k - 1 predicts token t + k: trained tokens after the example's first
            loss[b, t:t + n - 1] = torch.tensor(e.trained[1:], dtype=torch.long)
            t += n
        if t < width:  # padding: its own segment, never trained
            pos[b, t:] = torch.arange(width - t)
    return TokenBatch(ids, None if packed else attn, loss, pos if packed else None)
