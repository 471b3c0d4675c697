"""Prompt groups on their way to the learner: the group itself, the dynamic-sampling filter,
and a batch of groups turned into train samples (advantages, the loss's denominators)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ...actors.advantages import add_token_terms, batch_advantages, distill_advantages, reverse_kl
from ...actors.batching import item_tokens, step_micro_batches
from ...actors.loss import global_denominator, kl_estimate
from ...actors.rollout import Rollout, TrainSample
from ..config import Recipe


@dataclass
class Group:
    """One prompt and its G completions on their way through the pipeline."""

    seq: int  # admission order
    prompt: dict
    admitted_at: int  # the version every generator held when the group was admitted
    rollouts: list[Rollout] = field(default_factory=list)


@dataclass(eq=False)
class Part:
    """Completions ``first`` .. ``first + count - 1`` of ``group``: generated, scored and given
    log-probs on their own (``grpo.completions_per_request``); their rollouts are the group's."""

    group: Group
    first: int
    count: int
    rollouts: list[Rollout] = field(default_factory=list)

    @property
    def seq(self) -> int:
        return self.group.seq

    @property
    def prompt(self) -> dict:
        return self.group.prompt


def split(group: Group, group_size: int, per_request: int) -> list[Part]:
    """``group`` as parts of ``per_request`` completions (the last may be smaller)."""
    group.rollouts = [None] * group_size
    return [Part(group, k, min(per_request, group_size - k)) for k in range(0, group_size, per_request)]


def attach(units: list, rollouts: list[Rollout], group_size: int) -> None:
    """Hand each group (or part of one) its rollouts (a call returns them in the units' order);
    a part's rollouts take their places in its group."""
    start = 0
    for u in units:
        n = u.count if isinstance(u, Part) else group_size
        u.rollouts = rollouts[start : start + n]
        if isinstance(u, Part):
            u.group.rollouts[u.first : u.first + n] = u.rollouts
        start += n


class DynamicSampling:
    """``grpo.dynamic_sampling``: a group whose rewards are all equal carries no learning signal
    and is dropped; more than ``20 x prompts_per_step`` drops in a row stop the run."""

    def __init__(self, on: bool, prompts_per_step: int):
        self.on, self.limit = on, 20 * prompts_per_step
        self.in_a_row = 0

    def keep(self, group: Group) -> bool:
        if not self.on:
            return True
        rewards = torch.tensor([r.reward for r in group.rollouts]).tolist()  # (compared as the learner sees them)
        if len(set(rewards)) != 1:
            self.in_a_row = 0
            return True
        self.in_a_row += 1
        if self.in_a_row > self.limit:
            raise RuntimeError(f"grpo.dynamic_sampling dropped {self.in_a_row} groups in a row: every group has equal "
                               "rewards (all solved or all failed); turn it off or change the data")
        return False


def teacher_kl(rollouts: list[Rollout], clip: float | None = None) -> list[list[float]]:
    """Each rollout's per-token reverse KL to the teacher (behaviour minus teacher log-probs;
    0 on a tool turn's tokens), cut to [-clip, clip] when ``clip`` is set."""
    missing = [r.sample_id for r in rollouts if r.teacher_logprobs is None]
    if missing:
        raise RuntimeError(f"no teacher log-probs for {missing[0]} (and {len(missing) - 1} more): the teacher "
                           "stage did not run for them")
    kl = [reverse_kl(r.logprobs, r.teacher_logprobs, r.loss_mask) for r in rollouts]
    return kl if clip is None else [[min(clip, max(-clip, x)) for x in k] for k in kl]


def train_batch(rollouts: list[Rollout], recipe: Recipe, learner_ranks: int) -> tuple[list[TrainSample], float, float]:
    """The batch's train samples, with advantages computed on the whole batch after the
    reference ("batch" scaling, REINFORCE++ and KL-in-reward need it; each rollout's
    ``advantage`` is set too), truncated completions out of the loss when
    ``grpo.mask_truncated_completions``; and the global denominators of the loss type and of
    the token mean. With a teacher: "on_policy_distill" advantages (each token's reverse KL to
    the teacher, negated and discounted), or ``teacher_kl_coef`` x that KL charged per token on
    top of the rewards' advantages."""
    g, lc = recipe.grpo, recipe.learner.loss
    if g.advantage_estimator == "on_policy_distill":
        advantages = [distill_advantages(k, g.distill_discount) for k in teacher_kl(rollouts, g.distill_kl_clip)]
    else:
        kl = [kl_estimate(torch.tensor(r.logprobs), torch.tensor(r.ref_logprobs), lc.kl_estimator, lc.kl_max).tolist()
              for r in rollouts] if lc.kl_in_reward else None
        advantages = batch_advantages([r.reward for r in rollouts], g.num_generations, g.advantage_estimator,
                                      g.advantage_scale, [len(r.completion_ids) for r in rollouts], kl, lc.kl_coef)
        if lc.teacher_kl_coef:
            advantages = add_token_terms(advantages, [[-lc.teacher_kl_coef * x for x in k]
                                                      for k in teacher_kl(rollouts, g.distill_kl_clip)])
    samples = []
    for r, a in zip(rollouts, advantages):
        r.advantage = a
        in_loss = not (g.mask_truncated_completions and r.finish_reason == "length")
        samples.append(TrainSample(r.prompt_ids, r.completion_ids, r.logprobs, a, r.ref_logprobs, in_loss, r.loss_mask))
    lengths = [s.loss_tokens for s in samples]
    lr = recipe.learner
    micro = step_micro_batches([item_tokens(s) for s in samples], learner_ranks // lr.sequence_parallel_size,
                               lr.micro_batch_size, lr.max_tokens_per_micro_batch)
    denom = global_denominator(lc.loss_type, lengths, lc.max_completion_length or recipe.rollout.budget(recipe.sampling.max_new_tokens),
                               micro)
    return samples, denom, float(max(sum(lengths), 1))
