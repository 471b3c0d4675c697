"""Turn one TRL completion into the text a reward function reads.

TRL hands reward functions either plain strings (standard datasets) or
conversational completions, `[{"role": "assistant", "content": ...}]`.
Every reward here goes through `text_of` so both shapes score the same.
"""

from __future__ import annotations

from typing import Any


def text_of(completion: Any) -> str:
    """The text of one completion, whatever shape TRL gave it."""
    if completion is None:
        return ""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return _content_text(completion.get("content"))
    if isinstance(completion, (list, tuple)):
        if not completion:
            return ""
        # The last message is the model's final turn; for the usual
        # single-message completion it is also the first.
        return text_of(completion[-1])
    return str(completion)


def _content_text(content: Any) -> str:
    # Multimodal chat templates store content as a list of typed parts.
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return "" if content is None else str(content)


def texts(completions: list) -> list[str]:
    return [text_of(c) for c in completions]


def column(kwargs: dict, name: str, reward: str) -> list:
    """A dataset column the reward needs, with an error that names both."""
    if name not in kwargs or kwargs[name] is None:
        raise ValueError(
            f"reward '{reward}' needs the dataset column '{name}', "
            f"but it was called with: {sorted(kwargs)}"
        )
    return kwargs[name]
