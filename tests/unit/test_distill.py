"""r1ray distill without Ray: reasoning fields, the journal that makes a run resumable, rejection
sampling, settings refused by name, the shipped recipes, a dataset kept without a hub token."""
import json

import pytest
import r1ray_cli
import yaml
from pydantic import SecretStr

from r1ray.controllers.config import load_recipe
from r1ray.controllers.config.schema import ConfigError
from r1ray.controllers.distill.pipeline import (
    kept_indices,
    read_journal,
    repair_journal,
    scrub,
    trace_text,
)
from r1ray.rewards.answers import boxed_math_answer

KEY = "sk-test-SECRET-0123456789"


def test_a_separate_reasoning_field_becomes_the_think_block():
    assert trace_text("42", "add them") == "<think>\nadd them\n</think>\n\n42"
    assert trace_text("<think>x</think> 42", "x") == "<think>x</think> 42"  # already inline
    assert trace_text("42", None) == "42"
    assert scrub(f"Bearer {KEY} failed", [SecretStr(KEY)]) == "Bearer *** failed"


def test_the_journal_survives_a_cut_last_line_and_keeps_each_row_once(tmp_path):
    path = tmp_path / "journal.jsonl"
    lines = [{"row": 0, "status": "failed", "error": "500"}, {"row": 0, "status": "done", "generations": ["a"]},
             {"row": 1, "status": "done", "generations": ["b"]}, {"row": 1, "status": "done", "generations": ["dup"]},
             {"row": 2, "status": "failed", "error": "timeout"}]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"row": 3, "status": "do')
    assert repair_journal(path) == len('{"row": 3, "status": "do')
    assert path.read_text().endswith("\n") and repair_journal(path) == 0
    done, failed = read_journal(path)
    assert sorted(done) == [0, 1] and done[1]["generations"] == ["b"]
    assert list(failed) == [2]
    rec = {"generations": ["x", "y", "z"], "correct": [False, True, True]}
    assert kept_indices(rec, True, "first") == [1] and kept_indices(rec, True, "all") == [1, 2]
    assert kept_indices(rec, False, "all") == [0, 1, 2]


def test_rejection_sampling_wants_a_boxed_answer_that_math_verifies():
    out = boxed_math_answer(["so \\boxed{\\frac{1}{2}}", "so \\boxed{0.5}", "it is 0.5", "\\boxed{3}"],
                            answer=["1/2", "\\frac12", "0.5", "4"])
    assert [s for s, _ in out] == [1.0, 1.0, 0.0, 0.0]
    assert out[2][1] is None


@pytest.mark.parametrize("sets,match", [
    ([], r"'distill.base_url' / 'distill.serve'.*exactly one"),
    (["distill.base_url=http://x/v1", "distill.serve={replicas: 1}"], r"exactly one"),
    (["distill.base_url=ftp://x"], r"'distill.base_url': got 'ftp://x'"),
    (["distill.base_url=http://x/v1"], r"'distill.model': got null"),
    (["distill.base_url=http://x/v1", "distill.model=m", "distill.api_key_env=sk-abc"], r"NAME of an environment"),
    (["distill.base_url=http://x/v1", "distill.model=m", "distill.prompt_template='Solve: {{ problem }}'"],
     r"'distill.prompt_template': uses \['problem'\]"),
    (["distill.base_url=http://x/v1", "distill.model=m", "distill.prompt_template='{{ instruction'"],
     r"not a valid Jinja template"),
    (["distill.base_url=http://x/v1", "distill.model=m", "distill.top_p=1.5"], r"'distill.top_p': got 1.5"),
    (["distill.base_url=http://x/v1", "distill.model=m", "distill.num_generations=0"], r"'distill.num_generations'"),
    (["distill.base_url=http://x/v1", "distill.model=m", "distill.push_to_hub=nameonly"], r"'owner/name'"),
    (["distill.serve={replicas: 1, tensor_parallel_size: 2}"], r"tensor_parallel_size.*on CPU"),
    (["distill.serve={replicas: 1, tensor_parallel_size: 2, gpus_per_replica: 1}"], r"gpus_per_replica.*accepted: 2"),
    (["distill.serve={replicas: 2, gpus_per_replica: 1}"], r"need 2 GPUs but 0 are available"),
    (["distill.serve={replicas: 3}"], r"3 servers x 1 CPUs need 3 CPUs but 2 are available"),
])
def test_bad_distill_settings_are_refused_by_name(sets, match):
    with pytest.raises(ConfigError, match=match):
        load_recipe("tiny-cpu", sets, stage="distill", cpus=2, gpus=0)


def test_the_shipped_distill_recipes_are_valid():
    from r1ray.controllers.common.system import DISTILL, placement_plan

    api = load_recipe("distill-deepseek-r1-api", stage="distill", cpus=8, gpus=0)
    assert api.distill.api_key_env == "DEEPSEEK_API_KEY" and api.distill.split_requests
    assert "{{ instruction }}" in api.distill.prompt_template and "\\boxed{}" in api.distill.prompt_template
    hosted = load_recipe("distill-r1-qwen-32b-h100", stage="distill", cpus=128, gpus=8)
    plans = placement_plan(hosted, DISTILL)
    assert [p.total() for p in plans] == [{"CPU": 8.0, "GPU": 2.0}] * 4 and all(p.strategy == "STRICT_PACK" for p in plans)
    with pytest.raises(ConfigError, match=r"need 8 GPUs but 4 are available"):
        load_recipe("distill-r1-qwen-32b-h100", stage="distill", cpus=128, gpus=4)
    proc = r1ray_cli.run("check", "distill-r1-qwen-32b-h100", "--distill", "--skip-data", "--gpus", "8", "--cpus", "64")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert yaml.safe_load(proc.stdout)["distill"]["serve"]["tensor_parallel_size"] == 2


def test_without_a_hub_token_the_dataset_is_kept_and_not_pushed(tmp_path, monkeypatch):
    import datasets

    from r1ray.controllers.distill.job import push

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # no stored login either
    recipe = load_recipe("tiny-cpu", ["distill.base_url=http://x/v1", "distill.model=m",
                                      "distill.push_to_hub=me/traces"], stage="distill")
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"messages": [[{"role": "user", "content": "q"}]]})})
    assert push(dd, recipe.distill) == {"repo": "me/traces", "pushed": False, "why": "no hub token"}
