"""Penalties on how a completion is written, not on whether it is right:
`repetition_penalty` (n-gram repeats) and `soft_overlong_punishment`
(DAPO's length penalty on token count).
"""

from __future__ import annotations

from . import _checks
from ._content import column, texts


def make_repetition_penalty(ngram_size: int = 3, max_penalty: float = -1.0, language: str = "en"):
    """N-gram repetition penalty, Appendix C.2 of arXiv:2502.03373.

    Score = (1 - distinct n-grams / n-grams) * max_penalty, so 0 for no
    repetition and `max_penalty` (<= 0) for text that only repeats itself.
    Defaults are Open-R1's recipe values (repetition_n_grams=3,
    repetition_max_penalty=-1.0).
    """
    ngram_size = _checks.integer("repetition_penalty", "ngram_size", ngram_size, minimum=1)
    max_penalty = _checks.number("repetition_penalty", "max_penalty", max_penalty)
    if max_penalty > 0:
        raise ValueError(
            f"reward 'repetition_penalty': parameter 'max_penalty' must not be positive, got {max_penalty}"
        )
    if language != "en":
        # Open-R1 splits Chinese with jieba; we only split on whitespace.
        raise ValueError(f"reward 'repetition_penalty': parameter 'language' accepts only 'en', got {language!r}")

    def repetition_penalty_reward(completions, **kwargs) -> list[float]:
        rewards = []
        for text in texts(completions):
            words = text.lower().split()
            if len(words) < ngram_size:
                rewards.append(0.0)
                continue
            ngrams = [tuple(words[i : i + ngram_size]) for i in range(len(words) - ngram_size + 1)]
            rewards.append((1 - len(set(ngrams)) / len(ngrams)) * max_penalty)
        return rewards

    return repetition_penalty_reward


def make_soft_overlong_punishment(max_completion_len: int = 16384, soft_punish_cache: int = 4096):
    """DAPO's soft overlong punishment, Eq. (13) of arXiv:2503.14476.

    With L = max_completion_len and C = soft_punish_cache, a completion of
    n tokens scores 0 when n <= L - C, (L - C - n) / C inside the cache,
    and -1 past L. Reads the `completion_ids` column (token counts), not
    the text. Defaults are Open-R1's.
    """
    name = "soft_overlong_punishment"
    max_completion_len = _checks.integer(name, "max_completion_len", max_completion_len, minimum=1)
    soft_punish_cache = _checks.integer(name, "soft_punish_cache", soft_punish_cache, minimum=0)
    if soft_punish_cache > max_completion_len:
        raise ValueError(
            f"reward '{name}': parameter 'soft_punish_cache' ({soft_punish_cache}) must not exceed "
            f"'max_completion_len' ({max_completion_len})"
        )
    threshold = max_completion_len - soft_punish_cache

    def soft_overlong_punishment_reward(completions=None, **kwargs) -> list[float]:
        rewards = []
        for ids in column(kwargs, "completion_ids", name):
            n = len(ids)
            if n <= threshold:
                rewards.append(0.0)
            elif n <= max_completion_len:  # only reachable when the cache is > 0
                rewards.append((threshold - n) / soft_punish_cache)
            else:
                rewards.append(-1.0)
        return rewards

    return soft_overlong_punishment_reward
