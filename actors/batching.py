"""Turning rollouts into padded tensors and per-token log-probs (shared by learner and reference)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass
class Packed:
    """Right-padded prompt+completion sequences.

    ``completion_mask[b, t]`` is 1 where token ``t + 1`` of row ``b`` is a completion token,
    i.e. on the positions whose next-token log-prob the loss uses (shape ``[B, L - 1]``).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    completion_mask: torch.Tensor

    def scatter(self, per_sample: Sequence[Sequence[float]]) -> torch.Tensor:
        """Place per-completion-token values (e.g. behaviour log-probs) into the ``[B, L-1]`` layout."""
        out = torch.zeros(self.completion_mask.shape, dtype=torch.float32)
        flat = torch.tensor([v for row in per_sample for v in row], dtype=torch.float32)
        out[self.completion_mask.bool()] = flat
        return out

    def gather(self, values: torch.Tensor) -> list[list[float]]:
        """Inverse of ``scatter``: per-sample lists of the values on completion positions."""
        rows = []
        for b in range(values.shape[0]):
            rows.append(values[b][self.completion_mask[b].bool()].tolist())
        return rows

    def to(self, device) -> "Packed":
        return Packed(self.input_ids.to(device), self.attention_mask.to(device), self.completion_mask.to(device))


def pack(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], pad_id: int) -> Packed:
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    lengths = [len(p) + len(c) for p, c in zip(prompts, completions)]
    width = max(lengths)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(prompts), width), dtype=torch.long)
    cmask = torch.zeros((len(prompts), width - 1), dtype=torch.long)
    for b, (p, c) in enumerate(zip(prompts, completions)):
        seq = list(p) + list(c)
        ids[b, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        attn[b, : len(seq)] = 1
        cmask[b, len(p) - 1 : len(seq) - 1] = 1
    return Packed(ids, attn, cmask)


def token_logprobs(model, packed: Packed, temperature: float = 1.0, entropy: str = "no"):
    """Log-prob of each next token under ``softmax(logits / temperature)``, shape ``[B, L-1]``.

    Row by row logsumexp instead of a full log_softmax: with a 150k vocabulary and long
    completions the full ``[B, L, V]`` log-softmax is the largest tensor of the step.
    ``entropy`` "log" (no gradient) or "grad" also returns each position's entropy
    ``logsumexp(z) - sum softmax(z) z``, one row at a time like the log-probs.
    """
    logits = model(input_ids=packed.input_ids, attention_mask=packed.attention_mask, use_cache=False).logits
    logits = logits[:, :-1].float()
    if temperature != 1.0:
        logits = logits / temperature
    targets = packed.input_ids[:, 1:]
    out, entropies = [], []
    for row_logits, row_targets in zip(logits, targets):
        lse = torch.logsumexp(row_logits, dim=-1)
        out.append(row_logits.gather(-1, row_targets.unsqueeze(-1)).squeeze(-1) - lse)
        if entropy != "no":
            with torch.set_grad_enabled(entropy == "grad" and torch.is_grad_enabled()):
                entropies.append(lse - (torch.softmax(row_logits, dim=-1) * row_logits).sum(-1))
    logp = torch.stack(out) * packed.completion_mask
    return logp if entropy == "no" else (logp, torch.stack(entropies) * packed.completion_mask)
