"""Benchmark evaluation without Ray: the estimators, answer extraction, task loading, the checks.

The end-to-end runs (a run directory evaluated through the CLI, evaluation during GRPO on the
transformers and vLLM generators) are in test_e2e.py.
"""
import json
import math
from pathlib import Path

import pytest

from r1ray.controllers.config import load_recipe
from r1ray.controllers.config.schema import ConfigError
from r1ray.controllers.evaluation.evaluator import ks_for, maj_at_k, pass_at_k, task_report
from r1ray.controllers.evaluation.job import resolve_checkpoint, select_tasks
from r1ray.controllers.evaluation.tasks import GPQA_TEMPLATE, load_task
from r1ray.rewards import VerifierPool
from r1ray.rewards.answers import choice_answer, extract_letter, math_answer

FIXTURES = Path(__file__).parents[1] / "fixtures"


# -- pass@k and maj@k ---------------------------------------------------------------------------
@pytest.mark.parametrize("n,c,k,expected", [
    (4, 1, 1, 0.25),            # pass@1 is c / n
    (4, 1, 2, 1 - 3 / 6),       # 1 - C(3,2)/C(4,2)
    (5, 2, 3, 1 - 1 / 10),      # 1 - C(3,3)/C(5,3)
    (10, 3, 2, 1 - 21 / 45),    # 1 - C(7,2)/C(10,2)
    (8, 0, 8, 0.0),
    (8, 8, 1, 1.0),
    (6, 4, 3, 1.0),             # fewer wrong samples (2) than k: every k-subset has a right one
    (64, 3, 8, 1 - math.comb(61, 8) / math.comb(64, 8)),
])
def test_pass_at_k_matches_the_combinatorial_definition(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_pass_at_k_refuses_impossible_counts():
    for n, c, k in [(4, 5, 1), (4, 1, 5), (4, 1, 0), (4, -1, 1)]:
        with pytest.raises(ValueError, match="pass_at_k"):
            pass_at_k(n, c, k)


def test_maj_at_k_votes_and_ties():
    right = ["5", "5", "7", None]
    ok = [True, True, False, False]
    assert maj_at_k(right, ok, 4) == 1.0                         # 5 wins 2-1; None does not vote
    assert maj_at_k(["7", "7", "5", "5", "7"], [False, False, True, True, False], 5) == 0.0
    assert maj_at_k(["7", "7", "5", "5"], [False, False, True, True], 4) == 0.5   # a tie: half right
    assert maj_at_k(["1", "2", "3"], [True, False, False], 3) == pytest.approx(1 / 3)  # three-way tie
    assert maj_at_k(["7", "5", "5"], [False, True, True], 1) == 0.0  # only the first k samples vote
    assert maj_at_k([None, None], [False, False], 2) == 0.0
    # the tie rule does not depend on the order of the samples
    assert maj_at_k(["5", "7", "7", "5"], [True, False, False, True], 4) == 0.5


def test_reported_k_values():
    assert ks_for(64, None) == [1, 2, 4, 8, 16, 32, 64]
    assert ks_for(4, None) == [1, 2, 4]
    assert ks_for(6, None) == [1, 2, 4, 6]
    assert ks_for(1, None) == [1]
    assert ks_for(8, [1, 8, 16]) == [1, 8]


def test_task_report_averages_problems_and_leaves_out_unparsed_gold():
    from r1ray.controllers.evaluation.tasks import Task

    task = Task("t", "math", {}, 4)

    def problem(correct, answers, gold_parsed=True):
        return {"correct": correct, "answers": answers, "gold_parsed": gold_parsed, "completion_tokens": [10] * 4,
                "finish_reasons": ["stop", "stop", "length", "stop"]}

    problems = [problem([True, False, False, False], ["1", "2", "2", None]),
                problem([True, True, True, True], ["3"] * 4),
                problem([False] * 4, [None] * 4, gold_parsed=False)]
    r = task_report(task, problems, [1, 2, 4])
    assert r["problems"] == 3 and r["gold_unparsed"] == 1
    assert r["pass@1"] == pytest.approx((0.25 + 1.0) / 2)
    assert r["pass@2"] == pytest.approx((0.5 + 1.0) / 2)
    assert r["maj@4"] == pytest.approx((0.0 + 1.0) / 2)  # "2" beats the right "1" on the first problem
    assert r["answered"] == pytest.approx(7 / 12) and r["truncated"] == pytest.approx(3 / 12)
    from r1ray.controllers.evaluation.evaluator import table

    header, _, row = table({"tasks": {"t": r}}).splitlines()  # the console says what pass@k is over
    assert header.split()[:4] == ["task", "problems", "left", "out"]
    assert row.split()[:5] == ["t", "2", "1", "(gold", "unparsed)"]


# -- answer extraction ---------------------------------------------------------------------------
@pytest.mark.parametrize("gold,completion,right,answer", [
    ("\\frac{14}{3}", "so the answer is \\boxed{\\dfrac{14}{3}}", True, "14/3"),
    ("\\frac{1}{2}", "\\boxed{0.5}", True, "1/2"),
    ("204", "nested: \\boxed{\\boxed{204}}", True, "204"),
    ("50\\%", "The share is \\boxed{50\\%}.", True, "1/2"),
    ("0.5", "\\boxed{50\\%}", True, "1/2"),
    # several boxed answers are read together, as one set: hedging earns nothing (math-verify)
    ("3", "first \\boxed{2}, then corrected: \\boxed{3}", False, "{2, 3}"),
    ("2, 3", "the roots are \\boxed{2} and \\boxed{3}", True, "{2, 3}"),
    ("\\text{Monday}", "The day is \\boxed{\\text{Monday}}", True, "monday"),  # an answer given as text
    ("5", "The final answer is 5", True, "5"),                              # no box: the expression
    ("5", "the answer is five", False, None),                               # nothing to extract
    ("2\\sqrt{2}", "\\boxed{\\sqrt{8}}", True, "2*sqrt(2)"),
    ("The answer is $\\boxed{\\frac{3}{4}}$", "\\boxed{3/4}", True, "3/4"),  # a whole solution as gold
])
def test_math_answers_are_judged_as_open_r1_judges_them(gold, completion, right, answer):
    [(score, got)] = math_answer([completion], answer=[gold])
    assert score == float(right)
    if answer is not None:
        assert got == answer


def test_unparseable_gold_is_not_applicable():
    [(score, answer)] = math_answer(["\\boxed{3}"], answer=["no answer here"])
    assert score is None and answer == "3"


@pytest.mark.parametrize("text,letter", [
    ("Answer: C", "C"),
    ("**Answer:** (B)", "B"),
    ("Thinking...\nThe answer is \\boxed{D}.", "D"),
    ("Answer: $\\boxed{\\text{(A)}}$", "A"),
    ("A is wrong, so the final answer: B", "B"),
    ("answer: c", "C"),
    ("the correct option is (C) because", "C"),
    ("Let me think.\n(D)", "D"),
    ("Answer: A\n\nOn reflection, Answer: D", "D"),   # the last one counts
    ("The answer is a tough one", None),             # an article is not an option
    ("A good question. I cannot tell.", None),
])
def test_choice_letters_in_the_forms_models_write_them(text, letter):
    assert extract_letter(text) == letter
    [(score, got)] = choice_answer([text], answer=["C"])
    assert got == letter and score == float(letter == "C")


def test_the_verifier_pool_returns_the_extracted_answers(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1]))  # plugin_rewards, for the spawned workers too
    with VerifierPool(num_workers=1, timeout_s=20) as pool:
        res = pool.score("math_answer", {}, ["\\boxed{\\frac{2}{4}}", "no idea", "\\boxed{7}"],
                         {"answer": ["\\frac{1}{2}", "1", "8"]})
        assert res.scores == [1.0, 0.0, 0.0] and res.answers == ["1/2", None, "7"]
        res = pool.score("plugin_rewards:bad_answers", {}, ["x", "y"], {})
        assert res.scores == [None, None] and res.errors == [0, 1] and "(score, answer) pairs" in res.first_error


# -- tasks ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer(tiny_world):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_world / "model")


def _recipe(tiny_world, tasks, **overrides):
    sets = [f"model.tiny_dir={tiny_world}", f"eval.tasks={json.dumps(tasks)}", "generator.max_model_len=256",
            *[f"{k}={v}" for k, v in overrides.items()]]
    return load_recipe("configs/tiny-cpu.yaml", sets)


def test_gpqa_options_are_shuffled_with_a_fixed_seed(tiny_world, tokenizer):
    task_cfg = {"task": "gpqa_diamond", "path": str(FIXTURES / "gpqa_small.jsonl"), "split": "train"}
    r = _recipe(tiny_world, [task_cfg], **{"generator.max_model_len": 512})
    a = load_task(r.eval.tasks[0], 0, r, tokenizer, 512)
    b = load_task(r.eval.tasks[0], 0, r, tokenizer, 512)
    assert [p["columns"]["answer"] for p in a.prompts] == [p["columns"]["answer"] for p in b.prompts]
    letters = [p["columns"]["answer"] for p in a.prompts]
    assert len(set(letters)) > 1  # not always the first option
    rows = [json.loads(line) for line in (FIXTURES / "gpqa_small.jsonl").read_text().splitlines()]
    for p, row in zip(a.prompts, rows):
        text = p["columns"]["prompt"][-1]["content"]
        assert text.startswith(GPQA_TEMPLATE.split("{Question}")[0]) and row["Question"] in text
        assert f"{p['columns']['answer']}) {row['Correct Answer']}\n" in text + "\n"
        assert p["columns"]["prompt"][0] == {"role": "system", "content": r.eval.system_prompt} or r.eval.system_prompt is None
    other = _recipe(tiny_world, [task_cfg], **{"eval.seed": 1})
    c = load_task(other.eval.tasks[0], 0, other, tokenizer, 512)
    assert [p["columns"]["answer"] for p in c.prompts] != letters


def test_tasks_are_checked_before_anything_starts(tiny_world, tokenizer, tmp_path):
    math_file = str(FIXTURES / "math_small.jsonl")
    r = _recipe(tiny_world, [{"task": "generic", "path": math_file, "answer_column": "solution"}])
    with pytest.raises(ConfigError, match=r"eval.tasks\[0\].*no column 'solution'.*problem, answer"):
        load_task(r.eval.tasks[0], 0, r, tokenizer, 256)
    empty = tmp_path / "empty.jsonl"  # every bad row named, up to 20, then a count
    empty.write_text("".join(json.dumps({"problem": "1+1" if i % 3 else "", "answer": "" if i % 2 else "2"}) + "\n"
                             for i in range(70)))
    r = _recipe(tiny_world, [{"task": "generic", "path": str(empty)}])
    with pytest.raises(ConfigError) as e:
        load_task(r.eval.tasks[0], 0, r, tokenizer, 256)
    bad = [i for i in range(70) if i % 3 == 0 or i % 2]
    assert f"{len(bad)} of its 70 rows have an empty problem or answer: rows 0 ('problem'), 1 ('answer'), 3 " \
           f"('problem', 'answer')" in str(e.value)
    assert f"and {len(bad) - 20} more" in str(e.value) and f" {bad[19]} (" in str(e.value) and f" {bad[20]} (" not in str(e.value)
    r = _recipe(tiny_world, [{"task": "generic", "path": math_file}])
    with pytest.raises(ConfigError, match=r"of its \d+ prompts leave no room.*max_model_len=16: rows 0 \(\d+ tokens\), 1 "):
        load_task(r.eval.tasks[0], 0, r, tokenizer, 16)
    with pytest.raises(ConfigError, match=r"eval.tasks\[0\].path.*does not exist"):
        r = _recipe(tiny_world, [{"task": "generic", "path": str(tmp_path / "missing.jsonl")}])
        load_task(r.eval.tasks[0], 0, r, tokenizer, 256)


def test_a_task_overlapping_the_training_data_is_refused(tiny_world, tokenizer, tmp_path):
    import datasets

    train = datasets.load_from_disk(str(tiny_world / "data"))["train"]
    leaked = tmp_path / "leaked.jsonl"
    leaked.write_text("".join(json.dumps({"problem": f"  {train[i]['problem']} ", "answer": train[i]["answer"]}) + "\n"
                              for i in range(3)) + json.dumps({"problem": "1+1", "answer": "2"}) + "\n")
    from r1ray.controllers.evaluation.tasks import load_tasks

    r = _recipe(tiny_world, [{"task": "generic", "name": "leaky", "path": str(leaked)}])
    with pytest.raises(ConfigError, match=r"leaky.*3 of its 4 problems are in the training data: rows 0, 1, 2 \(e.g."):
        load_tasks(r, tokenizer, tiny_world, check_overlap=True)
    r = _recipe(tiny_world, [{"task": "heldout", "max_problems": 50}])
    [task] = load_tasks(r, tokenizer, tiny_world, check_overlap=True)  # the tiny world's test split is held out
    assert len(task.prompts) == 50 and task.prompts[0]["columns"]["answer"].startswith("\\boxed{")


@pytest.mark.parametrize("tasks,match", [
    ([{"task": "math500"}], r"eval.tasks\[0\].task.*'math500'.*math_500"),
    ([{"task": "generic"}], r"eval.tasks\[0\].path.*generic task needs a dataset"),
    ([{"task": "heldout"}, {"task": "heldout"}], r"eval.tasks\[1\].name.*'heldout' is used by two tasks"),
    ([{"task": "aime24", "num_samples": 0}], r"eval.tasks\[0\].num_samples"),
])
def test_bad_task_configs_name_the_key(tiny_world, tasks, match):
    with pytest.raises(ConfigError, match=match):
        _recipe(tiny_world, tasks)


def test_every_steps_needs_tasks_and_cli_selection(tiny_world):
    with pytest.raises(ConfigError, match=r"eval.every_steps.*no eval.tasks"):
        load_recipe("configs/tiny-cpu.yaml", ["eval.tasks=[]", "eval.every_steps=5"])
    r = _recipe(tiny_world, [{"task": "heldout"}])
    select_tasks(r, ["heldout", "aime24"], limit=3)
    assert [(t.task, t.max_problems) for t in r.eval.tasks] == [("heldout", 3), ("aime24", 3)]
    with pytest.raises(ConfigError, match=r"--tasks: got 'aime23'"):
        select_tasks(r, ["aime23"], None)


def test_checkpoints_resolve_from_run_directories(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoint-sft").mkdir(parents=True)
    (run / "config.yaml").write_text("seed: 0\n")
    with pytest.raises(ConfigError, match="no HF checkpoint"):
        resolve_checkpoint(str(run))
    (run / "checkpoint-sft" / "config.json").write_text("{}")
    assert resolve_checkpoint(str(run)) == (str(run / "checkpoint-sft"), run)
    (run / "checkpoint-final").mkdir()
    (run / "checkpoint-final" / "config.json").write_text("{}")
    assert resolve_checkpoint(str(run)) == (str(run / "checkpoint-final"), run)
    assert resolve_checkpoint(str(run / "checkpoint-sft")) == (str(run / "checkpoint-sft"), None)
    assert resolve_checkpoint("Qwen/Qwen2.5-Math-7B") == ("Qwen/Qwen2.5-Math-7B", None)
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_checkpoint(str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="neither an HF model"):
        resolve_checkpoint(str(tmp_path))


def test_the_open_r1_evaluation_recipe_follows_their_protocol():
    from r1ray.controllers.common.system import placement_plan
    from r1ray.controllers.config import OPENR1_SYSTEM_PROMPT
    from r1ray.controllers.evaluation.tasks import resolve

    r = load_recipe("configs/eval-openr1-7b-h100.yaml", stage="eval")
    tasks = [resolve(t, r) for t in r.eval.tasks]
    assert [(t.task, t.num_samples, t.path) for t in tasks] == [
        ("aime24", 64, "HuggingFaceH4/aime_2024"), ("math_500", 4, "HuggingFaceH4/MATH-500"),
        ("gpqa_diamond", 8, "Idavidrein/gpqa")]
    assert (r.eval.sampling.temperature, r.eval.sampling.top_p, r.generator.max_model_len) == (0.6, 0.95, 32768)
    assert r.eval.system_prompt == OPENR1_SYSTEM_PROMPT
    plans = placement_plan(r, ("rollout",))  # no learner group: 8 generators of one GPU each, the scorers
    assert sum(p.total().get("GPU", 0) for p in plans) == 8 and not any(p.name == "train" for p in plans)
    with pytest.raises(ConfigError, match="learner.gpus_per_rank"):  # as a training recipe it would need learners
        load_recipe("configs/eval-openr1-7b-h100.yaml", cpus=128, gpus=8)


def test_tasks_read_folders_of_split_files(tiny_world, tokenizer, tmp_path):
    from r1ray.controllers.evaluation.tasks import load_tasks

    data = tmp_path / "data"
    data.mkdir()
    rows = [json.loads(line) for line in (FIXTURES / "math_small.jsonl").read_text().splitlines()]
    (data / "train.jsonl").write_text("".join(json.dumps({"problem": f"train {i}", "solution": "1"}) + "\n"
                                              for i in range(3)))
    (data / "test.jsonl").write_text("".join(json.dumps({"problem": r["problem"], "solution": r["answer"]}) + "\n"
                                             for r in rows))
    r = _recipe(tiny_world, [{"task": "heldout"}, {"task": "generic", "name": "g", "path": str(data), "split": "test",
                                                    "answer_column": "solution"}], **{"data.path": str(data)})
    heldout, generic = load_tasks(r, tokenizer, tiny_world, check_overlap=True)
    assert [p["columns"]["problem"] for p in heldout.prompts] == [x["problem"] for x in rows]
    assert [p["columns"]["answer"] for p in generic.prompts] == [x["answer"] for x in rows]
