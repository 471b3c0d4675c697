"""The record one completion carries from the generator to the learner."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Rollout:
    sample_id: str  # "<prompt_id>/<k>": stable across retries, used to prove nothing is lost or duplicated
    prompt_id: str
    prompt_ids: list[int]
    completion_ids: list[int]
    logprobs: list[float]  # behaviour log-probs of the sampled tokens, under logits / temperature
    versions: list[int]  # policy version that produced each completion token
    finish_reason: str  # "stop" (EOS) or "length"
    text: str = ""
    columns: dict[str, Any] = field(default_factory=dict)  # dataset columns (e.g. solution) for rewards
    scores: dict[str, float | None] = field(default_factory=dict)  # per reward function
    reward: float = 0.0
    advantage: float | list[float] = 0.0
    ref_logprobs: list[float] | None = None

    @property
    def version(self) -> int:
        """The oldest policy version that contributed a token (what staleness is measured on)."""
        return min(self.versions) if self.versions else -1


@dataclass
class TrainSample:
    """What the learner (and the reference) needs of one rollout: tokens, behaviour log-probs,
    the advantage, and the reference log-probs once the reference has computed them."""

    prompt_ids: list[int]
    completion_ids: list[int]
    logprobs: list[float] = field(default_factory=list)
    advantage: float | list[float] = 0.0  # one per sample, or one per completion token (REINFORCE++)
    ref_logprobs: list[float] | None = None
    in_loss: bool = True  # False: kept out of the loss (a truncated completion, mask_truncated_completions)

    @classmethod
    def of(cls, r: Rollout) -> "TrainSample":
        return cls(r.prompt_ids, r.completion_ids, r.logprobs, r.advantage, r.ref_logprobs)
