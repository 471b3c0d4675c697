"""The GRPO family's policy losses (TRL 1.16 names and meanings), KL estimators, aggregation.

Pure tensor functions, no model and no Ray, so they can be checked against hand-computed
values and against TRL's own ``GRPOTrainer._compute_loss``. Shapes: ``[B, T]`` for per-token
tensors (completion tokens only), ``[B]`` for per-sequence ones, ``mask`` is 1 on real
completion tokens and 0 on padding (and on completions kept out of the loss).

A step's loss is ``aggregate(grpo_token_losses(...), mask, loss_type, denom)`` summed over
every micro-batch of every rank, where ``denom`` is a count of the *whole* batch
(``global_denominator``), so the update does not depend on how the batch is cut -- except
for ``bnpo``, which TRL defines on the local batch (see ``aggregate``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal, Sequence

import torch

LossType = Literal["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo"]
CLIPPED_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")  # PPO's min(r A, clip(r) A) surrogate


@dataclass
class LossConfig:
    """The learner's loss knobs (composed into the recipe schema by controllers/)."""

    RENAMED: ClassVar[dict[str, str]] = {
        "aggregation": "learner.loss.loss_type (token_mean is now 'dapo', seq_mean is now 'grpo')"}

    loss_type: LossType = "dapo"  # TRL loss_type; the README has each formula
    clip_eps_low: float = 0.2  # TRL epsilon
    # TRL epsilon_high: DAPO's clip-higher (equal to clip_eps_low: plain PPO clipping). For
    # cispo it is the cap on the ratio itself, epsilon_max (ScaleRL recommends 5.0).
    clip_eps_high: float = 0.28
    delta: float | None = None  # TRL delta: dual clip, the unclipped ratio capped at delta (INTELLECT-2)
    importance_sampling_level: Literal["token", "sequence"] = "token"  # "sequence": GSPO's length-normalised ratio
    sapo_temperature_pos: float = 1.0  # SAPO gate temperature where A > 0
    sapo_temperature_neg: float = 1.05  # ... and where A <= 0
    kl_coef: float = 0.0  # beta; 0 skips the reference group
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"  # TRL uses k3
    # Each token's estimate capped at +-kl_max (veRL's low_var_kl caps k3 at 10); None: uncapped,
    # as TRL. k3's exp(ref - logp) is unbounded where the policy samples a token the reference
    # finds far likelier: one such token can carry a step's whole gradient.
    kl_max: float | None = None
    kl_in_reward: bool = False  # True: the driver subtracts beta x KL from the rewards instead of the loss
    # On-policy distillation beside the rewards (needs `teacher.model`): the driver adds
    # -coef x (log pi_behaviour - log pi_teacher) to each completion token's advantage (slime's
    # opd_kl_coef): the per-token reverse KL to the teacher as a penalty
    teacher_kl_coef: float = 0.0
    entropy_coef: float = 0.0  # bonus: loss - coef x mean token entropy (entropy is logged either way)
    num_iterations: int = 1  # mu: optimizer steps per batch, old log-probs fixed at iteration 1's
    max_completion_length: int | None = None  # dr_grpo's constant; None: sampling.max_new_tokens
    temperature: float = 1.0  # log-probs are taken of logits / temperature, as the generator samples
    # Off-policy correction for samples from older policies (asynchronous runs):
    #   "none":      PPO ratio against the behaviour log-probs (clipping zeroes far-off tokens)
    #   "decoupled": ratio against the proximal policy (the learner's weights before this step),
    #                times the importance weight pi_prox / pi_behaviour (AReaL's decoupled PPO)
    #   "tis":       the same with the importance weight truncated at ``is_cap`` (truncated IS)
    off_policy: Literal["none", "decoupled", "tis"] = "none"
    is_cap: float = 2.0


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k3",
                cap: float | None = None) -> torch.Tensor:
    """Schulman's estimators of KL(pi || ref) per token sampled from pi, with d = ref - logp:
    k1 = -d (unbiased, can be negative), k2 = d^2 / 2, k3 = exp(d) - d - 1 (unbiased, >= 0).
    ``cap``: each estimate clamped to [-cap, cap], so a capped token adds no gradient (veRL's
    clamp of k3 at 10)."""
    d = ref_logp - logp
    if estimator == "k1":
        k = -d
    elif estimator == "k2":
        k = 0.5 * d * d
    elif estimator == "k3":
        # capped: d kept below exp's overflow (e^80 ~ 5.5e34), where the cap holds anyway and
        # where an infinite exp would turn the clamp's zero gradient into 0 x inf = nan
        k = torch.exp(d if cap is None else d.clamp(max=80.0)) - d - 1
    else:
        raise ValueError(f"KL estimator {estimator!r}: accepted are 'k1', 'k2', 'k3'")
    return k if cap is None else k.clamp(-cap, cap)


def log_importance_ratio(logp: torch.Tensor, old_logp: torch.Tensor, level: str,
                         mask: torch.Tensor | None = None) -> torch.Tensor:
    """log(pi / pi_old) per token ``[B, T]``, or GSPO's per-sequence mean over real tokens ``[B, 1]``."""
    log_ratio = logp - old_logp
    if level == "token":
        return log_ratio
    if level != "sequence":
        raise ValueError(f"importance_sampling_level {level!r}: accepted are 'token', 'sequence'")
    if mask is None:
        raise ValueError("importance_sampling_level 'sequence' needs the completion mask")
    mask = mask.to(log_ratio.dtype)
    return ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)


def surrogate(ratio: torch.Tensor, logp: torch.Tensor, adv: torch.Tensor, cfg: LossConfig):
    """Per-token policy loss of ``cfg.loss_type`` and where it clipped (both broadcast to ``logp``).

    clipped types: -min(r' A, clip(r, 1-eps_low, 1+eps_high) A), r' = min(r, delta) when set;
    cispo: -sg(min(r, eps_high)) A logp; sapo: -(4 / tau) sigmoid(tau (r - 1)) A, tau by sign of A.
    """
    if cfg.loss_type == "cispo":
        loss = -torch.clamp(ratio, max=cfg.clip_eps_high).detach() * adv * logp
        clipped = (ratio > cfg.clip_eps_high) & (adv > 0)
    elif cfg.loss_type == "sapo":
        tau = torch.where(adv > 0, cfg.sapo_temperature_pos, cfg.sapo_temperature_neg)
        loss = -torch.sigmoid(tau * (ratio - 1)) * 4 / tau * adv
        clipped = torch.zeros_like(loss, dtype=torch.bool)
    elif cfg.loss_type in CLIPPED_TYPES:
        capped = torch.clamp(ratio, 1 - cfg.clip_eps_low, 1 + cfg.clip_eps_high) * adv
        unclipped = (ratio if cfg.delta is None else torch.clamp(ratio, max=cfg.delta)) * adv
        loss, clipped = -torch.minimum(unclipped, capped), capped < unclipped
    else:
        raise ValueError(f"loss_type {cfg.loss_type!r}: accepted are {', '.join(LossType.__args__)}")
    return torch.broadcast_to(loss, logp.shape), torch.broadcast_to(clipped.detach(), logp.shape)


def grpo_token_losses(
    logp: torch.Tensor,
    behaviour_logp: torch.Tensor,
    advantages: torch.Tensor,
    cfg: LossConfig,
    ref_logp: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token loss ``w * surrogate(r, A) + beta * KL`` (``mask`` only for sequence-level ratios).

    ``advantages``: ``[B]`` or per token ``[B, T]`` (REINFORCE++). With ``off_policy="none"``:
    r = pi / pi_old, w = 1, where pi_old is ``behaviour_logp`` (the generator's log-probs, or the
    learner's own from iteration 1 when num_iterations > 1). Otherwise r = pi / pi_prox and
    w = pi_prox / pi_behaviour (truncated at ``is_cap`` for "tis"); pi_prox is ``logp`` detached
    (the weights before this step), so no extra forward pass is needed. The KL term is left out
    when ``kl_in_reward`` (the driver put it in the rewards).
    """
    behaviour_ratio = torch.exp(logp.detach() - behaviour_logp)
    if cfg.off_policy == "none":
        old, weight = behaviour_logp, torch.ones_like(logp)
    else:
        old = logp.detach()
        weight = behaviour_ratio if cfg.off_policy == "decoupled" else torch.clamp(behaviour_ratio, max=cfg.is_cap)
    ratio = torch.exp(log_importance_ratio(logp, old, cfg.importance_sampling_level, mask))
    adv = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages
    loss, clipped = surrogate(ratio, logp, adv, cfg)
    loss = loss * weight
    truncated = behaviour_ratio > cfg.is_cap if cfg.off_policy == "tis" else torch.zeros_like(logp, dtype=torch.bool)
    parts = {"ratio": behaviour_ratio, "clipped": clipped, "is_weight": weight, "is_truncated": truncated}
    if cfg.kl_coef and not cfg.kl_in_reward and ref_logp is not None:
        kl = kl_estimate(logp, ref_logp, cfg.kl_estimator, cfg.kl_max)
        loss = loss + cfg.kl_coef * kl
        parts["kl"] = kl.detach()
    return loss, parts


def aggregate(token_losses: torch.Tensor, mask: torch.Tensor, loss_type: str, denom: float) -> torch.Tensor:
    """This shard's share of the step's loss; ``denom`` is ``global_denominator`` of the whole batch.

    grpo, sapo: each sequence's token mean, summed, / sequences in the batch.
    dapo, cispo: token sum / completion tokens in the batch (DAPO's token-level mean).
    dr_grpo: token sum / (sequences in the batch x max_completion_length).
    bnpo: the token mean of *this micro-batch*, / micro-batches in the step (every rank's):
    TRL's local-batch normalisation, so it depends on the micro-batch size, as it does in TRL.
    """
    mask = mask.to(token_losses.dtype)
    masked = token_losses * mask
    if loss_type in ("grpo", "sapo"):
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).sum() / denom
    if loss_type == "bnpo":
        return masked.sum() / mask.sum().clamp(min=1.0) / denom
    if loss_type in ("dapo", "cispo", "dr_grpo"):
        return masked.sum() / denom
    raise ValueError(f"loss_type {loss_type!r}: accepted are {', '.join(LossType.__args__)}")


def global_denominator(loss_type: str, lengths: Sequence[int], max_completion_length: int,
                       micro_batches: int) -> float:
    """The whole batch's count that ``aggregate`` divides by; ``lengths``: completion tokens per
    sample that count in the loss (0 for a completion kept out of it)."""
    counts = {"grpo": len(lengths), "sapo": len(lengths), "dapo": sum(lengths), "cispo": sum(lengths),
              "dr_grpo": len(lengths) * max_completion_length, "bnpo": micro_batches}
    if loss_type not in counts:
        raise ValueError(f"loss_type {loss_type!r}: accepted are {', '.join(counts)}")
    return float(max(counts[loss_type], 1))

