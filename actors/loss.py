"""GRPO maths: group-normalised advantages, the clipped surrogate and the k3 KL penalty.

Pure tensor functions, no model and no Ray, so they can be checked against hand-computed
values. Shapes: ``[B, T]`` for per-token tensors (completion tokens only), ``[B]`` for
per-sequence ones, ``mask`` is 1 on real completion tokens and 0 on padding.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch


@dataclass
class LossConfig:
    """The learner's loss knobs (composed into the recipe schema by controllers/)."""

    clip_eps_low: float = 0.2
    clip_eps_high: float = 0.28  # DAPO's clip-higher; set equal to clip_eps_low for plain PPO clipping
    kl_coef: float = 0.0  # beta of the k3 penalty to the reference; 0 skips the reference group
    aggregation: Literal["token_mean", "seq_mean"] = "token_mean"
    temperature: float = 1.0  # log-probs are taken of logits / temperature, as the generator samples
    # Off-policy correction for samples from older policies (asynchronous runs):
    #   "none":      PPO ratio against the behaviour log-probs (clipping zeroes far-off tokens)
    #   "decoupled": ratio against the proximal policy (the learner's weights before this step),
    #                times the importance weight pi_prox / pi_behaviour (AReaL's decoupled PPO)
    #   "tis":       the same with the importance weight truncated at ``is_cap`` (truncated IS)
    off_policy: Literal["none", "decoupled", "tis"] = "none"
    is_cap: float = 2.0


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-4) -> torch.Tensor:
    """(r - mean of its group) / (std of its group + eps); groups are consecutive rows.

    ``scale``: "group" divides by the group's std (GRPO), "batch" by the batch std
    (REINFORCE++-style, more robust with small groups), "none" only centres (Dr. GRPO).
    """
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    r = rewards.float().view(-1, group_size)
    centred = r - r.mean(dim=1, keepdim=True)
    if scale == "group":
        centred = centred / (r.std(dim=1, keepdim=True, unbiased=True) + eps)
    elif scale == "batch":
        centred = centred / (r.std(unbiased=True) + eps)
    elif scale != "none":
        raise ValueError(f"advantage scale {scale!r}: accepted are 'group', 'batch', 'none'")
    return centred.view(-1)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(pi || ref) per token: exp(d) - d - 1 with d = ref - logp."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def grpo_token_losses(
    logp: torch.Tensor,
    behaviour_logp: torch.Tensor,
    advantages: torch.Tensor,
    cfg: LossConfig,
    ref_logp: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token loss ``-w * min(r A, clip(r) A) + beta * k3``.

    With ``off_policy="none"``: r = pi / pi_behaviour, w = 1. Otherwise r = pi / pi_prox and
    w = pi_prox / pi_behaviour (truncated at ``is_cap`` for "tis"). The learner takes one
    optimizer step per batch, so the proximal policy is the current weights: pi_prox is
    ``logp`` detached, and no extra forward pass is needed.
    """
    behaviour_ratio = torch.exp(logp.detach() - behaviour_logp)
    if cfg.off_policy == "none":
        old, weight = behaviour_logp, torch.ones_like(logp)
    else:
        old = logp.detach()
        weight = behaviour_ratio if cfg.off_policy == "decoupled" else torch.clamp(behaviour_ratio, max=cfg.is_cap)
    ratio = torch.exp(logp - old)
    adv = advantages.unsqueeze(-1)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - cfg.clip_eps_low, 1 + cfg.clip_eps_high) * adv
    loss = -torch.minimum(unclipped, clipped) * weight
    parts = {"ratio": behaviour_ratio, "clipped": (clipped < unclipped).detach(), "is_weight": weight,
             "is_truncated": (behaviour_ratio > cfg.is_cap) if cfg.off_policy == "tis" else torch.zeros_like(ratio, dtype=torch.bool)}
    if cfg.kl_coef and ref_logp is not None:
        kl = k3_kl(logp, ref_logp)
        loss = loss + cfg.kl_coef * kl
        parts["kl"] = kl.detach()
    return loss, parts


def aggregate(token_losses: torch.Tensor, mask: torch.Tensor, mode: str, denom: float) -> torch.Tensor:
    """Sum this shard's share of the batch loss, normalised by the *whole batch*'s ``denom``.

    ``token_mean``: denom = completion tokens in the whole batch (DAPO; long answers weigh
    more). ``seq_mean``: denom = sequences in the whole batch, each sequence averaged over
    its own tokens first (the original GRPO). Normalising by the global count makes the
    result independent of how the batch is cut into ranks and micro-batches.
    """
    mask = mask.to(token_losses.dtype)
    if mode == "token_mean":
        return (token_losses * mask).sum() / denom
    if mode == "seq_mean":
        per_seq = (token_losses * mask).sum(-1) / mask.sum(-1).clamp(min=1)
        return per_seq.sum() / denom
    raise ValueError(f"loss aggregation {mode!r}: accepted are 'token_mean', 'seq_mean'")
