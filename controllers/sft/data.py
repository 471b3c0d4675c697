"""SFT data: conversations cut to the sequence budget, and the held-out conversations."""
from __future__ import annotations

from dataclasses import dataclass, field

from ...actors.packing import SftExample
from ..common.data import PromptRenderer
from ..config import ConfigError, Recipe


@dataclass
class Truncation:
    """Examples cut to ``max_seq_length`` tokens, and the trained tokens that were lost."""

    examples: int = 0
    tokens_lost: int = 0
    dropped: list[int] = field(default_factory=list)  # rows left with nothing to train after the cut


def truncate(example: SftExample, max_len: int, row: int, counts: Truncation) -> SftExample | None:
    """The first ``max_len`` tokens (counted in ``counts``); None when no trained token is left."""
    if len(example.ids) <= max_len:
        return example
    counts.examples += 1
    counts.tokens_lost += sum(example.trained[max_len:])
    cut = SftExample(example.ids[:max_len], example.trained[:max_len])
    if cut.targets == 0:
        counts.dropped.append(row)
        return None
    return cut


def held_out_examples(recipe: Recipe, data_dir_split, renderer: PromptRenderer) -> list:
    """The first ``sft.eval_examples`` conversations of the test split, rendered; a bad one is
    refused naming its row and column (before any actor starts)."""
    if not recipe.sft.eval_every:
        return []
    if data_dir_split is None:
        raise ConfigError(f"config key 'data.test_split': got {recipe.data.test_split!r}, which {recipe.data.path} does "
                          f"not have; accepted: a split of held-out conversations (needed because sft.eval_every="
                          f"{recipe.sft.eval_every}), or sft.eval_every 0")
    col = recipe.data.messages_column
    if col not in data_dir_split.column_names:
        raise ConfigError(f"config key 'data.messages_column': got {col!r}; accepted: a column of split "
                          f"{recipe.data.test_split!r} (it has: {', '.join(data_dir_split.column_names)}; needed because "
                          f"sft.eval_every={recipe.sft.eval_every})")
    out, counts = [], Truncation()
    for i in range(min(recipe.sft.eval_examples, len(data_dir_split))):
        try:
            e = renderer.sft_example(data_dir_split[i])
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise ConfigError(f"split {recipe.data.test_split!r} (data.test_split) row {i}, column {col!r} "
                              f"(data.messages_column): {err}; accepted: a list of {{role, content}} messages with "
                              "an assistant turn") from None
        e = truncate(e, recipe.sft.max_seq_length, i, counts) if recipe.sft.max_seq_length else e
        if e is not None:
            out.append(e)
    if not out:
        raise ConfigError(f"config key 'sft.eval_every': got {recipe.sft.eval_every} but split "
                          f"{recipe.data.test_split!r} has no conversation to compute a held-out loss on; accepted: 0, "
                          "or a test split with conversations")
    return out
