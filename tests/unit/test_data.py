"""Data checked before Ray starts: every rule refused with the key, split, row and limit, or dropped and counted."""
import time

import pytest
from datasets import Dataset, DatasetDict
from transformers import AutoTokenizer

from r1ray.controllers.common.data import EpochSampler, PromptRenderer, prepare_data
from r1ray.controllers.common.tiny import make_example
from r1ray.controllers.config import Recipe
from r1ray.controllers.config.schema import ConfigError, build


@pytest.fixture(scope="module")
def tok(tiny_world):
    return AutoTokenizer.from_pretrained(tiny_world / "model")


def rows(n: int, start: int = 0) -> list[dict]:
    return [make_example(start + i, 2 * i + 7, 3) for i in range(n)]


def split(rows_: list[dict]) -> Dataset:
    return Dataset.from_list(rows_) if rows_ else Dataset.from_list(rows(1)).select([])  # empty, with the columns


def save(tmp_path, train: list[dict], test: list[dict] | None = None, **more) -> str:
    splits = {"train": split(train), **({"test": split(test)} if test is not None else {}),
              **{k: split(v) for k, v in more.items()}}
    path = tmp_path / "data"
    DatasetDict(splits).save_to_disk(str(path))
    return str(path)


def recipe(path: str, **sections) -> Recipe:
    """A recipe on ``path`` sized for small datasets: 4 prompts a step, 4 eval prompts, no SFT."""
    data = {"data": {"path": path}, "grpo": {"prompts_per_step": 4}, "eval": {"num_prompts": 4},
            "sft": {"steps": 0, "batch_size": 4}}
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values}
    return build(Recipe, data)


def refused(r: Recipe, tok, *fragments: str) -> str:
    with pytest.raises(ConfigError) as e:
        prepare_data(r, tok, None)
    msg = str(e.value)
    for f in fragments:
        assert f in msg, msg
    return msg


def test_tiny_world_validates_clean_and_fast(tiny_world, tok):
    r = build(Recipe, {"sft": {"steps": 5, "stop_at_pass_rate": 0.5}})
    t0 = time.perf_counter()
    data = prepare_data(r, tok, tiny_world)
    assert time.perf_counter() - t0 < 10  # 20,000 + 500 rows, every prompt rendered and tokenised
    assert data.dropped == {} and len(data.train) == 20000 and len(data.test) == 500
    assert data.train_rows == range(20000) and data.test_id(3) == "test-3"
    renderer = PromptRenderer(tok, r.data)  # the lengths are exactly what the driver will send
    for i in (0, 123, 19999):
        assert data.prompt_tokens["train"][i] == len(renderer.prompt(data.train[i], "x")["prompt_ids"])
    assert data.summary()["train_prompt_tokens_max"] == max(data.prompt_tokens["train"])


@pytest.mark.parametrize("path", ["/no/such/dataset", "./no-such-dataset", "~/no-such-dataset-r1ray"])
def test_missing_local_path_is_named_and_not_looked_up_on_the_hub(path, tok):
    msg = refused(recipe(path), tok, "config key 'data.path'", repr(path), "does not exist", "save_to_disk")
    assert "hub dataset could not be loaded" not in msg


def test_path_under_an_existing_folder_is_local(tmp_path, tok, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "datasets").mkdir()
    refused(recipe("datasets/math"), tok, "'datasets/math'", "does not exist")


def test_folder_that_is_not_a_saved_dataset(tmp_path, tok):
    refused(recipe(str(tmp_path)), tok, "config key 'data.path'", "load_from_disk", str(tmp_path))


def test_single_dataset_without_splits(tmp_path, tok):
    Dataset.from_list(rows(4)).save_to_disk(str(tmp_path / "flat"))
    refused(recipe(str(tmp_path / "flat")), tok, "config key 'data.path'", "single Dataset without splits")


def test_unreachable_hub_dataset_is_named(tok):
    refused(recipe("no-such-org/no-such-dataset"), tok, "config key 'data.path'", "'no-such-org/no-such-dataset'",
            "hub dataset could not be loaded")


def test_missing_split_names_it_and_the_splits_that_exist(tmp_path, tok):
    path = save(tmp_path, rows(8), validation=rows(4))
    refused(recipe(path), tok, "config key 'data.test_split'", "'test'", "it has: train, validation",
            "eval.num_prompts=4")
    refused(recipe(path, data={"train_split": "training"}), tok, "config key 'data.train_split'", "'training'")
    # nothing reads the test split: it may be absent
    data = prepare_data(recipe(path, eval={"num_prompts": 0}), tok, None)
    assert len(data.test) == 0 and len(data.train) == 8


@pytest.mark.parametrize("drop, key, sections", [
    ("solution", "data.solution_column", {}),
    ("problem", "data.prompt_column", {}),
    ("messages", "data.messages_column", {"sft": {"steps": 3}}),
])
def test_missing_column(tmp_path, tok, drop, key, sections):
    path = save(tmp_path, [{k: v for k, v in r.items() if k != drop} for r in rows(8)], rows(4))
    refused(recipe(path, **sections), tok, f"config key '{key}'", f"got {drop!r}", "split 'train'", "it has: ")


def test_messages_column_only_needed_for_sft(tmp_path, tok):
    path = save(tmp_path, [{k: v for k, v in r.items() if k != "messages"} for r in rows(8)], rows(4))
    assert len(prepare_data(recipe(path), tok, None).train) == 8


def test_empty_splits(tmp_path, tok):
    refused(recipe(save(tmp_path / "a", [], rows(4))), tok, "config key 'data.train_split'", "split 'train'",
            "has no rows")
    refused(recipe(save(tmp_path / "b", rows(8), [])), tok, "config key 'data.test_split'", "split 'test'",
            "has no rows")
    # a test split left empty by drops, needed by the evaluation or by the SFT probe alone
    path = save(tmp_path / "c", rows(8), [{**r, "problem": ""} for r in rows(4)])
    refused(recipe(path, data={"on_invalid_row": "drop"}), tok, "config key 'data.test_split'",
            "no usable rows after dropping 4 (test/empty_prompt=4)", "eval.num_prompts=4")
    refused(recipe(path, data={"on_invalid_row": "drop"}, eval={"num_prompts": 0},
                   sft={"steps": 3, "stop_at_pass_rate": 0.5}), tok, "config key 'data.test_split'",
            "sft.stop_at_pass_rate=0.5")
    assert len(prepare_data(recipe(path, eval={"num_prompts": 0}), tok, None).train) == 8  # not read: not checked


@pytest.mark.parametrize("value, what", [("", "the prompt is empty"), ("  \n", "the prompt is empty"),
                                         (None, "not a string (NoneType)")])
def test_empty_prompt_names_split_row_and_column(tmp_path, tok, value, what):
    train = rows(8)
    train[5]["problem"] = value
    refused(recipe(save(tmp_path, train, rows(4))), tok, "data rule 'empty_prompt'", "split 'train'", "row 5",
            "column 'problem' (data.prompt_column)", what, f"value: {value!r}", "accepted: a non-empty string",
            "data.on_invalid_row=drop")


def test_empty_solution_in_the_test_split(tmp_path, tok):
    test = rows(4)
    test[2]["solution"] = None
    refused(recipe(save(tmp_path, rows(8), test)), tok, "data rule 'empty_solution'", "split 'test'", "row 2",
            "(data.solution_column)")


def test_hundred_kb_prompt_names_the_row_and_the_limit(tmp_path, tok):
    train = rows(8)
    train[6]["problem"] = "7+" * 50_000
    t0 = time.perf_counter()
    msg = refused(recipe(save(tmp_path, train, rows(4))), tok, "data rule 'prompt_too_long'", "split 'train'",
                  "row 6", "column 'problem'", "100019 tokens", "more than the 192 the generator takes",
                  "generator.max_model_len=256 - sampling.max_new_tokens=64", "(100000 chars)")
    assert len(msg) < 1000 and time.perf_counter() - t0 < 5


def test_eval_prompts_use_the_eval_token_budget(tmp_path, tok):
    test = rows(4)
    test[1]["problem"] = "1" * 120  # 139 tokens rendered: under 256 - 64, over 256 - 200
    path = save(tmp_path, rows(8), test)
    assert prepare_data(recipe(path), tok, None).prompt_tokens["test"][1] == 139
    refused(recipe(path, eval={"max_new_tokens": 200}), tok, "split 'test'", "row 1", "139 tokens",
            "generator.max_model_len=256 - eval.max_new_tokens=200")
    refused(recipe(path, eval={"max_new_tokens": 256}), tok, "config key 'eval.max_new_tokens': got 256")


@pytest.mark.parametrize("messages, what", [
    ([], "not a non-empty list"),
    ([{"role": "user", "content": "1+2"}, {"role": "user", "content": "again"}], "role is 'user', not 'assistant'"),
    ([{"role": "user", "content": "1+2"}, {"role": "assistant", "content": None}],
     "message 1 is not a {role, content}"),
    ([{"role": "assistant", "content": "3"}], "only the assistant's turn"),
])
def test_bad_sft_messages(tmp_path, tok, messages, what):
    train = rows(8)
    train[3]["messages"] = messages
    path = save(tmp_path, train, rows(4))
    refused(recipe(path, sft={"steps": 3}), tok, "data rule 'bad_messages'", "row 3", "(data.messages_column)", what)
    assert len(prepare_data(recipe(path), tok, None).train) == 8  # no SFT: the messages are not read


def test_drop_counts_per_split_and_rule_and_keeps_original_row_ids(tmp_path, tok):
    train, test = rows(10), rows(6, start=500)
    train[1]["problem"] = ""
    train[4]["problem"] = "9" * 300
    train[7]["problem"] = "8" * 300
    train[8]["messages"] = []
    test[0]["solution"] = ""
    r = recipe(save(tmp_path, train, test), data={"on_invalid_row": "drop"}, sft={"steps": 2})
    data = prepare_data(r, tok, None)
    assert data.dropped == {"train/empty_prompt": 1, "train/prompt_too_long": 2, "train/bad_messages": 1,
                            "test/empty_solution": 1}
    assert list(data.train_rows) == [0, 2, 3, 5, 6, 9] and list(data.test_rows) == [1, 2, 3, 4, 5]
    assert data.train["problem"] == [train[i]["problem"] for i in data.train_rows]
    assert len(data.prompt_tokens["train"]) == 6 and data.test_id(0) == "test-1"
    sampler = EpochSampler(len(data.train), 0, rows=data.train_rows)
    taken = sampler.take(6)
    assert sorted(pid for _, pid in taken) == sorted(f"train-{i}.0" for i in data.train_rows)
    assert all(data.train[pos]["problem"] == train[int(pid[6:-2])]["problem"] for pos, pid in taken)
    assert data.summary()["dropped"] == data.dropped


def test_too_few_prompts_left_after_drops(tmp_path, tok):
    train = rows(6)
    for i in (0, 2, 4):
        train[i]["problem"] = " "
    path = save(tmp_path, train, rows(4))
    refused(recipe(path, data={"on_invalid_row": "drop"}), tok, "config key 'grpo.prompts_per_step': got 4",
            "has 3 usable prompts after dropping 3 (train/empty_prompt=3)", "accepted: at most 3")
    refused(recipe(path, data={"on_invalid_row": "drop"}, grpo={"prompts_per_step": 2}, sft={"steps": 1}), tok,
            "config key 'sft.batch_size': got 4", "3 rows with valid SFT messages")
    all_bad = [{**r, "problem": ""} for r in rows(4)]
    refused(recipe(save(tmp_path / "b", all_bad, rows(4)), data={"on_invalid_row": "drop"}), tok,
            "config key 'data.train_split'", "no usable rows after dropping 4")


def test_probe_needs_held_out_rows_beyond_the_eval(tmp_path, tok):
    path = save(tmp_path, rows(8), rows(4))
    refused(recipe(path, sft={"steps": 2, "stop_at_pass_rate": 0.5}), tok, "config key 'sft.stop_at_pass_rate'",
            "4 usable rows", "eval.num_prompts=4")
    assert len(prepare_data(recipe(path, sft={"steps": 2, "stop_at_pass_rate": 0.5}, eval={"num_prompts": 3}),
                            tok, None).test) == 4


def test_train_split_reused_as_test_split(tmp_path, tok):
    train = rows(8)
    train[2]["problem"] = ""
    r = recipe(save(tmp_path, train), data={"test_split": "train", "on_invalid_row": "drop"})
    data = prepare_data(r, tok, None)
    assert data.dropped == {"train/empty_prompt": 1, "test/empty_prompt": 1}
    assert data.prompt_tokens["train"] == data.prompt_tokens["test"]


def test_row_indices_hold_across_tokeniser_batches(tmp_path, tok):
    train = rows(2500)  # three CHUNKs of rows
    for i in (1500, 2499):
        train[i]["problem"] = "5" * 200
    path = save(tmp_path, train, rows(4))
    refused(recipe(path), tok, "row 1500", "prompt_too_long")
    data = prepare_data(recipe(path, data={"on_invalid_row": "drop"}), tok, None)
    assert data.dropped == {"train/prompt_too_long": 2} and len(data.train) == 2498
    assert data.train_rows[1499:1501] == [1499, 1501] and data.train_rows[-1] == 2498


def test_a_judges_reference_column_is_checked_with_the_data(tmp_path, tok):
    """A judge whose template shows the reference answer reads it from reference_column: a
    column the train split lacks is refused by name before any actor starts."""
    from r1ray.actors.scorer import RewardSpec

    path = save(tmp_path, rows(8), rows(4))
    r = recipe(path)
    judge = {"model": "m", "base_url": "http://h/v1", "reference_column": "final"}
    r.rewards = [RewardSpec("judge", 1.0, judge)]
    refused(r, tok, "config key 'rewards[0].params.reference_column'", "got 'final'", "split 'train'", "it has: ")
    r.rewards = [RewardSpec("judge", 1.0, {**judge, "template": "{{ problem }}\n{{ completion }}"})]  # no reference
    assert len(prepare_data(r, tok, None).train) == 8
