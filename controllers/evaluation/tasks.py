"""Benchmark tasks: where their problems come from, and how each becomes a prompt.

Defaults follow Open-R1's evaluation (lighteval custom tasks, README protocol): MATH-500
(HuggingFaceH4/MATH-500, test, n=4), AIME 2024 (HuggingFaceH4/aime_2024, n=64), AIME 2025
(yentinglin/aime_2025, n=64), GPQA-Diamond (Idavidrein/gpqa, gpqa_diamond, n=8, options
shuffled and asked with Open-R1's template). A task's ``path`` may instead name a local file
or folder with the same columns, so evaluation also runs offline. Everything here is checked
before any actor starts: a missing column, an empty task or a prompt that does not fit the
generator is refused naming the task key.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from ...actors.episodes import load_environment, opening_messages
from ...actors.tools import schemas
from ..config import EvalTaskConfig, Recipe
from ..config.schema import ConfigError


@dataclass(frozen=True)
class Preset:
    kind: str  # "math" | "choice"
    path: str | None
    subset: str | None
    split: str
    problem_column: str
    answer_column: str
    num_samples: int


PRESETS = {
    "math_500": Preset("math", "HuggingFaceH4/MATH-500", None, "test", "problem", "answer", 4),
    "aime24": Preset("math", "HuggingFaceH4/aime_2024", None, "train", "problem", "answer", 64),
    "aime25": Preset("math", "yentinglin/aime_2025", None, "train", "problem", "answer", 64),
    "gpqa_diamond": Preset("choice", "Idavidrein/gpqa", "gpqa_diamond", "train", "Question", "Correct Answer", 8),
    "heldout": Preset("math", None, None, "test", "problem", "solution", 1),
    "generic": Preset("math", None, None, "train", "problem", "answer", 1),
}
# GPQA's wrong options, as the dataset names them.
GPQA_WRONG = ("Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3")
# Open-R1's GPQA prompt (lighteval gpqa_prompt_fn).
GPQA_TEMPLATE = ("Answer the following multiple choice question. The last line of your response should be of the "
                 "following format: 'Answer: $LETTER' (without quotes) where LETTER is one of ABCD. Think step by "
                 "step before answering.\n\n{Question}\n\nA) {A}\nB) {B}\nC) {C}\nD) {D}")
JUDGES = {"math": "math_answer", "choice": "choice_answer"}  # rewards/answers.py


@dataclass
class Task:
    """A resolved task: its settings and its problems rendered as generator prompts."""

    name: str
    kind: str
    source: dict  # path, subset, split, columns: what the report records
    num_samples: int
    prompts: list[dict] = field(default_factory=list)  # prompt_id, prompt_ids, columns (answer, prompt)
    judge_name: str | None = None  # a reward function instead of the kind's judge (held-out pass@1)

    @property
    def judge(self) -> str:
        return self.judge_name or JUDGES[self.kind]


def resolve(cfg: EvalTaskConfig, recipe: Recipe) -> EvalTaskConfig:
    """The task's settings with its preset's defaults filled in (``heldout``: the recipe's data)."""
    p = PRESETS[cfg.task]
    if cfg.task == "heldout":
        d = recipe.data
        p = replace(p, path=d.path, subset=d.name, split=d.test_split, problem_column=d.prompt_column,
                    answer_column=d.solution_column)
    return replace(cfg, name=cfg.name or cfg.task, kind=cfg.kind or p.kind, path=cfg.path or p.path,
                   subset=cfg.subset if cfg.subset is not None else (p.subset if not cfg.path else None),
                   split=cfg.split or p.split, problem_column=cfg.problem_column or p.problem_column,
                   answer_column=cfg.answer_column or p.answer_column, num_samples=cfg.num_samples or p.num_samples)


def load_rows(cfg: EvalTaskConfig, key: str, tiny_dir: Path | None):
    """The task's split as a ``datasets.Dataset``: a local file or folder, else the hub."""
    import datasets

    from ..common.data import _data_files, _first_line, _looks_local
    from ..common.data_check import check_data_file, check_local_path
    from ..config import TINY

    path = cfg.path
    try:
        if path == TINY:
            if tiny_dir is None:
                raise ConfigError(f"config key '{key}.path': 'tiny' needs the tiny world (model.path or data.path tiny)")
            return datasets.load_from_disk(str(Path(tiny_dir) / "data"))[cfg.split]
        if _looks_local(path):
            where = Path(path).expanduser()
            accepted = "a jsonl, json, parquet or csv file, a save_to_disk folder, or a hub dataset name"
            if not where.exists():
                raise ConfigError(f"config key '{key}.path': got {path!r}: {where} does not exist; accepted: {accepted}")
            check_local_path(where, f"{key}.path", accepted)
            if where.is_dir():
                files = _data_files(where, f"{key}.path")  # a folder of split files (train.jsonl, test.jsonl, ...)
                if files is not None:
                    for file in files[1].values():
                        check_data_file(Path(file), f"{key}.path", accepted)
                    return datasets.load_dataset(files[0], data_files=files[1])[cfg.split]
                ds = datasets.load_from_disk(str(where))
                return ds[cfg.split] if isinstance(ds, datasets.DatasetDict) else ds
            builder = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}.get(where.suffix)
            if builder is None:
                raise ConfigError(f"config key '{key}.path': {where} is a {where.suffix or 'extension-less'} file; "
                                  f"accepted: {accepted}")
            check_data_file(where, f"{key}.path", accepted)
            return datasets.load_dataset(builder, data_files=str(where), split="train")
        return datasets.load_dataset(path, cfg.subset, split=cfg.split)
    except ConfigError:
        raise
    except KeyError:
        raise ConfigError(f"config key '{key}.split': got {cfg.split!r}: {path} has no such split") from None
    except Exception as e:  # noqa: BLE001 - offline, gated, unknown name: the user's to fix
        raise ConfigError(f"config key '{key}.path': got {path!r} (subset {cfg.subset!r}, split {cfg.split!r}): the "
                          f"dataset could not be loaded ({_first_line(e)}); accepted: a local file or folder with the "
                          "task's columns, or a hub dataset that is reachable or cached") from None


def normalise(problem: str) -> str:
    """A problem's text for the overlap check: case and whitespace do not make it new."""
    return re.sub(r"\s+", " ", str(problem)).strip().lower()


def choice_prompt(row: dict, cfg: EvalTaskConfig, seed: int, index: int) -> tuple[str, str]:
    """(GPQA question with the options in a fixed shuffled order, the right option's letter).
    The order depends only on the seed and the problem's position: every run and every
    checkpoint sees the same question."""
    wrong = [row.get(c) for c in GPQA_WRONG]
    options = [row[cfg.answer_column], *wrong]
    order = list(range(4))
    random.Random(f"{seed}:{index}").shuffle(order)
    shuffled = [options[i] for i in order]
    letter = "ABCD"[order.index(0)]
    text = GPQA_TEMPLATE.format(Question=str(row[cfg.problem_column]).strip(),
                                **{x: str(o).strip() for x, o in zip("ABCD", shuffled)})
    return text, letter


def load_task(cfg: EvalTaskConfig, index: int, recipe: Recipe, tokenizer, max_model_len: int,
              tiny_dir: Path | None = None, training_problems: set[str] | None = None) -> Task:
    """Load, check and render one task. ``training_problems`` (normalised): a task sharing a
    problem with the training data is refused."""
    key = f"eval.tasks[{index}]"
    cfg = resolve(cfg, recipe)
    if cfg.task == "heldout":  # the recipe's own data, loaded as training loads it
        from ..common.data import load_dataset_dict

        splits = load_dataset_dict(recipe.data, tiny_dir)
        if cfg.split not in splits:
            raise ConfigError(f"config key 'data.test_split': got {cfg.split!r}, which {recipe.data.path} does not have "
                              f"(it has: {', '.join(splits)}); accepted: a held-out split for {key} (heldout)")
        rows = splits[cfg.split]
    else:
        rows = load_rows(cfg, key, tiny_dir)
    needed = [cfg.problem_column, cfg.answer_column] + (list(GPQA_WRONG) if cfg.kind == "choice" else [])
    missing = [c for c in needed if c not in rows.column_names]
    if missing:
        raise ConfigError(f"config key '{key}' ({cfg.name}): the dataset has no column {', '.join(map(repr, missing))}; "
                          f"it has {', '.join(rows.column_names)}; accepted: {key}.problem_column / answer_column naming "
                          "existing columns" + (" (choice tasks also need GPQA's 'Incorrect Answer 1..3')"
                                                if cfg.kind == "choice" else ""))
    count = len(rows) if cfg.max_problems is None else min(cfg.max_problems, len(rows))
    if count == 0:
        raise ConfigError(f"config key '{key}' ({cfg.name}): the dataset ({cfg.path}, split {cfg.split!r}) has no rows; "
                          "accepted: a task with at least one problem")
    system = cfg.system_prompt
    if system is None:
        system = recipe.data.system_prompt if cfg.task == "heldout" else recipe.eval.system_prompt
    task = Task(cfg.name, cfg.kind, {"task": cfg.task, "path": cfg.path, "subset": cfg.subset, "split": cfg.split,
                                     "problem_column": cfg.problem_column, "answer_column": cfg.answer_column,
                                     "problems": count, "rows": len(rows), "system_prompt": system or None},
                cfg.num_samples)
    tools = schemas(recipe.rollout.tools) if recipe.rollout.tools else None  # offered as in training
    env = load_environment(recipe.rollout.environment) if recipe.rollout.environment else None
    overlap, empty, too_long = [], [], []
    for i in range(count):
        row = rows[i]
        problem, gold = row[cfg.problem_column], row[cfg.answer_column]
        blank = [c for c, v in ((cfg.problem_column, problem), (cfg.answer_column, gold)) if v is None or not str(v).strip()]
        if blank:
            empty.append(f"{i} ({', '.join(map(repr, blank))})")
            continue
        if training_problems is not None and normalise(problem) in training_problems:
            overlap.append(i)
            continue
        text, answer = choice_prompt(row, cfg, recipe.eval.seed, i) if cfg.kind == "choice" else (str(problem), gold)
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
        columns = {"answer": str(answer), "problem": str(problem), "prompt": msgs, "row": i}
        if env is not None:  # the environment opens each episode from the task's row, as in training
            try:
                msgs = opening_messages(env, row, system)
            except Exception as e:
                raise ConfigError(f"config key '{key}' ({cfg.name}): rollout.environment's reset(row) failed on row {i}: "
                                  f"{type(e).__name__}: {e}; accepted: a task whose rows have the columns the "
                                  "environment reads") from None
            columns = {**row, **columns, "prompt": msgs}
        ids = list(tokenizer.apply_chat_template(msgs, tools=tools, add_generation_prompt=True, tokenize=True,
                                                 return_dict=False))
        if len(ids) >= max_model_len:
            too_long.append(f"{i} ({len(ids)} tokens)")
            continue
        task.prompts.append({"prompt_id": f"{cfg.name}-{i}", "prompt_ids": ids, "columns": columns})
    where = f"config key '{key}' ({cfg.name})"
    if empty:
        raise ConfigError(f"{where}: {len(empty)} of its {count} rows have an empty problem or answer: rows "
                          f"{_listed(empty)}; accepted: a problem and an answer in every row")
    if too_long:
        raise ConfigError(f"{where}: {len(too_long)} of its {count} prompts leave no room to answer within "
                          f"generator.max_model_len={max_model_len}: rows {_listed(too_long)}; accepted: a larger "
                          "generator.max_model_len, or a task with shorter problems")
    if overlap:
        raise ConfigError(f"{where}: {len(overlap)} of its {count} problems are in the training data: rows "
                          f"{_listed(overlap)} (e.g. {str(rows[overlap[0]][cfg.problem_column])[:80]!r}); accepted: "
                          "held-out problems only, so the score measures generalisation, not memory")
    return task


def _listed(items: list, limit: int = 20) -> str:
    """Every item, or the first ``limit`` and how many more."""
    shown = ", ".join(map(str, items[:limit]))
    return shown if len(items) <= limit else f"{shown} and {len(items) - limit} more"


def training_problems(recipe: Recipe, tiny_dir: Path | None) -> set[str]:
    """The recipe's training prompts, normalised, for the overlap check."""
    from ..common.data import load_dataset_dict

    ds = load_dataset_dict(recipe.data, tiny_dir)
    split = ds[recipe.data.train_split]
    if recipe.data.prompt_column in split.column_names:
        return {normalise(p) for p in split[recipe.data.prompt_column]}
    # conversations only (SFT traces): the users' turns are the problems
    return {normalise(m["content"]) for msgs in split[recipe.data.messages_column] for m in msgs or []
            if isinstance(m, dict) and m.get("role") == "user"}


def load_tasks(recipe: Recipe, tokenizer, tiny_dir: Path | None, check_overlap: bool) -> list[Task]:
    """Every task of ``eval.tasks``, checked and rendered (before any actor starts)."""
    if not recipe.eval.tasks:
        return []
    seen = training_problems(recipe, tiny_dir) if check_overlap else None
    return [load_task(t, i, recipe, tokenizer, recipe.generator.max_model_len, tiny_dir, seen)
            for i, t in enumerate(recipe.eval.tasks)]
