"""Advantage estimators: GRPO's group baseline, RLOO's leave-one-out baseline, REINFORCE++,
and on-policy distillation's per-token reverse KL to a teacher.

Pure tensor functions. Rewards of one prompt's G completions are consecutive rows. With
``kl_in_reward`` the driver passes each completion's per-token KL to the reference (estimated
from the behaviour log-probs the generator recorded and the reference's log-probs, so the
reference group must run before advantages are computed: at batch time, not per group).
"""
from __future__ import annotations

from typing import Sequence

import torch


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-4) -> torch.Tensor:
    """(r - mean of its group) / (std + eps), as TRL's ``scale_rewards``; groups are consecutive rows.

    ``scale``: "group" divides by the group's std (GRPO), "batch" by the std of all the rewards
    given (PPO-Lite; pass the whole batch), "none" only centres (Dr. GRPO).
    """
    r = _grouped(rewards, group_size)
    centred = r - r.mean(dim=1, keepdim=True)
    if scale == "group":
        centred = centred / (r.std(dim=1, keepdim=True, unbiased=True) + eps)
    elif scale == "batch":
        centred = centred / (r.std(unbiased=True) + eps)
    elif scale != "none":
        raise ValueError(f"advantage scale {scale!r}: accepted are 'group', 'batch', 'none'")
    return centred.view(-1)


def rloo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """r_i - mean of the *other* G - 1 rewards of its group = G / (G - 1) x (r_i - group mean)."""
    r = _grouped(rewards, group_size)
    others = (r.sum(dim=1, keepdim=True) - r) / (group_size - 1)
    return (r - others).view(-1)


def kl_shaped_returns(rewards: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Per-token returns ``[B, T]`` of the outcome reward (at the last token) with a per-token
    reward -kl_coef x KL_t, undiscounted: G_t = r - kl_coef x sum_{s >= t} KL_s."""
    penalty = (kl * mask).flip(-1).cumsum(-1).flip(-1)
    return (rewards.float().unsqueeze(-1) - kl_coef * penalty) * mask


def reinforce_pp_advantages(returns: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """REINFORCE++: per-token returns whitened over every real token of the batch (mean 0, std 1)."""
    m = mask.bool()
    values = returns[m]
    std = values.std(unbiased=True) if values.numel() > 1 else values.new_tensor(0.0)
    return (returns - values.mean()) / (std + eps) * mask


def reverse_kl(logprobs: Sequence[float], teacher_logprobs: Sequence[float],
               mask: Sequence[int] | None = None) -> list[float]:
    """Per sampled token, log pi_student - log pi_teacher: the single-sample estimate of the
    reverse KL(student || teacher) the student's own samples give (0 on tokens out of the loss,
    a tool turn's). Positive where the student is surer of its token than the teacher."""
    if len(logprobs) != len(teacher_logprobs):
        raise ValueError(f"{len(logprobs)} student and {len(teacher_logprobs)} teacher log-probs: one each per "
                         "completion token")
    mask = [1] * len(logprobs) if mask is None else mask
    # float32 arrays (the teacher's log-probs) as Python floats: the difference in float64, as for lists
    logprobs, teacher_logprobs = (x.tolist() if hasattr(x, "tolist") else x for x in (logprobs, teacher_logprobs))
    return [(s - t) if m else 0.0 for s, t, m in zip(logprobs, teacher_logprobs, mask)]


def distill_advantages(token_kl: Sequence[float], discount: float = 0.0) -> list[float]:
    """On-policy distillation: A_t = -sum_{k >= t} discount^(k - t) x KL_k (discount 0: each
    token's own -KL_t, as the Qwen3 report and Thinking Machines' on-policy distillation use)."""
    out, running = [0.0] * len(token_kl), 0.0
    for t in range(len(token_kl) - 1, -1, -1):
        running = -token_kl[t] + discount * running
        out[t] = running
    return out


def add_token_terms(advantages: list, terms: Sequence[Sequence[float]]) -> list[list[float]]:
    """Each sample's advantage (a float, or one per token) plus a per-token term: per-token lists."""
    return [[(a[t] if isinstance(a, list) else a) + x for t, x in enumerate(term)]
            for a, term in zip(advantages, terms)]


def batch_advantages(rewards: Sequence[float], group_size: int, estimator: str, scale: str = "group",
                     lengths: Sequence[int] = (), token_kl: Sequence[Sequence[float]] | None = None,
                     kl_coef: float = 0.0) -> list:
    """A whole batch's advantages: one float per sample, or one list per sample (a value per
    completion token, ``lengths`` long) for "reinforce_pp".

    ``token_kl`` (with ``kl_coef``) folds the KL into the reward: "grpo" and "rloo" subtract
    kl_coef x the sequence's summed KL from its reward; "reinforce_pp" charges it per token.
    """
    r = torch.tensor(list(rewards), dtype=torch.float32)
    if estimator == "reinforce_pp":
        mask = _pad([[1.0] * n for n in lengths])
        kl = _pad(token_kl) if token_kl is not None else torch.zeros_like(mask)
        adv = reinforce_pp_advantages(kl_shaped_returns(r, kl, mask, kl_coef), mask)
        return [row[:n] for row, n in zip(adv.tolist(), lengths)]
    if token_kl is not None:
        r = r - kl_coef * torch.tensor([sum(k) for k in token_kl], dtype=torch.float32)
    if estimator == "grpo":
        return group_advantages(r, group_size, scale).tolist()
    if estimator == "rloo":
        return rloo_advantages(r, group_size).tolist()
    raise ValueError(f"advantage estimator {estimator!r}: accepted are 'grpo', 'rloo', 'reinforce_pp'")


def _grouped(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    return rewards.float().view(-1, group_size)


def _pad(rows: Sequence[Sequence[float]]) -> torch.Tensor:
    out = torch.zeros(len(rows), max((len(x) for x in rows), default=0) or 1)
    for i, x in enumerate(rows):
        out[i, : len(x)] = torch.tensor(list(x), dtype=torch.float32)
    return out
