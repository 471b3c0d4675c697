"""The record one completion carries from the generator to the learner."""
from __future__ import annotations

from dataclasses import dataclass, field
from itertools import repeat
from typing import Any, Sequence

import numpy as np


class TokenIds(np.ndarray):
    """A completion's token ids as the generator makes them: an int32 array (see
    ``Rollout.completion_ids``). ``+`` joins two lists but adds two arrays element-wise, so
    ``prompt_ids + completion_ids`` would be a silent error here: it raises instead."""

    @classmethod
    def of(cls, ids: Sequence[int]) -> "TokenIds":
        return np.asarray(ids, dtype=np.int32).view(cls)

    def __add__(self, other):
        raise TypeError("completion ids are an int32 array (TokenIds): join them with .tolist() + [...] or "
                        "np.concatenate, not +")

    __radd__ = __iadd__ = __add__


class OneVersion(Sequence):
    """``Rollout.versions`` as unpickled when every token came from one policy version (all but
    a continued partial rollout's or a tool episode's): ``n`` times ``version`` in two numbers,
    where a list holds a pointer a token (8 bytes: a third of what a 430-token completion
    holds in the driver). Reads as that list: compares equal to it; ``+`` gives a list."""

    __slots__ = ("version", "n")

    def __init__(self, version: int, n: int):
        self.version, self.n = version, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self.version] * len(range(*i.indices(self.n)))
        if not -self.n <= i < self.n:
            raise IndexError("versions index out of range")
        return self.version

    def __iter__(self):
        return repeat(self.version, self.n)

    def count(self, value) -> int:
        return self.n if value == self.version else 0

    def __eq__(self, other) -> bool:
        if isinstance(other, OneVersion):
            return self.n == other.n and (self.n == 0 or self.version == other.version)
        if isinstance(other, (list, tuple)):
            return len(other) == self.n and other.count(self.version) == self.n
        return NotImplemented

    def __add__(self, other) -> list:
        return list(self) + list(other)

    def __radd__(self, other) -> list:
        return list(other) + list(self)

    def __reduce__(self):
        return OneVersion, (self.version, self.n)

    def __repr__(self) -> str:
        return f"[{self.version}] * {self.n}"


@dataclass
class Rollout:
    sample_id: str  # "<prompt_id>/<k>": stable across retries, used to prove nothing is lost or duplicated
    prompt_id: str
    prompt_ids: list[int]
    # an int32 array from the generator (TokenIds): one buffer to pickle through the driver and
    # from it to the scorers, the reference and the learners, where a list is a Python int a
    # token (16 ns to pickle and 27 to unpickle each on this machine, against 0.3 and 0.2 in an
    # array: benchmarks/simulate.py ray-costs), and 4 bytes a token in the driver instead of 40
    completion_ids: Sequence[int]
    # behaviour log-probs of the sampled tokens, under logits / temperature: a float32 array from the
    # generator (one buffer to pickle through the driver, where a list is a Python float a token)
    logprobs: Sequence[float]
    # the policy version that produced each completion token (-1: a tool turn's token); a list,
    # or OneVersion once unpickled when every token has the same
    versions: Sequence[int]
    finish_reason: str  # "stop" (EOS), "length", or "max_turns" (an episode's last turn called a tool)
    text: str = ""
    columns: dict[str, Any] = field(default_factory=dict)  # dataset columns (e.g. solution) for rewards
    scores: dict[str, float | None] = field(default_factory=dict)  # per reward function
    reward: float = 0.0
    advantage: float | list[float] = 0.0
    ref_logprobs: Sequence[float] | None = None  # the reference's, a float32 array (batching.completion_logprobs)
    teacher_logprobs: Sequence[float] | None = None  # the teacher's of the same tokens (teacher.model), as ref_logprobs
    # Multi-turn episodes (actors/episodes.py); None / defaults for one-turn completions.
    loss_mask: list[int] | None = None  # 1: a model token, 0: a tool turn's token (context only)
    messages: list[dict] | None = None  # the trajectory as assistant and tool messages (what rewards see)
    turns: int = 1
    tool_calls: int = 0
    tool_errors: int = 0
    tool_time_s: float = 0.0

    @property
    def model_versions(self) -> list[int]:
        """The policy version of each model token (tool turns' tokens left out)."""
        return [v for v in self.versions if v >= 0]

    @property
    def version(self) -> int:
        """The oldest policy version that contributed a token (what staleness is measured on)."""
        return self.version_range()[0]

    @property
    def newest_version(self) -> int:
        """The newest policy version that contributed a token (above ``version``: interrupted by
        a weight update and continued)."""
        return self.version_range()[1]

    def version_range(self) -> tuple[int, int]:
        """(oldest, newest) version of the model tokens (-1, -1 for none): O(tokens) once per
        length of ``versions``. The generator computes it before it returns the rollout, and the
        result travels with it (pickled in ``__dict__``), so that the driver, which reads it for
        every rollout, never walks the tokens."""
        seen = self.__dict__.get("_versions")
        if seen is None or seen[0] != len(self.versions):
            oldest = min(filter((0).__le__, self.versions), default=-1)  # (tool turns' tokens are -1)
            seen = self.__dict__["_versions"] = (len(self.versions), oldest, max(self.versions, default=-1))
        return seen[1], seen[2]

    def __getstate__(self) -> dict:
        """What pickling sends: ``versions`` as ``(version, count)`` when every token has the
        same version (all but a continued partial rollout's or a tool episode's), so that the
        driver, which every rollout passes through, unpickles two numbers instead of one per
        token (about 18 ns each on this machine: ``benchmarks/simulate.py ray-costs``)."""
        v = self.versions
        if (type(v) is OneVersion and v.n > 2) or (len(v) > 2 and type(v) is list and v.count(v[0]) == len(v)):
            state = dict(self.__dict__)
            state["versions"] = (v[0], len(v))
            return state
        return self.__dict__

    def __setstate__(self, state: dict) -> None:
        v = state["versions"]
        if type(v) is tuple:  # (version, count): see __getstate__; held as two numbers too
            state = {**state, "versions": OneVersion(*v)}
        self.__dict__.update(state)

    def for_scoring(self) -> "Rollout":
        """This rollout without what no reward reads (the prompt's tokens, the log-probs and
        versions, the loss mask): what the driver sends a scorer (a third of the numbers). (Its
        fields copied: ``dataclasses.replace`` took 4.1 µs a rollout here, this 1.3 µs.)"""
        slim = object.__new__(Rollout)
        slim.__dict__ = {**self.__dict__, "prompt_ids": [], "logprobs": [], "versions": [], "loss_mask": None}
        slim.__dict__.pop("_versions", None)  # (the cached range of the versions left behind)
        return slim


@dataclass
class TrainSample:
    """What the learner (and the reference) needs of one rollout: tokens, behaviour log-probs,
    the advantage, and the reference log-probs once the reference has computed them."""

    prompt_ids: list[int]
    completion_ids: Sequence[int]  # (an int32 array from the generator, or a list)
    logprobs: Sequence[float] = field(default_factory=list)  # (a float32 array from the generator, or a list)
    advantage: float | list[float] = 0.0  # one per sample, or one per completion token (REINFORCE++)
    ref_logprobs: Sequence[float] | None = None  # a float32 array from the reference, or a list
    in_loss: bool = True  # False: kept out of the loss (a truncated completion, mask_truncated_completions)
    loss_mask: list[int] | None = None  # per completion token: 0 keeps a tool turn's token out of the loss

    @property
    def loss_tokens(self) -> int:
        """Completion tokens the loss sees (0 when the sample is out of the loss)."""
        if not self.in_loss:
            return 0
        return len(self.completion_ids) if self.loss_mask is None else sum(self.loss_mask)

    @classmethod
    def of(cls, r: Rollout) -> "TrainSample":
        return cls(r.prompt_ids, r.completion_ids, r.logprobs, r.advantage, r.ref_logprobs, loss_mask=r.loss_mask)
