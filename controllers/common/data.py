"""Datasets -> prompts for the generator and (prompt, completion) token pairs for SFT.

``prepare_data`` loads the splits and checks them against the recipe before Ray starts (the
CLI's ``check`` and ``train`` call it); a problem is a ``ConfigError`` that names the key, the
value, the split and row, and what is accepted.
"""
from __future__ import annotations

import logging
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ...actors.episodes import load_environment, opening_messages
from ...actors.packing import SftExample
from ...actors.tools import schemas
from ..config import TINY, DataConfig, Recipe
from ..config.schema import ConfigError
from .chat import render_conversation
from .data_check import check_data_file, check_local_path

log = logging.getLogger("r1ray")
CHUNK = 1024  # rows read and tokenised per batch call
ACCEPTED_PATHS = ("a folder written by datasets.save_to_disk, a jsonl / json / parquet / csv file (its train split) or "
                  "a folder of them named by split (train.jsonl, test.jsonl), a hub dataset name, or 'tiny'")


@dataclass
class PreparedData:
    """The checked splits. Dropped rows are gone from ``train``/``test``; ``train_rows[i]`` is
    the original row index of ``train[i]``, so prompt ids (``train-<row>.<epoch>``,
    ``test-<row>``) keep naming rows of the dataset on disk."""

    train: Any  # datasets.Dataset
    test: Any  # datasets.Dataset; unchecked (0 rows if absent) when neither the evaluation nor the SFT probe uses it
    train_rows: Sequence[int]
    test_rows: Sequence[int]
    dropped: dict[str, int] = field(default_factory=dict)  # "train/prompt_too_long" -> rows left out
    prompt_tokens: dict[str, list[int]] = field(default_factory=dict)  # split role -> rendered length per kept row
    time_s: float = 0.0

    def test_id(self, i: int) -> str:
        return f"test-{self.test_rows[i]}"

    def summary(self) -> dict:
        out: dict = {"train_rows": len(self.train), "test_rows": len(self.test), "dropped": dict(self.dropped),
                     "check_s": round(self.time_s, 3)}
        for role, lengths in self.prompt_tokens.items():
            if lengths:
                out[f"{role}_prompt_tokens_max"] = max(lengths)
                out[f"{role}_prompt_tokens_mean"] = round(sum(lengths) / len(lengths), 1)
        return out


def prepare_data(recipe: Recipe, tokenizer, tiny_dir: Path | None) -> PreparedData:
    """Load ``recipe.data`` and check every rule the run depends on (see ``_Need``); rows that
    break one are refused or dropped as ``data.on_invalid_row`` says."""
    t0 = time.perf_counter()
    cfg = recipe.data
    ds = load_dataset_dict(cfg, tiny_dir)
    renderer = PromptRenderer(tokenizer, cfg, recipe.rollout.tools, recipe.rollout.environment)
    needs = [_Need.train(recipe), _Need.test(recipe)]
    cache: dict[str, list] = {}  # split name -> rendered prompt lengths (a split may be both train and test)
    out: dict[str, tuple] = {}
    for need in needs:
        if not need.used and need.split not in ds:
            out[need.role] = None
            continue
        split = _split(ds, cfg, need)
        if not need.used:
            out[need.role] = (split, range(len(split)), Counter(), [])
            continue
        for col_key in need.columns:
            col = getattr(cfg, col_key.split(".")[1])
            if col not in split.column_names:
                raise ConfigError(f"config key '{col_key}': got {col!r}; accepted: a column of split "
                                  f"{need.split!r} of {cfg.path} (it has: {', '.join(split.column_names)})")
        if need.role == "train" and recipe.grpo.steps > 0:
            _check_judge_columns(recipe, split, need)
        if len(split) == 0:
            raise ConfigError(f"config key '{need.split_key}': split {need.split!r} of {cfg.path} has no rows; "
                              f"accepted: a split with at least one row (needed because {need.why})")
        out[need.role] = _scan(split, need, renderer, cache)
    train, kept, counts, lengths = out["train"]
    if out["test"] is None:
        test, test_kept, test_counts, test_lengths = train.select([]), range(0), Counter(), []
    else:
        test, test_kept, test_counts, test_lengths = out["test"]
    dropped = dict(counts + test_counts)
    if dropped:
        log.warning("data: dropped invalid rows (data.on_invalid_row=drop): %s",
                    ", ".join(f"{k}={v}" for k, v in sorted(dropped.items())))
    kept, test_kept = _rows(train, kept), _rows(test, test_kept)
    data = PreparedData(_keep(train, kept), _keep(test, test_kept), kept, test_kept, dropped,
                        {"train": lengths, **({"test": test_lengths} if needs[1].used else {})})
    _check_enough(recipe, data, needs)
    data.time_s = time.perf_counter() - t0
    return data


def load_dataset_dict(cfg: DataConfig, tiny_dir: Path | None):
    """The tiny world, a ``save_to_disk`` folder, or a hub dataset. A path that looks local is
    never looked up on the hub: a typo there would otherwise read as a missing hub dataset."""
    import datasets

    if cfg.path == TINY:
        if tiny_dir is None:
            raise ConfigError("config key 'data.path': got 'tiny' but the tiny world was not built; "
                              "accepted: 'tiny' with the tiny world built first (r1ray tiny)")
        where = Path(tiny_dir) / "data"
    elif _looks_local(cfg.path):
        where = Path(cfg.path).expanduser()
        if not where.exists():
            parent = next((q for q in where.parents if q.exists()), None)
            raise ConfigError(f"config key 'data.path': got {cfg.path!r}: {where} does not exist"
                              f"{f' (the nearest existing folder is {parent})' if parent else ''}; "
                              f"accepted: {ACCEPTED_PATHS}")
        check_local_path(where, "data.path", ACCEPTED_PATHS)
    else:
        try:
            return datasets.load_dataset(cfg.path, cfg.name)
        except Exception as e:  # noqa: BLE001 - offline, unknown name, bad config name: all the user's to fix
            raise ConfigError(f"config key 'data.path': got {cfg.path!r} (data.name={cfg.name!r}): the hub dataset "
                              f"could not be loaded ({_first_line(e)}); accepted: {ACCEPTED_PATHS} (a hub dataset "
                              "must be reachable, or in the local cache when offline)") from None
    files = _data_files(where)
    if files is not None:
        for split, file in files[1].items():
            if Path(file).stat().st_size == 0:
                key = {cfg.train_split: "data.train_split", cfg.test_split: "data.test_split"}.get(split, "data.path")
                raise ConfigError(f"config key '{key}': split {split!r} of {cfg.path} has no rows ({file} is empty); "
                                  "accepted: a split with at least one row")
            check_data_file(Path(file), "data.path", ACCEPTED_PATHS)
        try:
            return datasets.load_dataset(files[0], data_files=files[1])
        except Exception as e:  # noqa: BLE001 - unreadable or malformed files: the user's to fix
            raise ConfigError(f"config key 'data.path': got {cfg.path!r}: the {files[0]} files could not be read "
                              f"({_first_line(e)}); accepted: {ACCEPTED_PATHS}") from None
    try:
        ds = datasets.load_from_disk(str(where))
    except Exception as e:  # noqa: BLE001 - a folder that is not a saved dataset, or a damaged one
        _refuse_empty_saved_split(cfg, where)
        raise ConfigError(f"config key 'data.path': got {cfg.path!r}: datasets.load_from_disk({str(where)!r}) failed "
                          f"({_first_line(e)}); accepted: {ACCEPTED_PATHS}") from None
    if not isinstance(ds, datasets.DatasetDict):
        raise ConfigError(f"config key 'data.path': got {cfg.path!r}: {where} holds a single Dataset without splits; "
                          "accepted: a DatasetDict saved with save_to_disk, with the splits named by "
                          "data.train_split and data.test_split")
    return ds


_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def _data_files(where: Path, key: str = "data.path") -> tuple[str, dict] | None:
    """(datasets builder, split -> files) for a data file (its one split is "train") or a folder
    of files named by split (train.jsonl, test.parquet, ...); None for a save_to_disk folder.
    A file of another kind, or a folder mixing kinds, is refused."""
    if where.is_file():
        builder = _BUILDERS.get(where.suffix.lower())
        if builder is None:
            raise ConfigError(f"config key '{key}': {where} is a {where.suffix or 'extension-less'} file; accepted: "
                              f"{ACCEPTED_PATHS}")
        return builder, {"train": str(where)}
    if (where / "dataset_dict.json").exists() or (where / "state.json").exists():
        return None
    found = {p.stem: p for p in sorted(where.iterdir()) if p.suffix.lower() in _BUILDERS and p.is_file()}
    if not found:
        return None
    builders = {_BUILDERS[p.suffix.lower()] for p in found.values()}
    if len(builders) > 1:
        raise ConfigError(f"config key '{key}': {where} mixes data files of several kinds "
                          f"({', '.join(p.name for p in found.values())}); accepted: the splits as files of one "
                          "kind (train.jsonl, test.jsonl, ...)")
    return builders.pop(), {split: str(p) for split, p in found.items()}


def _refuse_empty_saved_split(cfg: DataConfig, where: Path) -> None:
    """``datasets`` saves an empty split with no data files and then cannot load the folder back
    (an IndexError): name the split instead."""
    import json

    for state in sorted(where.glob("*/state.json")):
        try:
            empty = json.loads(state.read_text()).get("_data_files") == []
        except (OSError, ValueError):
            continue
        if empty:
            split = state.parent.name
            key = {cfg.train_split: "data.train_split", cfg.test_split: "data.test_split"}.get(split, "data.path")
            raise ConfigError(f"config key '{key}': split {split!r} of {cfg.path} has no rows (saved without data "
                              "files, which datasets.load_from_disk cannot read back); accepted: a split with at "
                              "least one row")


def _looks_local(path: str) -> bool:
    """A path on this machine, not a hub name (``owner/name``: one slash, no leading dot)."""
    if path.startswith(("/", ".", "~")) or path.count("/") > 1:
        return True
    p = Path(path).expanduser()
    return p.exists() or (p.parent != Path(".") and p.parent.exists())


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


@dataclass
class _Need:
    """What the run asks of one split: which columns, which row rules, and the prompt token limit."""

    role: str  # "train" or "test"
    split: str
    used: bool
    why: str  # which recipe keys make the split needed
    columns: tuple[str, ...]  # config keys of the columns it must have
    prompts: bool  # the prompt/solution row rules apply
    messages: bool  # the SFT messages rule applies
    limit: int = 0  # most tokens a rendered prompt may have
    limit_text: str = ""
    policy: str = "refuse"

    @property
    def split_key(self) -> str:
        return f"data.{self.role}_split"

    @staticmethod
    def train(r: Recipe) -> "_Need":
        grpo, sft = r.grpo.steps > 0, r.sft.steps > 0
        cols = ((("data.prompt_column", "data.solution_column") if grpo else ())
                + (("data.messages_column",) if sft else ()))
        why = (" and ".join([f"grpo.steps={r.grpo.steps}"] * grpo + [f"sft.steps={r.sft.steps}"] * sft)
               or "every run reads it")
        budget = r.rollout.budget(r.sampling.max_new_tokens)
        limit = r.generator.max_model_len - budget
        return _Need("train", r.data.train_split, True, why, cols, grpo, sft, limit,
                     f"generator.max_model_len={r.generator.max_model_len} - "
                     + (f"rollout.max_total_tokens={budget}" if r.rollout.tools and r.rollout.max_total_tokens
                        else f"sampling.max_new_tokens={r.sampling.max_new_tokens}"), r.data.on_invalid_row)

    @staticmethod
    def test(r: Recipe) -> "_Need":
        evals, probe = r.eval.num_prompts > 0, bool(r.sft.steps and r.sft.stop_at_pass_rate)
        # The evaluation samples eval.max_new_tokens (default sampling's), the SFT probe sampling's: the stricter wins.
        key, budget = "sampling.max_new_tokens", r.sampling.max_new_tokens
        if evals and r.eval.max_new_tokens is not None and (not probe or r.eval.max_new_tokens > budget):
            key, budget = "eval.max_new_tokens", r.eval.max_new_tokens
        if budget >= r.generator.max_model_len and evals:
            raise ConfigError(f"config key '{key}': got {budget}; accepted: fewer than "
                              f"generator.max_model_len={r.generator.max_model_len}")
        why = " and ".join([f"eval.num_prompts={r.eval.num_prompts}"] * evals +
                           [f"sft.stop_at_pass_rate={r.sft.stop_at_pass_rate}"] * probe)
        return _Need("test", r.data.test_split, evals or probe, why, ("data.prompt_column", "data.solution_column"),
                     True, False, r.generator.max_model_len - budget,
                     f"generator.max_model_len={r.generator.max_model_len} - {key}={budget}", r.data.on_invalid_row)


def _check_judge_columns(recipe: Recipe, split, need: _Need) -> None:
    """A ``judge`` reward whose template shows the reference answer reads it from its
    ``reference_column``: refused up front when the train split has no such column."""
    from ...actors.scorer import check_specs

    for i, (spec, fn) in enumerate(zip(recipe.rewards, check_specs(recipe.rewards))):
        col = getattr(fn, "reference_column", None)
        if spec.name == "judge" and getattr(fn, "uses_reference", False) and col not in split.column_names:
            raise ConfigError(f"config key 'rewards[{i}].params.reference_column': got {col!r}; accepted: a column "
                              f"of split {need.split!r} of {recipe.data.path} (it has: {', '.join(split.column_names)}), "
                              "or a template without {{ reference }}")


def _split(ds, cfg: DataConfig, need: _Need):
    if need.split not in ds:
        raise ConfigError(f"config key '{need.split_key}': got {need.split!r}; accepted: a split of {cfg.path} "
                          f"(it has: {', '.join(ds) or 'no splits'}; needed because {need.why})")
    return ds[need.split]


def _scan(split, need: _Need, renderer: "PromptRenderer", cache: dict) -> tuple:
    """One streamed pass over ``split`` in ``CHUNK``-row batches: the cheap rules per row, then
    the rendered prompts' lengths with one batched tokeniser call per chunk. Returns (split,
    kept original row indices, drop counts, the kept rows' prompt lengths)."""
    cfg = renderer.cfg
    cols = (([cfg.prompt_column, cfg.solution_column] if need.prompts else [])
            + ([cfg.messages_column] if need.messages else []))
    cached = cache.get(need.split) if need.prompts else None
    all_lengths: list = []
    kept, counts, kept_lengths = [], Counter(), []
    if cols:
        batches = split.select_columns(list(dict.fromkeys(cols))).iter(batch_size=CHUNK)
    else:  # no row rule applies: only the row count matters
        batches = ({} for _ in range(0, len(split), CHUNK))
    for start, batch in zip(range(0, len(split), CHUNK), batches):
        n = min(CHUNK, len(split) - start)
        problems = [_row_problem(need, cfg, {c: batch[c][j] for c in cols}) for j in range(n)]
        lengths = [None] * n
        if need.prompts:
            if cached is not None:
                lengths = cached[start:start + n]
            else:
                lengths = _prompt_lengths(renderer, batch[cfg.prompt_column])
            all_lengths.extend(lengths)
        for j in range(n):
            problem = problems[j]
            if problem is None and lengths[j] is not None and lengths[j] > need.limit:
                value = batch[cfg.prompt_column][j]
                problem = ("prompt_too_long", "data.prompt_column", value,
                           f"the rendered prompt (chat template applied) has {lengths[j]} tokens, more than the "
                           f"{need.limit} the generator takes ({need.limit_text})",
                           f"prompts that render to at most {need.limit} tokens (raise generator.max_model_len or "
                           f"lower the new-token budget)")
            if problem is None:
                kept.append(start + j)
                kept_lengths.append(lengths[j])
            elif need.policy == "drop":
                counts[f"{need.role}/{problem[0]}"] += 1
            else:
                raise _row_error(need, start + j, cfg, *problem)
    if need.prompts and cached is None:
        cache[need.split] = all_lengths
    return split, kept, counts, kept_lengths if need.prompts else []


def _prompt_lengths(renderer: "PromptRenderer", prompts: list) -> list:
    """Token counts of the prompts exactly as ``PromptRenderer.prompt`` renders them (None
    where the prompt is not a usable string): one batched template-and-tokenise call."""
    todo = [j for j, p in enumerate(prompts) if _usable_text(p)]
    out: list = [None] * len(prompts)
    if todo:
        msgs = [renderer.messages({renderer.cfg.prompt_column: prompts[j]}) for j in todo]
        ids = renderer.tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True,
                                               return_dict=True)["input_ids"]
        for j, row_ids in zip(todo, ids):
            out[j] = len(row_ids)
    return out


def _usable_text(v) -> bool:
    return isinstance(v, str) and bool(v.strip())


def _row_problem(need: _Need, cfg: DataConfig, row: dict) -> tuple | None:
    """(rule, column key, value, what is wrong, what is accepted) for the first rule ``row`` breaks."""
    if need.prompts:
        v = row[cfg.prompt_column]
        if not _usable_text(v):
            what = "the prompt is empty" if isinstance(v, str) else f"the prompt is not a string ({type(v).__name__})"
            return "empty_prompt", "data.prompt_column", v, what, "a non-empty string"
        v = row[cfg.solution_column]
        if v is None or (isinstance(v, str) and not v.strip()):
            return ("empty_solution", "data.solution_column", v, "the solution is missing",
                    "a non-empty solution (the accuracy reward compares against it)")
    if need.messages:
        v = row[cfg.messages_column]
        what = _messages_problem(v, cfg.system_prompt is not None)
        if what:
            return ("bad_messages", "data.messages_column", v, what,
                    "a non-empty list of {role, content} messages (strings) ending with the assistant's turn, "
                    "with at least one message before it unless data.system_prompt is set")
    return None


def _messages_problem(msgs, has_system: bool) -> str | None:
    if not isinstance(msgs, (list, tuple)) or not msgs:
        return "the messages are not a non-empty list"
    for j, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            return f"message {j} is not a {{role, content}} mapping of strings"
    if msgs[-1]["role"] != "assistant":
        return f"the last message's role is {msgs[-1]['role']!r}, not 'assistant'"
    if len(msgs) == 1 and not has_system:
        return "there is only the assistant's turn, no prompt before it"
    return None


def _row_error(need: _Need, row: int, cfg: DataConfig, rule: str, key: str, value, what: str,
               accepted: str) -> ConfigError:
    col = getattr(cfg, key.split(".")[1])
    return ConfigError(f"data rule '{rule}': split {need.split!r} ({need.split_key}) row {row}, column {col!r} "
                       f"({key}): {what}; value: {_preview(value)}; accepted: {accepted}, "
                       "or data.on_invalid_row=drop to leave such rows out")


def _preview(v, width: int = 60) -> str:
    if isinstance(v, str):
        return repr(v) if len(v) <= width else f"{v[:width]!r}... ({len(v)} chars)"
    text = repr(v)
    return text if len(text) <= width else f"{text[:width]}... ({len(text)} chars as text)"


def _rows(split, kept: Sequence[int]) -> Sequence[int]:
    return range(len(split)) if len(kept) == len(split) else kept  # nothing dropped: no 220k-int list to carry


def _keep(split, kept: Sequence[int]):
    return split if len(kept) == len(split) else split.select(kept)


def _check_enough(r: Recipe, data: PreparedData, needs: list[_Need]) -> None:
    """After drops: enough rows left for one step of each phase, and for the SFT probe."""
    def left(role: str) -> str:
        gone = {k: v for k, v in data.dropped.items() if k.startswith(role + "/")}
        return f" after dropping {sum(gone.values())} ({', '.join(f'{k}={v}' for k, v in sorted(gone.items()))})" \
            if gone else ""

    n = len(data.train)
    if n == 0:
        raise ConfigError(f"config key 'data.train_split': split {r.data.train_split!r} has no usable rows"
                          f"{left('train')}; accepted: a split with at least one valid row")
    if r.grpo.steps and n < r.grpo.prompts_per_step:
        raise ConfigError(f"config key 'grpo.prompts_per_step': got {r.grpo.prompts_per_step}, but split "
                          f"{r.data.train_split!r} has {n} usable prompts{left('train')}; accepted: at most {n}, "
                          "or a dataset with more valid rows")
    if r.sft.steps and n < r.sft.batch_size:
        raise ConfigError(f"config key 'sft.batch_size': got {r.sft.batch_size}, but split {r.data.train_split!r} has "
                          f"{n} rows with valid SFT messages{left('train')}; accepted: at most {n}, "
                          "or a dataset with more valid rows")
    if needs[1].used and len(data.test) == 0:
        raise ConfigError(f"config key 'data.test_split': split {r.data.test_split!r} has no usable rows"
                          f"{left('test')}; accepted: a split with at least one valid row (needed because "
                          f"{needs[1].why})")
    if r.sft.steps and r.sft.stop_at_pass_rate and len(data.test) <= r.eval.num_prompts:
        raise ConfigError(f"config key 'sft.stop_at_pass_rate': got {r.sft.stop_at_pass_rate}, but no held-out "
                          f"prompts are left for the probe (split {r.data.test_split!r} has {len(data.test)} usable "
                          f"rows{left('test')} and eval.num_prompts={r.eval.num_prompts} uses them); accepted: fewer "
                          "eval prompts, or null")


class PromptRenderer:
    """Chat-template rendering and tokenisation, done once per prompt in the driver."""

    def __init__(self, tokenizer, cfg: DataConfig, tools: list[str] | None = None, environment: str | None = None):
        """``tools``: the recipe's ``rollout.tools``, rendered into every prompt through the chat
        template's ``tools=`` (their JSON schemas). ``environment``: ``rollout.environment``,
        whose ``reset(row)`` gives a prompt's messages instead of ``data.prompt_column``."""
        self.tok, self.cfg = tokenizer, cfg
        self.tools = schemas(tools) if tools else None
        self.env_class = load_environment(environment) if environment else None

    def messages(self, row: dict) -> list[dict]:
        if self.env_class is not None:
            return opening_messages(self.env_class, row, self.cfg.system_prompt)
        msgs = [{"role": "system", "content": self.cfg.system_prompt}] if self.cfg.system_prompt else []
        return msgs + [{"role": "user", "content": row[self.cfg.prompt_column]}]

    def prompt(self, row: dict, prompt_id: str) -> dict:
        msgs = self.messages(row)
        ids = self.tok.apply_chat_template(msgs, tools=self.tools, add_generation_prompt=True, tokenize=True,
                                           return_dict=False)
        columns = {k: v for k, v in row.items() if k != self.cfg.messages_column}
        columns["prompt"] = msgs
        return {"prompt_id": prompt_id, "prompt_ids": list(ids), "columns": columns}

    def sft_example(self, row: dict) -> SftExample:
        """The row's conversation rendered with the chat template, every assistant turn trained."""
        return render_conversation(self.tok, row[self.cfg.messages_column], self.cfg.system_prompt, self.tools)


@dataclass
class EpochSampler:
    """Shuffled passes over the train split; ids stay unique across passes (``train-<row>.<epoch>``).
    ``take`` yields positions in the (possibly row-dropped) split; with ``rows`` (``PreparedData.train_rows``)
    the id's ``<row>`` is the original row index."""

    size: int
    seed: int
    rows: Sequence[int] | None = None

    def __post_init__(self):
        self.epoch, self.pos, self.order = 0, 0, []
        self._reshuffle()

    def _reshuffle(self):
        self.order = list(range(self.size))
        random.Random(self.seed * 1_000_003 + self.epoch).shuffle(self.order)

    @property
    def taken(self) -> int:
        """Prompts handed out so far (what ``seek`` restores)."""
        return self.epoch * self.size + self.pos

    def seek(self, taken: int) -> None:
        """Continue as a sampler that has handed out ``taken`` prompts (a resumed run)."""
        self.epoch, self.pos = divmod(taken, self.size) if self.size else (0, 0)
        self._reshuffle()

    def take(self, n: int) -> list[tuple[int, str]]:
        out = []
        while len(out) < n:
            if self.pos == len(self.order):
                self.epoch, self.pos = self.epoch + 1, 0
                self._reshuffle()
            idx = self.order[self.pos]
            out.append((idx, f"train-{idx if self.rows is None else self.rows[idx]}.{self.epoch}"))
            self.pos += 1
        return out
